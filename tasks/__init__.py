"""Tasks: one module per task, each defining ``TASK`` (a `Task`); see docs/records.md.

    import tasks
    task = tasks.get_task("vqa")
    task.prompt(record)            # "what color is the circle?"
    task.target(record)            # "red"
    task.evaluate([task.parse(text, r) for text, r in zip(texts, records)], records)

Discovery: every module of this package whose name does not start with "_" and that defines
``TASK`` is registered under ``TASK.name``, which must equal the module name (task name = module
name = config key = metric prefix, DESIGN.md §3). Adding a task is adding one file.

A task from elsewhere (an experiment, your own dataset) is one file too: a module defining ``TASK``
anywhere on ``sys.path``. It joins the registry with `load_module("pkg.my_task")` (same rules) or
`register(task)`, or for every process of a run, command-line tools and their workers included,
by naming it in the environment: ``UNIFIED_VL_TASKS=pkg.my_task[,other.task]``. Nothing else needs
to know about it: storage, training, evaluation, the Predictor and the server read the registry.
`unregister(name)` removes a task again.

Pure Python: nothing here imports torch, transformers or timm.
"""

from __future__ import annotations

import importlib
import os
import pkgutil

from tasks._common import (
    DECODING_MODES,
    FieldSpec,
    RecordError,
    Task,
    bool_field,
    box_field,
    box_list_field,
    choice_field,
    size_field,
    source_id_field,
    storage_holds,
    string_field,
    string_list_field,
)

__all__ = [
    "DECODING_MODES",
    "FieldSpec",
    "RecordError",
    "TASKS",
    "TASKS_ENV",
    "Task",
    "bool_field",
    "box_field",
    "box_list_field",
    "choice_field",
    "get_task",
    "load_module",
    "register",
    "size_field",
    "source_id_field",
    "storage_holds",
    "string_field",
    "string_list_field",
    "unregister",
]

TASKS: dict[str, Task] = {}
"""name -> Task, every task known to this process."""


def register(task: Task, *, replace: bool = False) -> Task:
    """Adds ``task`` to `TASKS` under ``task.name``.

    Args:
        task: the task.
        replace: allow replacing a different task of the same name (e.g. classification with a
            dataset's verbalizer).

    Returns:
        ``task``.

    Raises:
        TypeError: ``task`` is not a `Task`.
        ValueError: another task already has that name and ``replace`` is False.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register expects a tasks.Task, got {type(task).__name__}")
    current = TASKS.get(task.name)
    if current is not None and current is not task and not replace:
        raise ValueError(f"a task named {task.name!r} is already registered; pass replace=True to replace it")
    TASKS[task.name] = task
    return task


def unregister(name: str) -> Task:
    """Removes the task ``name`` from `TASKS` and returns it."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    return TASKS.pop(name)


def load_module(module_name: str, *, replace: bool = False) -> Task:
    """Imports ``module_name`` and registers its ``TASK``.

    Args:
        module_name: a dotted module path importable from ``sys.path``; its last component must
            equal ``TASK.name``.
        replace: see `register`.

    Returns:
        The registered task.

    Raises:
        ValueError: the module defines no ``TASK``, or its name differs from the module name.
    """
    module = importlib.import_module(module_name)
    task = getattr(module, "TASK", None)
    if not isinstance(task, Task):
        raise ValueError(f"module {module_name!r} defines no TASK (a tasks.Task); got {type(task).__name__}")
    short_name = module_name.rpartition(".")[2]
    if task.name != short_name:
        raise ValueError(
            f"module {module_name!r} defines TASK named {task.name!r}; the task name must equal the module name {short_name!r}"
        )
    return register(task, replace=replace)


def get_task(name: str) -> Task:
    """The registered task ``name``.

    Raises:
        KeyError: unknown name; the message lists the known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


TASKS_ENV = "UNIFIED_VL_TASKS"  # comma-separated module paths of tasks defined outside this package


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "TASK"):
            load_module(module.__name__)
    for name in filter(None, (part.strip() for part in os.environ.get(TASKS_ENV, "").split(","))):
        try:
            load_module(name)
        except (ImportError, ValueError) as exc:
            raise ImportError(
                f"{TASKS_ENV}={os.environ[TASKS_ENV]!r}: cannot load task module {name!r}: {exc}"
            ) from exc


_discover()
