"""Evaluation tasks, registered by name; importing this package registers them all."""

from sparseflash.eval.tasks import niah, passkey, perplexity, recall, variable_tracking  # noqa: F401
from sparseflash.eval.tasks.base import (
    Sample,
    Task,
    available_tasks,
    get_task,
    plain_format,
    register_task,
)

__all__ = ["Sample", "Task", "available_tasks", "get_task", "plain_format", "register_task"]
