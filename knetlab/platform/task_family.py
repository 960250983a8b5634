"""What the one training loop asks of a task family (semantic, panoptic, instance): its datasets, the losses of one
batch, the validation and the metric that ranks checkpoints (`TaskFamily`), and which task a model has (`task_of`).
The families themselves are registered in tasks.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

if TYPE_CHECKING:  # annotations only: a sweep's driver and trial actors need no torch to read a family
    import torch


@dataclass
class Validation:
    """One validation's outcome: `metrics` are reported to Ray (checkpoint ranking, Tune) and logged; `details`
    (per-class figures) are only logged; `summary` is the console line after "iter N val"."""

    metrics: dict[str, float]
    summary: str
    details: dict[str, float] = field(default_factory=dict)


# The columns every table has after its labels: peak training memory and inference fps, logged after training
# (trainer.bench_images).
BENCH_COLUMNS = (("Mem (GB)", "bench/mem_gb"), ("Inf time (fps)", "bench/fps"))


@dataclass(frozen=True)
class ResultTable:
    """A task family's results table in `knetlab compare` (the K-Net README's columns for the task): the columns that
    name a configuration, read from each run's tags and params, then the metric columns, each the mean ± std over the
    configuration's runs (its seeds)."""

    label_columns: tuple[str, ...]
    # (tags, params) of one MLflow run -> its cells in label_columns, e.g. ("KNet + FCN", "R-50-D8", "512x512", "80000")
    labels: Callable[[Mapping[str, str], Mapping[str, str]], tuple[str, ...]]
    metric_columns: tuple[tuple[str, str], ...]  # (column, MLflow metric), in table order
    score_column: str  # the metric column the plot draws against "Inf time (fps)"
    # The label a sweep's grid/search values are appended to: "KNet + FCN (optim.lr=0.001)".
    setting_column: str = "Method"

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.label_columns, *(column for column, _ in self.metric_columns), "runs")


@dataclass(frozen=True)
class TaskFamily:
    """The functions a task family plugs into the training loop."""

    name: str
    # The metric that ranks checkpoints (storage.num_to_keep keeps the best by it) and Tune's default.
    score_metric: str
    # cfg -> the training dataset (with set_epoch(epoch) for its augmentations) / the validation dataset.
    train_dataset: Callable[[DictConfig], Any]
    val_dataset: Callable[[DictConfig], Any]
    # (model, batch from the loader, device) -> named losses (`loss_<part>`, logged as train/loss_<part>); their sum
    # is what is optimised.
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
    # On every node that will host a worker (the preflight): a local data.root has this family's layout (semantic:
    # also called as check_layout(root, (train_list, val_list)) for a dataset given by list files).
    check_layout: Callable[..., None]
    # The family's table in `knetlab compare`.
    table: ResultTable
    # The DataLoader's collate_fn (None: PyTorch's default).
    collate: Callable[[list], Any] | None = None
    # With eval.final_ms_flip, after training, on every worker: (bare model, cfg, device, rank, world_size) -> the
    # multi-scale + flip metrics (the table's ms+flip column); None: the family has no such evaluation.
    validate_ms_flip: Callable[..., dict[str, float]] | None = None
    # Every training batch has the same size (a fixed crop): cuDNN autotuning pays off (trainer.cudnn_benchmark).
    fixed_crop: bool = False
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
