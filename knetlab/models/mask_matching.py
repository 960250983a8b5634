"""Hungarian matching of K-Net's thing proposals to the ground-truth instances, as the reference's
`MaskHungarianAssigner` does it: cost = 2 x focal class cost (only when class logits are given) + 4 x dice cost
+ 1 x mask cost, on sigmoid mask probabilities at the mask stride, solved by scipy's `linear_sum_assignment`."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLASS_COST_WEIGHT = 2.0
DICE_COST_WEIGHT = 4.0
MASK_COST_WEIGHT = 1.0


def focal_class_cost(cls_logits: torch.Tensor, gt_labels: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """cls_logits (N, C), gt_labels (G,) -> (N, G): mmdet's FocalLossCost (alpha 0.25, gamma 2), unweighted."""
    prob = cls_logits.sigmoid()
    neg_cost = -(1 - prob + eps).log() * (1 - FOCAL_ALPHA) * prob.pow(FOCAL_GAMMA)
    pos_cost = -(prob + eps).log() * FOCAL_ALPHA * (1 - prob).pow(FOCAL_GAMMA)
    return pos_cost[:, gt_labels] - neg_cost[:, gt_labels]


def dice_cost(mask_probs: torch.Tensor, gt_masks: torch.Tensor, *, eps: float = 1e-3) -> torch.Tensor:
    """mask_probs (N, h, w), gt_masks (G, h, w) soft -> (N, G) = -2 sum(pt) / (sum(p^2) + eps + sum(t^2) + eps).

    The reference drops the constant 1 of the dice loss: it does not change the matching."""
    pred = mask_probs.reshape(mask_probs.shape[0], -1)
    target = gt_masks.reshape(gt_masks.shape[0], -1).float()
    inter = torch.einsum("nh,mh->nm", pred, target)
    pred_sq = (pred * pred).sum(1) + eps
    target_sq = (target * target).sum(1) + eps
    return -(2 * inter) / (pred_sq[:, None] + target_sq[None, :])


def mask_cost(mask_probs: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """mask_probs (N, h, w), gt_masks (G, h, w) soft -> (N, G) = -(sum(pt) + sum((1-p)(1-t))) / (h w)."""
    height, width = gt_masks.shape[-2:]
    pos = torch.einsum("nhw,mhw->nm", mask_probs, gt_masks)
    neg = torch.einsum("nhw,mhw->nm", 1 - mask_probs, 1 - gt_masks)
    return -(pos + neg) / (height * width)


def matching_cost(
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_labels: torch.Tensor,
    cls_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted cost matrix (N, G) of the reference's assigner; `cls_logits` (N, T) or None (no class cost)."""
    probs = mask_logits.sigmoid()
    cost = DICE_COST_WEIGHT * dice_cost(probs, gt_masks) + MASK_COST_WEIGHT * mask_cost(probs, gt_masks)
    if cls_logits is not None:
        cost = cost + CLASS_COST_WEIGHT * focal_class_cost(cls_logits, gt_labels)
    return cost


def hungarian_match(
    mask_logits: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_labels: torch.Tensor,
    cls_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match N proposals to G instances of one image.

    mask_logits (N, h, w), gt_masks (G, h, w) soft float at the same size, gt_labels (G,) long, cls_logits (N, T)
    thing-class logits or None. Returns (pred_inds, gt_inds), long on mask_logits' device, min(N, G) pairs sorted by
    proposal index (the order the reference's pseudo sampler lists its positives in). Gradients never flow through it.
    """
    if mask_logits.dim() != 3 or gt_masks.dim() != 3 or mask_logits.shape[-2:] != gt_masks.shape[-2:]:
        raise ValueError(
            f"hungarian_match: mask_logits {tuple(mask_logits.shape)} and gt_masks {tuple(gt_masks.shape)} must be "
            "(N, h, w) and (G, h, w) at the same size"
        )
    if gt_labels.shape != (gt_masks.shape[0],):
        raise ValueError(f"hungarian_match: gt_labels {tuple(gt_labels.shape)} must be ({gt_masks.shape[0]},)")
    if cls_logits is not None and (cls_logits.dim() != 2 or cls_logits.shape[0] != mask_logits.shape[0]):
        raise ValueError(
            f"hungarian_match: cls_logits {tuple(cls_logits.shape)} must be ({mask_logits.shape[0]}, num_classes)"
        )
    device = mask_logits.device
    if mask_logits.shape[0] == 0 or gt_masks.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.clone()
    with torch.no_grad():
        cost = matching_cost(
            mask_logits.detach().float(),
            gt_masks.float(),
            gt_labels,
            None if cls_logits is None else cls_logits.detach().float(),
        )
    cost = cost.cpu()
    if not torch.isfinite(cost).all():
        raise ValueError("hungarian_match: the cost matrix has NaN/inf entries (non-finite mask or class logits)")
    rows, cols = linear_sum_assignment(cost.numpy())
    pred_inds = torch.as_tensor(rows, dtype=torch.long)
    gt_inds = torch.as_tensor(cols, dtype=torch.long)
    order = torch.argsort(pred_inds)
    return pred_inds[order].to(device), gt_inds[order].to(device)
