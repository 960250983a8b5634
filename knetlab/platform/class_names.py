"""The names and colours of a model's classes, from its experiment config: what `knetlab predict` writes into legends
and JSON, `knetlab export` into the exported file's metadata and the MLflow model into its description. One place,
so that a dataset that names its own classes changes every output at once."""

from __future__ import annotations

import numpy as np
from omegaconf import DictConfig


def class_names(cfg: DictConfig) -> list[str]:
    """The model's class names in label order (label k is `class_names(cfg)[k]`)."""
    from knetlab.platform.task_family import task_of

    task = task_of(cfg)
    if task in ("panoptic", "instance"):
        from knetlab.data.coco_categories import coco_categories

        return [category.name for category in coco_categories(task)]
    from knetlab.data.ade20k import ADE20K_CLASSES

    num_classes = int(cfg.model.num_classes)
    if num_classes == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"class_{i}" for i in range(num_classes)]  # the names validation logs per-class IoU under


def class_palette(cfg: DictConfig) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours in label order."""
    from knetlab.platform.task_family import task_of

    task = task_of(cfg)
    if task in ("panoptic", "instance"):
        from knetlab.data.coco_categories import coco_categories

        return np.asarray([category.color for category in coco_categories(task)], dtype=np.uint8)
    from knetlab.data.ade20k import ADE20K_PALETTE

    num_classes = int(cfg.model.num_classes)
    if num_classes == len(ADE20K_PALETTE):
        return np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    # the colours semantic validation's overlays use for a dataset without a palette
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)
