"""The names and colours of a model's classes, from its experiment config: what `knetlab predict` writes into legends
and JSON, `knetlab export` into the exported file's metadata and the MLflow model into its description. Semantic
models take them from their dataset (`knetlab.data.classes`, the one door the training, validation and
`knetlab eval` use too); panoptic and instance models from COCO's categories."""

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
    from knetlab.data.classes import class_names as dataset_class_names

    return list(dataset_class_names(cfg))


def class_palette(cfg: DictConfig) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours in label order."""
    from knetlab.platform.task_family import task_of

    task = task_of(cfg)
    if task in ("panoptic", "instance"):
        from knetlab.data.coco_categories import coco_categories

        return np.asarray([category.color for category in coco_categories(task)], dtype=np.uint8)
    from knetlab.data.classes import dataset_classes

    classes = dataset_classes(cfg.data, cfg.model.get("num_classes"), look_beside_data=False)
    return np.asarray(classes.palette, dtype=np.uint8)
