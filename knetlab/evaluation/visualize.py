"""Evaluation artifacts for MLflow: a confusion-matrix PNG, a prediction-overlay PNG (with a legend of the classes in
it, in the dataset's names and colours) and a per-class IoU CSV."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# mmseg's data preprocessor (RGB, 0-255 scale); identical to torchvision's ImageNet mean/std times 255.
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _as_numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def confusion_matrix_png(
    cm: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None,
    path: str | Path,
    top_k: int = 20,
) -> Path:
    """The confusion matrix of the `top_k` classes with the most ground-truth + predicted pixels (so a class that
    swallows others shows up), each row normalised by that class's ground-truth pixel count: a cell is the
    percentage of class i's pixels predicted as class j, the diagonal is the class's Acc. Rendered with
    matplotlib's Agg canvas (no pyplot, no global backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = _as_numpy(cm).astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_matrix_png: cm must be square (C, C), got shape {cm.shape}")
    num_classes = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"confusion_matrix_png: {len(names)} class names for a {num_classes}-class matrix")
    if top_k < 1:
        raise ValueError(f"confusion_matrix_png: top_k must be >= 1, got {top_k}")
    gt_pixels = cm.sum(axis=1)
    order = np.argsort(-(gt_pixels + cm.sum(axis=0)), kind="stable")[: min(top_k, num_classes)]
    with np.errstate(invalid="ignore", divide="ignore"):
        rows = cm[order][:, order] / gt_pixels[order, None] * 100.0

    k = len(order)
    side = max(4.0, 0.45 * k + 2.5)
    fig = Figure(figsize=(side, side), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(np.nan_to_num(rows), cmap="Blues", vmin=0.0, vmax=100.0)
    ax.set_xticks(range(k), [names[i] for i in order], rotation=90, fontsize=8)
    ax.set_yticks(range(k), [names[i] for i in order], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(
        f"Confusion (% of ground-truth pixels), top {k} of {num_classes} classes by gt+pred pixels", fontsize=9
    )
    if k <= 30:
        for r in range(k):
            for c in range(k):
                if not math.isnan(rows[r, c]) and rows[r, c] >= 0.5:
                    color = "white" if rows[r, c] > 50 else "black"
                    ax.text(c, r, f"{rows[r, c]:.0f}", ha="center", va="center", fontsize=6, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def denormalize(images: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
    """(B, 3, H, W) normalised float -> (B, H, W, 3) uint8 RGB."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    pixels = images.detach().float().cpu() * std_t + mean_t
    return pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _colorize(image: np.ndarray, ids: np.ndarray, palette: np.ndarray, alpha: float, what: str) -> np.ndarray:
    valid = ids != 255
    if valid.any() and (ids[valid].min() < 0 or ids[valid].max() >= len(palette)):
        raise ValueError(
            f"overlay_png: {what} has class ids in [{ids[valid].min()}, {ids[valid].max()}] but the palette has "
            f"{len(palette)} colours"
        )
    out = image.astype(np.float64)
    colors = palette[ids[valid]].astype(np.float64)
    out[valid] = (1.0 - alpha) * out[valid] + alpha * colors
    return np.rint(out).astype(np.uint8)


def overlay_png(
    images: torch.Tensor,
    preds: torch.Tensor,
    labels: torch.Tensor | None,
    palette: Sequence[Sequence[int]] | np.ndarray,
    path: str | Path,
    *,
    alpha: float = 0.5,
    max_images: int = 8,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    class_names: Sequence[str] | None = None,
) -> Path:
    """A grid with one row per image: the image, the ground truth blended over it (omitted when `labels` is None),
    the prediction blended over it. Ignored pixels (255) are left uncoloured. Images are denormalised with
    ImageNet mean/std and resized (bilinear) to the label/prediction size when they differ. With `class_names`
    (one per palette colour) a legend of the classes in the ground truth or the prediction goes below the grid."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"overlay_png: images must be (B, 3, H, W), got {tuple(images.shape)}")
    if preds.dim() != 3 or preds.shape[0] != images.shape[0]:
        raise ValueError(f"overlay_png: preds must be (B, H, W) for B={images.shape[0]}, got {tuple(preds.shape)}")
    if labels is not None and labels.shape != preds.shape:
        raise ValueError(f"overlay_png: labels shape {tuple(labels.shape)} != preds shape {tuple(preds.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay_png: alpha must be in [0, 1], got {alpha}")
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"overlay_png: palette must be (num_classes, 3) RGB, got shape {palette.shape}")

    n = min(images.shape[0], max_images)
    images = images[:n].detach().float().cpu()
    if images.shape[-2:] != preds.shape[-2:]:
        images = F.interpolate(images, size=tuple(preds.shape[-2:]), mode="bilinear", align_corners=False)
    rgb = denormalize(images, mean, std)
    pred_ids = _as_numpy(preds[:n]).astype(np.int64)
    label_ids = _as_numpy(labels[:n]).astype(np.int64) if labels is not None else None

    gap = 4
    h, w = pred_ids.shape[-2:]
    cols = 3 if label_ids is not None else 2
    grid = np.full((n * h + (n - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for i in range(n):
        panels = [rgb[i]]
        if label_ids is not None:
            panels.append(_colorize(rgb[i], label_ids[i], palette, alpha, "labels"))
        panels.append(_colorize(rgb[i], pred_ids[i], palette, alpha, "preds"))
        for j, panel in enumerate(panels):
            y, x = i * (h + gap), j * (w + gap)
            grid[y : y + h, x : x + w] = panel
    if class_names is not None:
        if len(class_names) != len(palette):
            raise ValueError(f"overlay_png: {len(class_names)} class names for {len(palette)} palette colours")
        ids = np.concatenate([pred_ids.ravel(), label_ids.ravel() if label_ids is not None else pred_ids[:0].ravel()])
        present = [int(i) for i in np.unique(ids) if 0 <= i < len(palette)]
        strip = legend(present, class_names, palette, grid.shape[1])
        grid = np.concatenate([grid, np.full((gap, grid.shape[1], 3), 255, np.uint8), strip])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path, format="PNG")
    return path


def legend(class_ids: Sequence[int], class_names: Sequence[str], palette: Sequence[Sequence[int]] | np.ndarray,
           width: int, row_height: int = 14) -> np.ndarray:
    """(H, width, 3) uint8 on white: a colour swatch and the name of each class in `class_ids`, left to right,
    wrapped to `width` (a single entry wider than it is cut at the edge)."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch, pad = row_height - 4, 8
    entries = [(int(i), str(class_names[i]), swatch + 4 + int(probe.textlength(str(class_names[i]), font=font)))
               for i in class_ids]
    rows: list[list[tuple[int, str, int]]] = [[]]
    used = 0
    for entry in entries:
        if rows[-1] and used + entry[2] > width:
            rows.append([])
            used = 0
        rows[-1].append(entry)
        used += entry[2] + pad
    canvas = Image.new("RGB", (max(1, width), row_height * len(rows) if entries else 1), "white")
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        x, y = 0, r * row_height
        for class_id, name, entry_width in row:
            colour = tuple(int(c) for c in palette[class_id])
            draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=colour, outline=(0, 0, 0))
            draw.text((x + swatch + 3, y + 1), name, fill=(0, 0, 0), font=font)
            x += entry_width + pad
    return np.asarray(canvas)


def per_class_csv(result: dict, class_names: Sequence[str] | None, path: str | Path) -> Path:
    """Columns class_id, class, IoU, Acc (percent; 'nan' where undefined), one row per class."""
    iou, acc = result["IoU"], result["Acc"]
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(len(iou))]
    if len(names) != len(iou) or len(acc) != len(iou):
        raise ValueError(
            f"per_class_csv: {len(names)} class names, {len(iou)} IoU and {len(acc)} Acc values; they must match"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class_id", "class", "IoU", "Acc"])
        for i, (name, class_iou, class_acc) in enumerate(zip(names, iou, acc)):
            writer.writerow([i, name, _cell(class_iou), _cell(class_acc)])
    return path


def _cell(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"
