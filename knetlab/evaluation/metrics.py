"""Semantic-segmentation metrics exactly as mmsegmentation's IoUMetric defines them: a confusion matrix summed over
the whole split, then aAcc / mIoU / mAcc and per-class IoU / Acc."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist


class SegEvaluator:
    """Accumulates a (num_classes, num_classes) int64 confusion matrix (rows: ground truth, columns: prediction).

    Pixels whose label is `ignore_index` are skipped. Areas are summed over every `update` (and, after
    `all_reduce()`, over every worker) before any division, as mmseg's `IoUMetric` does; per-image averaging would
    give different numbers.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"SegEvaluator: num_classes must be a positive int, got {num_classes!r}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"SegEvaluator: ignore_index={ignore_index} is a valid class id for num_classes={num_classes}; "
                f"use a value outside [0, {num_classes - 1}] (255 for ADE20K)"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"SegEvaluator: {len(class_names)} class_names given for num_classes={num_classes}; they must match"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self._local: torch.Tensor | None = None  # this process's counts
        self._reduced: torch.Tensor | None = None  # sum over workers, valid until the next update/reset

    def reset(self) -> None:
        self._local = None
        self._reduced = None

    @torch.no_grad()
    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """Add one batch: `pred` and `label` are integer tensors of the same shape, (B, H, W) or (H, W)."""
        if pred.shape != label.shape:
            raise ValueError(
                f"SegEvaluator.update: pred shape {tuple(pred.shape)} != label shape {tuple(label.shape)}; "
                "resize the prediction to the label's size before updating"
            )
        for name, t in (("pred", pred), ("label", label)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(
                    f"SegEvaluator.update: {name} must be an integer tensor of class ids, got dtype {t.dtype} "
                    "(take the argmax of the logits first)"
                )
        label = label.to(pred.device)
        valid = label != self.ignore_index
        gt = label[valid].long()
        pr = pred[valid].long()
        if gt.numel():
            # One reduction for both checks, so a GPU evaluation syncs once per batch.
            lo = torch.stack([gt.min(), pr.min()]).tolist()
            hi = torch.stack([gt.max(), pr.max()]).tolist()
            if lo[0] < 0 or hi[0] >= self.num_classes:
                raise ValueError(
                    f"SegEvaluator.update: label values must be in [0, {self.num_classes - 1}] or the ignore index "
                    f"{self.ignore_index}; found range [{lo[0]}, {hi[0]}] among non-ignored pixels"
                )
            if lo[1] < 0 or hi[1] >= self.num_classes:
                raise ValueError(
                    f"SegEvaluator.update: pred values must be in [0, {self.num_classes - 1}]; "
                    f"found range [{lo[1]}, {hi[1]}]"
                )
        counts = torch.bincount(gt * self.num_classes + pr, minlength=self.num_classes**2)
        counts = counts.view(self.num_classes, self.num_classes)
        if self._local is None:
            self._local = counts
        else:
            self._local += counts.to(self._local.device)
        self._reduced = None

    def all_reduce(self) -> None:
        """Sum the counts over all torch.distributed workers (every worker must call it); no-op when not initialised.

        The local counts are kept, so calling it again (or updating and reducing again) never double-counts.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return
        local = self._local
        if local is None:
            # A worker that saw no images still has to take part in the collective.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            local = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        elif dist.get_backend() == "nccl" and local.device.type != "cuda":
            local = local.to(torch.device("cuda", torch.cuda.current_device()))
        reduced = local.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        self._reduced = reduced

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """int64 (num_classes, num_classes), rows = ground truth, columns = prediction; summed over workers after
        `all_reduce()`."""
        if self._reduced is not None:
            return self._reduced
        if self._local is not None:
            return self._local
        return torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def compute(self) -> dict:
        """aAcc, mIoU, mAcc (percent, floats) and per-class IoU / Acc (percent, lists with NaN where undefined)."""
        return metrics_from_confusion(self.confusion_matrix)


def metrics_from_confusion(cm: torch.Tensor) -> dict:
    """mmseg's `total_area_to_metrics` on a confusion matrix: IoU = I / (P + L - I), Acc = I / L, aAcc = sum I / sum L.

    A class with no ground-truth and no predicted pixel has IoU 0/0 = NaN; a class with no ground-truth pixel has
    Acc NaN; the means skip NaN (np.nanmean). Values are not rounded (mmseg rounds to 2 decimals for display only).
    """
    cm = cm.detach().to("cpu", torch.float64)
    intersect = cm.diagonal()
    area_label = cm.sum(dim=1)
    area_pred = cm.sum(dim=0)
    union = area_pred + area_label - intersect
    iou = intersect / union  # 0/0 -> nan
    acc = intersect / area_label
    total = area_label.sum().item()
    a_acc = intersect.sum().item() / total if total else math.nan
    return {
        "aAcc": a_acc * 100.0,
        "mIoU": _nanmean(iou) * 100.0,
        "mAcc": _nanmean(acc) * 100.0,
        "IoU": (iou * 100.0).tolist(),
        "Acc": (acc * 100.0).tolist(),
    }


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~torch.isnan(values)]
    return defined.mean().item() if defined.numel() else math.nan


def format_table(result: dict, class_names: Sequence[str] | None = None) -> str:
    """A per-class table (Class | IoU | Acc) plus the summary row, values in percent with 2 decimals like mmseg."""
    iou, acc = result["IoU"], result["Acc"]
    if class_names is None:
        class_names = [f"class_{i}" for i in range(len(iou))]
    if len(class_names) != len(iou):
        raise ValueError(f"format_table: {len(class_names)} class names for {len(iou)} classes; they must match")
    width = max([len("Class"), *(len(n) for n in class_names)])

    def cell(v: float) -> str:
        return f"{'nan':>7}" if math.isnan(v) else f"{v:7.2f}"

    lines = [f"{'Class':<{width}} | {'IoU':>7} | {'Acc':>7}", f"{'-' * width}-+-{'-' * 7}-+-{'-' * 7}"]
    lines += [f"{name:<{width}} | {cell(i)} | {cell(a)}" for name, i, a in zip(class_names, iou, acc)]
    lines += [
        "",
        f"{'aAcc':>7} | {'mIoU':>7} | {'mAcc':>7}",
        f"{cell(result['aAcc'])} | {cell(result['mIoU'])} | {cell(result['mAcc'])}",
    ]
    return "\n".join(lines)
