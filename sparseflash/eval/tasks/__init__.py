"""Evaluation tasks, registered by name; importing this package registers them all."""

from sparseflash.eval.tasks import (  # noqa: F401
    agreement,
    niah,
    passkey,
    perplexity,
    recall,
    variable_tracking,
)
from sparseflash.eval.tasks.base import (
    Sample,
    Task,
    available_tasks,
    get_task,
    plain_format,
    register_task,
)

__all__ = ["Sample", "Task", "available_tasks", "get_task", "plain_format", "register_task"]
