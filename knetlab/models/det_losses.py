"""The training losses of panoptic/instance K-Net exactly as the reference computes them (K-Net's `ConvKernelHead.loss`,
`KernelUpdateHead.loss`/`get_targets`, `KernelIterHead.forward_train` on mmdet 2.28.2's FocalLoss, CrossEntropyLoss
and DiceLoss): Hungarian matching with the one-stage lag, then focal class, mask BCE, dice, rank CE and the kernel
head's semantic focal loss, weighted and named as `knet_det_losses` documents. Always float32."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from knetlab.models.det_targets import (
    IGNORE_INDEX,
    ImageTargets,
    build_image_targets,
    rank_targets,
    semantic_targets,
)
from knetlab.models.mask_matching import hungarian_match

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
CLS_WEIGHT = 2.0
MASK_WEIGHT = 1.0
DICE_WEIGHT = 4.0
RANK_WEIGHT = 0.1
SEG_WEIGHT = 1.0
DICE_EPS = 1e-3
# mmdet's weight_reduce_loss divides by (avg_factor + float32 eps)
AVG_EPS = torch.finfo(torch.float32).eps

Match = tuple[torch.Tensor, torch.Tensor]


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over torch.distributed workers when initialised (mmdet's reduce_mean), else itself."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor.div_(dist.get_world_size()), op=dist.ReduceOp.SUM)
    return tensor


def sigmoid_focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor | None,
    avg_factor: torch.Tensor | float,
) -> torch.Tensor:
    """logits (M, C), labels (M,) with C = background (an all-zero one-hot row), weights (M, C) or None ->
    sum(weights * focal) / (avg_factor + eps): mmdet's py_sigmoid_focal_loss, alpha 0.25, gamma 2, unweighted."""
    num_classes = logits.shape[1]
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
    prob = logits.sigmoid()
    pt = (1 - prob) * target + prob * (1 - target)
    focal_weight = (FOCAL_ALPHA * target + (1 - FOCAL_ALPHA) * (1 - target)) * pt.pow(FOCAL_GAMMA)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * focal_weight
    if weights is not None:
        loss = loss * weights
    return loss.sum() / (avg_factor + AVG_EPS)


def mask_bce_loss(mask_logits: torch.Tensor, mask_targets: torch.Tensor) -> torch.Tensor:
    """(P, h, w) logits and soft targets -> BCE mean over every pixel of the P masks (CrossEntropyLoss use_sigmoid)."""
    return F.binary_cross_entropy_with_logits(mask_logits, mask_targets, reduction="mean")


def dice_loss(mask_logits: torch.Tensor, mask_targets: torch.Tensor) -> torch.Tensor:
    """(P, h, w) -> mean over masks of 1 - 2 sum(pt) / (sum(p^2) + 1e-3 + sum(t^2) + 1e-3), p = sigmoid (DiceLoss)."""
    pred = mask_logits.sigmoid().flatten(1)
    target = mask_targets.flatten(1)
    inter = (pred * target).sum(1)
    union = (pred * pred).sum(1) + DICE_EPS + (target * target).sum(1) + DICE_EPS
    return (1 - 2 * inter / union).mean()


def rank_loss(mask_logits: torch.Tensor, rank_target: torch.Tensor) -> torch.Tensor:
    """(B, N, h, w) logits, (B, h, w) kernel index or 255 -> softmax CE over the N kernels per pixel, summed over valid
    pixels and divided by ALL B*h*w pixels (Q13: mmdet's avg_non_ignore=False mean)."""
    loss = F.cross_entropy(mask_logits, rank_target, ignore_index=IGNORE_INDEX, reduction="none")
    return loss.sum() / rank_target.numel()


def _zero(mask_logits: torch.Tensor) -> torch.Tensor:
    # no positive anywhere: the reference returns pred.sum() * 0 (keeps the graph, gives zero gradients)
    return mask_logits.sum() * 0


def _mask_losses(
    mask_logits: torch.Tensor, mask_targets: torch.Tensor, positive: torch.Tensor, with_rank: bool
) -> dict[str, torch.Tensor]:
    """BCE x1 and dice x4 over the positive kernels, and the rank CE x0.1 over all kernels when `with_rank`; plain
    means on this worker (the reference reduces only the class loss's avg factor across workers)."""
    if not positive.any():
        zero = _zero(mask_logits)
        return {"mask": zero, "dice": zero.clone(), **({"rank": zero.clone()} if with_rank else {})}
    pos_logits, pos_targets = mask_logits[positive], mask_targets[positive]
    losses = {
        "mask": MASK_WEIGHT * mask_bce_loss(pos_logits, pos_targets),
        "dice": DICE_WEIGHT * dice_loss(pos_logits, pos_targets),
    }
    if with_rank:
        losses["rank"] = RANK_WEIGHT * rank_loss(mask_logits, rank_targets(mask_targets, positive))
    return losses


