"""What the one training loop asks of a task family (semantic, panoptic, instance): its datasets, the losses of one
batch, the validation and the metric that ranks checkpoints (`TaskFamily`), and which task a model has (`task_of`).
The families themselves are registered in tasks.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig


@dataclass
class Validation:
    """One validation's outcome: `metrics` are reported to Ray (checkpoint ranking, Tune) and logged; `details`
    (per-class figures) are only logged; `summary` is the console line after "iter N val"."""

    metrics: dict[str, float]
    summary: str
    details: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskFamily:
    """The functions a task family plugs into the training loop."""

    name: str
    # The metric that ranks checkpoints (storage.num_to_keep keeps the best by it) and Tune's default.
    score_metric: str
    # cfg -> the training dataset (with set_epoch(epoch) for its augmentations) / the validation dataset.
    train_dataset: Callable[[DictConfig], Any]
    val_dataset: Callable[[DictConfig], Any]
    # (model, batch from the loader, device) -> named losses; their sum is what is optimised.
    batch_losses: Callable[[torch.nn.Module, Any, torch.device], dict[str, torch.Tensor]]
    # (bare model, validation set, cfg, device, rank, world_size, artifact dir or None) -> Validation; rank 0 writes
    # its artifacts (per-class tables, overlays) into the artifact dir when one is given.
    validate: Callable[..., Validation]
    # cfg -> (height, width) of the image `trainer.bench_images` times inference on (the table's fps column).
    bench_image_size: Callable[[DictConfig], tuple[int, int]]
    # Driver side, before anything starts: synthesize the demo dataset when asked and missing, then check both splits
    # (each bad file named in one line).
    prepare_data: Callable[[DictConfig], None]
    # (cfg, split) -> checks one split's files up front (`knetlab eval` checks the validation split).
    check_split: Callable[[DictConfig, str], None]
    # On every node that will host a worker (the preflight): a local data.root has this family's layout.
    check_layout: Callable[[str], None]
    # The DataLoader's collate_fn (None: PyTorch's default).
    collate: Callable[[list], Any] | None = None
    # cfg -> {"training": [...], "validation": [...]}: the files and folders of each split in the local copy of
    # data.root, which the run's MLflow dataset inputs digest (None: the whole data.root, as "training").
    data_splits: Callable[[DictConfig], dict[str, list[Path]]] | None = None


def task_of(cfg: DictConfig) -> str:
    """The task of the experiment's model: the zoo spec's `task` (semantic models have none)."""
    from knetlab.models.zoo import model_spec

    return getattr(model_spec(cfg.model.name), "task", "semantic")


def artifact_path(root: Path | None, iteration: int) -> Path | None:
    """Where one validation's artifacts go before they are logged (None when nothing is logged)."""
    return root / f"eval_{iteration}" if root is not None else None
