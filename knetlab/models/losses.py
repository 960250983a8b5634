"""Cross-entropy as mmsegmentation computes it for K-Net: logits resized to the label size, then the mean over ALL
pixels, ignored ones included (`avg_non_ignore=False`: ignored pixels add 0 to the sum but count in the divisor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def seg_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX, weight: float = 1.0
) -> torch.Tensor:
    """logits (B, C, h, w), labels (B, H, W) int64 -> weight * sum(CE over valid pixels) / (B * H * W)."""
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(f"labels must be (B, H, W) with B={logits.shape[0]}, got {tuple(labels.shape)}")
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    return weight * loss.sum() / labels.numel()