def kernel_head_losses(
    mask_logits: torch.Tensor,
    seg_logits: torch.Tensor,
    images: list[ImageTargets],
    matches: list[Match],
    panoptic: bool,
) -> dict[str, torch.Tensor]:
    """The kernel head's losses over its P thing masks (Q3: the stuff masks are appended after this loss):
    rpn_mask, rpn_dice, rpn_seg and, for panoptic, rpn_rank (always under that name: Q14's `loss_rank` slip in the
    reference's no-positive branch would make the key set vary between iterations)."""
    num_classes = seg_logits.shape[1]
    mask_targets = mask_logits.new_zeros(mask_logits.shape)
    positive = torch.zeros(mask_logits.shape[:2], dtype=torch.bool, device=mask_logits.device)
    seg_targets = []
    for b, (image, (pred_inds, gt_inds)) in enumerate(zip(images, matches)):
        mask_targets[b, pred_inds] = image.masks[gt_inds]
        positive[b, pred_inds] = True
        seg_targets.append(semantic_targets(image, gt_inds, num_classes))
    losses = {f"rpn_{k}": v for k, v in _mask_losses(mask_logits, mask_targets, positive, panoptic).items()}
    flat_seg = seg_logits.permute(0, 2, 3, 1).reshape(-1, num_classes)
    flat_target = torch.stack(seg_targets).reshape(-1)
    # averaged over the foreground pixels of this worker only (no reduce_mean here in the reference), at least 1
    num_foreground = (flat_target < num_classes).sum().float().clamp(min=1.0)
    losses["rpn_seg"] = SEG_WEIGHT * sigmoid_focal_loss(flat_seg, flat_target, None, num_foreground)
    return losses


