"""The evaluation harness: long-context tasks, a paired dense-vs-method grid, a results store, summary, plots.

Entry point for people: the ``sparseflash eval`` command (:mod:`sparseflash.cli`). For code::

    from sparseflash.eval import EvalConfig, ResultsStore, Runner, load_model
    loaded = load_model("tiny-random")
    Runner(loaded, ResultsStore("results/x"), EvalConfig(tasks=["passkey"], methods=[], lengths=[512])).run()
"""

from sparseflash.eval.engine import Engine
from sparseflash.eval.model import LoadedModel, load_model
from sparseflash.eval.results import ResultsStore, read_cases
from sparseflash.eval.runner import EvalConfig, Runner
from sparseflash.eval.summary import summarize, write_summary
from sparseflash.eval.tasks import Sample, Task, available_tasks, get_task, register_task

__all__ = [
    "Engine",
    "EvalConfig",
    "LoadedModel",
    "ResultsStore",
    "Runner",
    "Sample",
    "Task",
    "available_tasks",
    "get_task",
    "load_model",
    "read_cases",
    "register_task",
    "summarize",
    "write_summary",
]
