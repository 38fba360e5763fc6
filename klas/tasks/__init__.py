"""Tasks: what differs between kinds of model, as plug-ins registered by name (like block views).

A task owns how a split is read and batched, what a probe reads and predicts, the training loss and the
distillation target, the per-sample quality that the admission test pairs, the reported metric, the cost unit, the
exporter and the runtime entry. The stages talk only to the task (``ctx.task``), the family's block views and the
context; a new kind of model is a new :class:`Task` subclass and one ``register_task`` line. ``docs/tasks.md`` has a
worked example.
"""
from __future__ import annotations

from klas.errors import KlasError
from klas.tasks.base import Task
from klas_runtime.registry import Registry

_TASKS: Registry[Task] = Registry("task", KlasError)
DEFAULT_TASK = "image-classification"


def register_task(task: Task) -> Task:
    """Register ``task`` under ``task.name`` (a later registration of the same name replaces the earlier one)."""
    if not isinstance(task, Task):
        raise TypeError("register_task takes a Task instance")
    return _TASKS.register(task.name, task)


def task_names() -> tuple[str, ...]:
    _builtin()
    return tuple(sorted(_TASKS.names()))


def dataset_names() -> tuple[str, ...]:
    """Every dataset name a registered task reads: the choices of ``[data] dataset``."""
    _builtin()
    return tuple(dict.fromkeys(d for t in _TASKS.values() for d in t.datasets))


def get_task(name: str | None) -> Task:
    """The registered task ``name`` (None: image classification); one-line error naming the registered ones."""
    _builtin()
    return _TASKS.get(name or DEFAULT_TASK)


def task_of(family) -> Task:
    """The task of a Family or FamilyCfg (its ``task`` field)."""
    cfg = getattr(family, "cfg", family)
    return get_task(getattr(cfg, "task", None))


def _builtin() -> None:
    # NOTE: imported on first use: the task modules import torch, the registry must not
    import klas.tasks.causal_lm  # noqa: F401
    import klas.tasks.image_classification  # noqa: F401


__all__ = ["DEFAULT_TASK", "Task", "dataset_names", "get_task", "register_task", "task_names", "task_of"]