def stage_class_targets(
    images: list[ImageTargets],
    matches: list[Match],
    num_kernels: int,
    num_thing_classes: int,
    num_stuff_classes: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (B, N) (background = T+S) and per-class weights (B, N, T+S) of one stage's focal class loss."""
    num_classes = num_thing_classes + num_stuff_classes
    num_things = num_kernels - num_stuff_classes
    labels = torch.full((len(images), num_kernels), num_classes, dtype=torch.long, device=device)
    weights = torch.ones(len(images), num_kernels, num_classes, device=device)
    for b, (image, (pred_inds, gt_inds)) in enumerate(zip(images, matches)):
        labels[b, pred_inds] = image.labels[gt_inds]
        # stuff kernel k always targets stuff class T+k; background when that class is absent
        labels[b, num_things + image.stuff_labels - num_thing_classes] = image.stuff_labels
    if num_stuff_classes > 0:
        # Q9: thing proposals get no loss on the stuff logits; stuff kernel k only on its own logit T+k
        weights[:, :num_things, num_thing_classes:] = 0
        weights[:, num_things:] = 0
        weights[:, num_things:, num_thing_classes:] = torch.eye(num_stuff_classes, device=device)
    return labels, weights


def stage_losses(
    cls_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    images: list[ImageTargets],
    matches: list[Match],
    num_thing_classes: int,
    num_stuff_classes: int,
) -> dict[str, torch.Tensor]:
    """One update stage's losses: cls (focal x2), mask (BCE x1), dice (x4), rank (x0.1, panoptic), over all N kernels
    (P thing proposals, then the S stuff kernels)."""
    num_kernels = mask_logits.shape[1]
    num_things = num_kernels - num_stuff_classes
    labels, weights = stage_class_targets(
        images, matches, num_kernels, num_thing_classes, num_stuff_classes, mask_logits.device
    )
    mask_targets = mask_logits.new_zeros(mask_logits.shape)
    for b, (image, (pred_inds, gt_inds)) in enumerate(zip(images, matches)):
        mask_targets[b, pred_inds] = image.masks[gt_inds]
        mask_targets[b, num_things + image.stuff_labels - num_thing_classes] = image.stuff_masks
    # positives are the matched proposals and the present stuff classes' kernels
    positive = labels < num_thing_classes + num_stuff_classes
    # the focal loss is averaged over the positive count averaged over workers (the reference's avg factor), >= 1
    avg_factor = reduce_mean(positive.sum().float()).clamp(min=1.0)
    num_classes = cls_logits.shape[-1]
    losses = {
        "cls": CLS_WEIGHT
        * sigmoid_focal_loss(
            cls_logits.reshape(-1, num_classes), labels.reshape(-1), weights.reshape(-1, num_classes), avg_factor
        )
    }
    losses.update(_mask_losses(mask_logits, mask_targets, positive, num_stuff_classes > 0))
    return losses


def _check_inputs(rpn: dict, stages: list[dict], targets: list[dict], num_thing: int, num_stuff: int) -> None:
    if num_thing <= 0 or num_stuff < 0:
        raise ValueError(f"num_thing_classes={num_thing}, num_stuff_classes={num_stuff}; need T >= 1 and S >= 0")
    for key in ("mask_logits", "seg_logits"):
        if key not in rpn or rpn[key].dim() != 4:
            raise ValueError(f'rpn["{key}"] must be a (B, C, h, w) tensor; got {type(rpn.get(key)).__name__}')
    batch, num_proposals, height, width = rpn["mask_logits"].shape
    num_classes = num_thing + num_stuff
    seg_shape = tuple(rpn["seg_logits"].shape)
    if seg_shape != (batch, num_classes, height, width):
        raise ValueError(f'rpn["seg_logits"] has shape {seg_shape}; expected {(batch, num_classes, height, width)}')
    if len(targets) != batch:
        raise ValueError(f"targets has {len(targets)} entries for a batch of {batch} images")
    num_kernels = num_proposals + num_stuff
    if num_stuff > 0 and num_kernels > IGNORE_INDEX:
        raise ValueError(f"{num_kernels} kernels: the rank target's ignore index {IGNORE_INDEX} would be a kernel")
    for i, stage in enumerate(stages):
        masks, cls = stage.get("mask_logits"), stage.get("cls_logits")
        if masks is None or tuple(masks.shape) != (batch, num_kernels, height, width):
            got = None if masks is None else tuple(masks.shape)
            raise ValueError(f'stages[{i}]["mask_logits"] is {got}; expected {(batch, num_kernels, height, width)}')
        if cls is None or tuple(cls.shape) != (batch, num_kernels, num_classes):
            got = None if cls is None else tuple(cls.shape)
            raise ValueError(f'stages[{i}]["cls_logits"] is {got}; expected {(batch, num_kernels, num_classes)}')


def knet_det_losses(
    rpn: dict[str, torch.Tensor],
    stages: list[dict[str, torch.Tensor]],
    targets: list[dict],
    num_thing_classes: int,
    num_stuff_classes: int,
) -> dict[str, torch.Tensor]:
    """The weighted training losses of panoptic (num_stuff_classes > 0) or instance (0) K-Net; their sum is the loss.

    rpn: {"mask_logits": (B, P, h, w), "seg_logits": (B, T+S, h, w)} of the kernel head at stride 4;
    stages: [{"cls_logits": (B, P+S, T+S), "mask_logits": (B, P+S, h, w)}] per update stage at stride 4;
    targets: [{"masks": bool (G, 4h, 4w), "labels": long (G,), "sem_seg": long (4h, 4w) | None}] padded.
    Keys: rpn_mask, rpn_dice, rpn_seg, s{i}_cls, s{i}_mask, s{i}_dice, and rpn_rank, s{i}_rank for panoptic.
    """
    _check_inputs(rpn, stages, targets, num_thing_classes, num_stuff_classes)
    device = rpn["mask_logits"].device
    with torch.autocast(device_type=device.type, enabled=False):
        rpn_masks = rpn["mask_logits"].float()
        size = tuple(rpn_masks.shape[-2:])
        num_proposals = rpn_masks.shape[1]
        images = [
            build_image_targets(t, size, num_thing_classes, num_stuff_classes, where=f"targets[{i}]", device=device)
            for i, t in enumerate(targets)
        ]
        # Q8: the kernel head and stage 0 are both matched on the kernel head's masks without class cost; the two
        # reference assigners are configured alike and see the same masks, so one matching serves both
        matches = [hungarian_match(rpn_masks[b].detach(), im.masks, im.labels) for b, im in enumerate(images)]
        losses = kernel_head_losses(rpn_masks, rpn["seg_logits"].float(), images, matches, num_stuff_classes > 0)
        for i, stage in enumerate(stages):
            cls_logits, mask_logits = stage["cls_logits"].float(), stage["mask_logits"].float()
            for key, value in stage_losses(
                cls_logits, mask_logits, images, matches, num_thing_classes, num_stuff_classes
            ).items():
                losses[f"s{i}_{key}"] = value
            if i + 1 < len(stages):
                # Q8: stage i+1 is matched on stage i's thing masks and thing-class logits (post_assign=False)
                matches = [
                    hungarian_match(
                        mask_logits[b, :num_proposals].detach(),
                        im.masks,
                        im.labels,
                        cls_logits[b, :num_proposals, :num_thing_classes].detach(),
                    )
                    for b, im in enumerate(images)
                ]
    return losses
