"""The task families by name: the training loop, `knetlab eval`/`bench` and the preflight look a family up here by the
model's task and call its functions (task_family.TaskFamily); they never branch on the task themselves. A new family
is a module defining a TaskFamily and one more entry in `TASK_FAMILIES`."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from knetlab.platform.task_family import TaskFamily, task_of


def _semantic() -> TaskFamily:
    from knetlab.platform import semantic_task

    return semantic_task.FAMILY


def _panoptic() -> TaskFamily:
    from knetlab.platform import detection_task

    return detection_task.PANOPTIC


def _instance() -> TaskFamily:
    from knetlab.platform import detection_task

    return detection_task.INSTANCE


# Loaded lazily: a family's module imports its datasets and evaluators, which a process of another family never needs.
TASK_FAMILIES: dict[str, Callable[[], TaskFamily]] = {
    "semantic": _semantic,
    "panoptic": _panoptic,
    "instance": _instance,
}


def task_family(cfg: DictConfig) -> TaskFamily:
    """The task family that trains and validates `cfg`'s model."""
    return family_named(task_of(cfg))


def family_named(name: str) -> TaskFamily:
    if name not in TASK_FAMILIES:
        raise ValueError(f"task {name!r} has no training support (valid: {', '.join(TASK_FAMILIES)})")
    return TASK_FAMILIES[name]()
