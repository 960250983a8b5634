"""Training targets of panoptic/instance K-Net at the mask stride, as the reference builds them (`KNet.forward_train`,
`sem2ins_masks`, the heads' `get_targets`): soft gt masks downsampled bilinearly from the padded image size, one soft
mask per stuff class present, and the hard per-pixel targets of the semantic and rank losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
MASK_STRIDE = 4


@dataclass
class ImageTargets:
    """One image's targets at the mask stride (h, w)."""

    masks: torch.Tensor  # float (G, h, w) soft thing masks, one per non-crowd instance
    labels: torch.Tensor  # long (G,) contiguous thing labels 0..T-1
    stuff_masks: torch.Tensor  # float (K, h, w) soft, one per stuff class present (K = 0 for the instance task)
    stuff_labels: torch.Tensor  # long (K,) contiguous stuff labels T..T+S-1, ascending


def downsample_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """masks (G, H, W) -> float (G, h, w) soft, bilinear with align_corners=False and no antialiasing (Q7: the
    reference keeps the soft values for BCE, dice and the matching costs)."""
    masks = masks.float()
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size))
    return F.interpolate(masks[None], size=size, mode="bilinear", align_corners=False)[0]


def stuff_masks_from_semantic(
    sem_seg: torch.Tensor, num_thing_classes: int, num_stuff_classes: int, *, where: str = "sem_seg"
) -> tuple[torch.Tensor, torch.Tensor]:
    """sem_seg (H, W) long -> (labels (K,) ascending, masks bool (K, H, W)): one mask per stuff class present, as
    `sem2ins_masks`; thing labels (crowd things included) and 255 make no mask."""
    classes = torch.unique(sem_seg)
    num_classes = num_thing_classes + num_stuff_classes
    bad = classes[(classes < 0) | ((classes >= num_classes) & (classes != IGNORE_INDEX))]
    if bad.numel():
        raise ValueError(
            f"{where} holds label {int(bad[0])}; valid: 0..{num_classes - 1} (things 0..{num_thing_classes - 1}, "
            f"stuff {num_thing_classes}..{num_classes - 1}) or {IGNORE_INDEX} (VOID)"
        )
    labels = classes[(classes >= num_thing_classes) & (classes < num_classes)]
    return labels, sem_seg[None] == labels[:, None, None]


def build_image_targets(
    target: dict,
    size: tuple[int, int],
    num_thing_classes: int,
    num_stuff_classes: int,
    *,
    where: str = "targets[0]",
    device: torch.device | str | None = None,
) -> ImageTargets:
    """One padded training target {"masks" (G, Hp, Wp), "labels" (G,), "sem_seg" (Hp, Wp) | None} -> ImageTargets at
    `size` = (Hp // 4, Wp // 4) on `device` (default: the masks' device). The instance task (num_stuff_classes 0)
    ignores sem_seg."""
    for key in ("masks", "labels"):
        if key not in target:
            raise ValueError(f'{where} has no "{key}"; a training target holds "masks", "labels" and "sem_seg"')
    masks, labels = target["masks"].to(device), target["labels"].to(device)
    if masks.dim() != 3:
        raise ValueError(f'{where}["masks"] has shape {tuple(masks.shape)}; expected (G, Hp, Wp)')
    padded = tuple(masks.shape[-2:])
    if (padded[0] // MASK_STRIDE, padded[1] // MASK_STRIDE) != tuple(size):
        raise ValueError(
            f'{where}["masks"] is {padded[0]}x{padded[1]} but the predictions are {size[0]}x{size[1]} at stride '
            f"{MASK_STRIDE}; the targets must be padded to the batch's padded image size"
        )
    if labels.shape != (masks.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f'{where}["labels"] is {labels.dtype} {tuple(labels.shape)}; expected torch.long ({masks.shape[0]},), '
            'one label per mask of "masks"'
        )
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_thing_classes):
        bad = labels[(labels < 0) | (labels >= num_thing_classes)][0]
        raise ValueError(f'{where}["labels"] holds {int(bad)}; thing labels are 0..{num_thing_classes - 1}')
    stuff_labels = labels.new_zeros(0)
    stuff_masks = masks.new_zeros((0, *size), dtype=torch.float32)
    if num_stuff_classes > 0:
        sem_seg = target.get("sem_seg")
        if sem_seg is None:
            raise ValueError(f'{where}["sem_seg"] is missing; the panoptic task needs the (Hp, Wp) semantic map')
        if tuple(sem_seg.shape) != padded:
            raise ValueError(f'{where}["sem_seg"] has shape {tuple(sem_seg.shape)}; expected {padded} like "masks"')
        stuff_labels, stuff_bool = stuff_masks_from_semantic(
            sem_seg.to(masks.device).long(), num_thing_classes, num_stuff_classes, where=f'{where}["sem_seg"]'
        )
        stuff_masks = downsample_masks(stuff_bool, size)
    return ImageTargets(downsample_masks(masks, size), labels, stuff_masks, stuff_labels)


def last_covering_index(cover: torch.Tensor, dim: int) -> torch.Tensor:
    """Index along `dim` of the last True, -1 where none: painting masks in index order, later ones overwriting."""
    count = cover.shape[dim]
    if count == 0:
        shape = list(cover.shape)
        del shape[dim]
        return torch.full(shape, -1, dtype=torch.long, device=cover.device)
    last = count - 1 - cover.flip(dim).to(torch.uint8).argmax(dim)
    return torch.where(cover.any(dim), last, -1)


def semantic_targets(image: ImageTargets, gt_inds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The kernel head's per-pixel semantic target (h, w): background `num_classes`, stuff masks painted first (class
    order), then the matched gt masks `gt_inds` listed in ascending proposal order (hungarian_match's), later ones
    overwriting, as the reference paints its positives; a soft mask covers a pixel where it is > 0 (Q7, `.bool()`)."""
    cover = torch.cat([image.stuff_masks > 0, image.masks[gt_inds] > 0])
    classes = torch.cat([image.stuff_labels, image.labels[gt_inds]])
    last = last_covering_index(cover, 0)
    if classes.numel() == 0:
        return torch.full_like(last, num_classes)
    return torch.where(last >= 0, classes[last.clamp(min=0)], num_classes)


def rank_targets(mask_targets: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """mask_targets (B, N, h, w) soft, positive (B, N) bool -> long (B, h, w): per pixel the index of the last positive
    kernel whose target covers it (> 0, Q7; later indices win as in the reference's loop), 255 elsewhere."""
    cover = (mask_targets > 0) & positive[:, :, None, None]
    last = last_covering_index(cover, 1)
    return torch.where(last >= 0, last, IGNORE_INDEX)
