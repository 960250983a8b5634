"""Eval post-processing of panoptic/instance K-Net (docs/knet_panoptic_reference.md §5): mask rescaling, the panoptic
fusion of thing and stuff segments, the instance top-k, and the reference's panoptic encoding.

Panoptic results use segment ids from 1 with 0 = VOID (quirk Q1 resolved: the reference numbers segments from 0, so
its best segment collides with VOID in mmdet's PNG export); `reference_panoptic_map` gives the reference's
`label + k * 1000` map (k from 0, VOID = num_classes) for comparisons with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

INSTANCE_OFFSET = 1000  # mmdet's panoptic encoding: label + segment index * INSTANCE_OFFSET
INSTANCE_SCORE_THR = 0.3
OVERLAP_THR = 0.6
MASK_THR = 0.5
MAX_PER_IMG = 100


def rescale_masks(mask_logits: torch.Tensor, pad_shape: Sequence[int], img_shape: Sequence[int],
                  ori_shape: Sequence[int]) -> torch.Tensor:
    """(N, h4, w4) stride-4 logits -> (N, H0, W0) probabilities: sigmoid first, bilinear to the padded batch size,
    crop to the image, bilinear to the original size (align_corners=False), as `KernelUpdateHead.rescale_masks`."""
    probs = F.interpolate(mask_logits.unsqueeze(0).sigmoid(), size=tuple(pad_shape), mode="bilinear",
                          align_corners=False)
    probs = probs[:, :, : img_shape[0], : img_shape[1]]
    return F.interpolate(probs, size=tuple(ori_shape), mode="bilinear", align_corners=False).squeeze(0)


def panoptic_fusion(cls_scores: torch.Tensor, mask_probs: torch.Tensor, num_proposals: int, num_thing_classes: int,
                    *, instance_score_thr: float = INSTANCE_SCORE_THR,
                    overlap_thr: float = OVERLAP_THR) -> dict[str, Any]:
    """`KernelIterHead.get_panoptic` + `merge_stuff_thing`. cls_scores: sigmoid scores (N, T + S) with N = proposals
    + S stuff kernels; mask_probs: (N, H, W) at the output size. A thing scores the max over its thing classes, stuff
    kernel k its own class T + k. Each pixel goes to argmax(score * prob); segments are walked by descending score,
    things under `instance_score_thr` are skipped, a segment is kept when its kept area / its area at prob >= 0.5 is
    >= `overlap_thr` (both > 0). Pixels of skipped segments stay VOID.

    Returns {"pan_seg": int64 (H, W) segment ids (0 = VOID), "segments": [{"id", "category", "isthing", "score"}]}
    with ids 1, 2, ... in the order the reference numbers them."""
    thing_scores, thing_labels = cls_scores[:num_proposals, :num_thing_classes].max(dim=1)
    stuff_scores = cls_scores[num_proposals:, num_thing_classes:].diag()
    stuff_labels = torch.arange(stuff_scores.numel(), device=cls_scores.device) + num_thing_classes
    scores = torch.cat([thing_scores, stuff_scores])
    labels = torch.cat([thing_labels, stuff_labels])

    mask_ids = (scores.view(-1, 1, 1) * mask_probs).argmax(0)
    pan_seg = torch.zeros(mask_probs.shape[-2:], dtype=torch.long, device=mask_probs.device)
    segments: list[dict[str, Any]] = []
    for k in torch.argsort(-scores).tolist():
        label = int(labels[k])
        isthing = label < num_thing_classes
        if isthing and scores[k] < instance_score_thr:
            continue
        mask = mask_ids == k
        mask_area = int(mask.sum())
        original_area = int((mask_probs[k] >= 0.5).sum())
        if mask_area > 0 and original_area > 0 and mask_area / original_area >= overlap_thr:
            segment_id = len(segments) + 1
            pan_seg[mask] = segment_id
            segments.append({"id": segment_id, "category": label, "isthing": isthing, "score": float(scores[k])})
    return {"pan_seg": pan_seg, "segments": segments}


def instance_topk(cls_scores: torch.Tensor, mask_logits: torch.Tensor, pad_shape: Sequence[int],
                  img_shape: Sequence[int], ori_shape: Sequence[int],
                  max_per_img: int = MAX_PER_IMG) -> dict[str, torch.Tensor]:
    """The instance output of `KernelIterHead.simple_test`: the top `max_per_img` (proposal, class) pairs of the
    sigmoid scores (one proposal may appear with several labels), each with its proposal's rescaled mask > 0.5.
    Returns {"masks": bool (K, H0, W0), "labels": long (K,), "scores": float (K,)} in descending score order."""
    num_classes = cls_scores.shape[1]
    scores, indices = cls_scores.flatten().topk(min(max_per_img, cls_scores.numel()), sorted=True)
    proposals = torch.div(indices, num_classes, rounding_mode="floor")
    masks = rescale_masks(mask_logits[proposals], pad_shape, img_shape, ori_shape) > MASK_THR
    return {"masks": masks, "labels": indices % num_classes, "scores": scores}


def reference_panoptic_map(result: dict[str, Any], num_classes: int) -> torch.Tensor:
    """The reference's panoptic map of a `panoptic_fusion` result: `category + (id - 1) * 1000` per segment pixel,
    `num_classes` for VOID (int64 (H, W))."""
    pan_seg = result["pan_seg"]
    lookup = torch.full((len(result["segments"]) + 1,), num_classes, dtype=torch.long, device=pan_seg.device)
    for segment in result["segments"]:
        lookup[segment["id"]] = segment["category"] + (segment["id"] - 1) * INSTANCE_OFFSET
    return lookup[pan_seg]
