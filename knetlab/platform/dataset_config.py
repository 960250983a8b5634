"""The dataset part of an experiment config, settled when the config is loaded (config.py calls `settle_dataset`
before validating): a semantic dataset's classes (`knetlab.data.classes.dataset_classes`) are written into
`data.classes`/`data.palette` when the dataset names its own, `model.num_classes` follows their count when null, and
a null `data.reduce_zero_label` becomes the dataset's encoding. A run's resolved config, and the checkpoint's copy of
it, then carries the names that metrics, eval, predict and export use (`knetlab.data.classes.class_names(cfg)`)."""

from __future__ import annotations

import typing
from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf

from knetlab.platform.structured_config import ConfigError

# Keys that describe a semantic dataset; panoptic/instance models read COCO's categories from its JSON files.
SEMANTIC_DATA_KEYS = ("data.classes", "data.palette", "data.classes_file", "data.train_list", "data.val_list")
MAX_CLASSES_WITH_REDUCE_ZERO_LABEL = 254  # annotation values 1..N must stay below the ignore value 255


def settle_dataset(cfg: DictConfig, source: str = "config", origins: Mapping[str, str] | None = None) -> None:
    """Fill in the dataset's classes, `model.num_classes` and `data.reduce_zero_label` (see the module docstring);
    a model whose name is unknown is left to `validate_config`, which names it."""
    from knetlab.data.classes import dataset_classes  # imported here: the data package imports torch
    from knetlab.models import list_models
    from knetlab.models.zoo import model_spec

    origins = origins or {}

    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{origins.get(key, source)}: {key}: {message}")

    if cfg.model.name not in list_models():
        return
    task = getattr(model_spec(cfg.model.name), "task", "semantic")
    if task != "semantic":
        for key in SEMANTIC_DATA_KEYS:
            if OmegaConf.select(cfg, key):
                fail(key, f"applies to semantic datasets; model {cfg.model.name} is a {task} model, whose classes "
                          f"are its COCO annotation file's categories")
        return
    classes = dataset_classes(cfg.data, cfg.model.num_classes,
                              {key: origins.get(key, source) for key in ("data.classes", "data.palette")})
    count = len(classes.names)
    if classes.own:
        if cfg.model.num_classes is not None and cfg.model.num_classes != count:
            fail("model.num_classes", f"{cfg.model.num_classes}, but the dataset names {count} classes (from "
                                      f"{classes.source}); leave model.num_classes out (null) to follow the dataset, "
                                      f"or make the two agree")
        cfg.data.classes = list(classes.names)
        cfg.data.palette = [list(colour) for colour in classes.palette]
        if not cfg.data.classes_file and classes.source != "data.classes":  # found beside the data: say where
            cfg.data.classes_file = classes.source
    if cfg.model.num_classes is None:
        cfg.model.num_classes = count
    if cfg.data.reduce_zero_label is None:
        cfg.data.reduce_zero_label = classes.default_reduce_zero_label
    # (a count beyond 255 is validate_config's error, about model.num_classes)
    if cfg.data.reduce_zero_label and MAX_CLASSES_WITH_REDUCE_ZERO_LABEL < cfg.model.num_classes <= 255:
        fail("data.reduce_zero_label", f"true with {cfg.model.num_classes} classes: annotation values 1.."
                                       f"{cfg.model.num_classes} would reach the ignore value 255 (at most "
                                       f"{MAX_CLASSES_WITH_REDUCE_ZERO_LABEL} classes; or set it false)")
