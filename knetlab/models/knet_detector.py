"""KNetDetector: panoptic/instance K-Net (the K-Net repo's `KNet` detector): backbone -> FPN -> kernel head
(`rpn_head`) -> 3 kernel update stages (`roi_head`) -> post-processing.

- Train mode: `model(images (B, 3, Hp, Wp), targets) -> dict` of weighted losses (`rpn_*`, `s{i}_*`; their sum is
  the training loss), from `knetlab.models.det_losses.knet_det_losses`. Targets are per image
  `{"masks": bool (G, h, w), "labels": long (G,), "sem_seg": long (h, w) | None}`, padded here to (Hp, Wp).
- Eval mode: `model(images, metas) -> list[dict]` per image at `meta["ori_shape"]` (`img_shape` is the unpadded
  size inside the batch): panoptic `{"pan_seg", "segments"}`, instance `{"masks", "labels", "scores"}`
  (see panoptic_fusion.py).
- `raw_outputs(images)`: the last stage's `cls_logits` (B, N, C) and stride-4 `mask_logits` (B, N, Hp/4, Wp/4).
Images are normalised float, zero-padded to a multiple of 32 (`knetlab.data` batches them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from knetlab.models.backbones import ModelError
from knetlab.models.fpn import FPN
from knetlab.models.knet_det_heads import ConvKernelHead, KernelIterHead
from knetlab.models.panoptic_fusion import instance_topk, panoptic_fusion, rescale_masks

IGNORE_INDEX = 255
SIZE_DIVISOR = 32


class KNetDetector(nn.Module):
    def __init__(self, backbone: nn.Module, neck: FPN, rpn_head: ConvKernelHead, roi_head: KernelIterHead, *,
                 num_thing_classes: int, num_stuff_classes: int, name: str = "knet-det") -> None:
        super().__init__()
        self.backbone, self.neck, self.rpn_head, self.roi_head = backbone, neck, rpn_head, roi_head
        self.num_thing_classes, self.num_stuff_classes = num_thing_classes, num_stuff_classes
        self.num_classes = num_thing_classes + num_stuff_classes
        self.num_proposals = rpn_head.num_proposals
        self.task = "panoptic" if num_stuff_classes > 0 else "instance"
        self.name = name

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height % SIZE_DIVISOR or width % SIZE_DIVISOR or min(height, width) < SIZE_DIVISOR:
            raise ModelError(f"{self.name}: images must be padded to a multiple of {SIZE_DIVISOR} (at least "
                             f"{SIZE_DIVISOR}), got {height}x{width} (knetlab.data's batch_images pads them)")

    def extract_feat(self, images: torch.Tensor) -> list[torch.Tensor]:
        self.check_images(images)
        return self.neck(self.backbone(images))

    def forward_heads(self, images: torch.Tensor, upsample_all: bool) -> tuple[dict, list[dict]]:
        """(kernel head outputs, per-stage outputs), see ConvKernelHead and KernelIterHead."""
        rpn = self.rpn_head(self.extract_feat(images))
        stages = self.roi_head(rpn["x_feats"], rpn["kernels"], rpn["mask_preds"], upsample_all=upsample_all)
        return rpn, stages

    def raw_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The last stage's class logits (B, N, C) and stride-4 mask logits (B, N, Hp/4, Wp/4), before any sigmoid."""
        _, stages = self.forward_heads(images, upsample_all=False)
        return {"cls_logits": stages[-1]["cls_logits"], "mask_logits": stages[-1]["scaled_mask_logits"]}

    def forward(self, images: torch.Tensor, targets_or_metas: Sequence[Mapping[str, Any]]):
        if len(targets_or_metas) != images.shape[0]:
            raise ModelError(f"{self.name}: {images.shape[0]} images but {len(targets_or_metas)} "
                             f"{'targets' if self.training else 'metas'}")
        if self.training:
            return self.losses(images, targets_or_metas)
        return self.predict(images, targets_or_metas)

    def predict(self, images: torch.Tensor, metas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Per-image results at `meta["ori_shape"]` (eval mode)."""
        return self.postprocess(self.raw_outputs(images), tuple(images.shape[-2:]), metas)

    def postprocess(self, outputs: Mapping[str, torch.Tensor], pad_shape: Sequence[int],
                    metas: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """`raw_outputs` of a batch padded to `pad_shape` -> per-image results (panoptic fusion or instance top-k)."""
        results = []
        for cls_logits, mask_logits, meta in zip(outputs["cls_logits"], outputs["mask_logits"], metas):
            img_shape, ori_shape = _meta_shape(meta, "img_shape", self.name), _meta_shape(meta, "ori_shape", self.name)
            scores = cls_logits.float().sigmoid()
            if self.task == "panoptic":
                probs = rescale_masks(mask_logits.float(), pad_shape, img_shape, ori_shape)
                results.append(panoptic_fusion(scores, probs, self.num_proposals, self.num_thing_classes))
            else:
                results.append(instance_topk(scores, mask_logits.float(), pad_shape, img_shape, ori_shape))
        return results

    def losses(self, images: torch.Tensor, targets: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        """The weighted losses of the kernel head (on its 100 thing masks) and of every stage, all at stride 4."""
        # imported here: the loss module (Hungarian matching, scipy) is only needed in training
        from knetlab.models.det_losses import knet_det_losses

        padded = [pad_target(t, images.shape[-2:], self.task, self.name) for t in targets]
        rpn, stages = self.forward_heads(images, upsample_all=True)
        upsample = dict(scale_factor=2, mode="bilinear", align_corners=False)
        rpn_out = {"mask_logits": F.interpolate(rpn["thing_mask_preds"], **upsample),
                   "seg_logits": F.interpolate(rpn["seg_preds"], **upsample)}
        stage_outs = [{"cls_logits": s["cls_logits"], "mask_logits": s["scaled_mask_logits"]} for s in stages]
        return knet_det_losses(rpn_out, stage_outs, padded, num_thing_classes=self.num_thing_classes,
                               num_stuff_classes=self.num_stuff_classes)


def _meta_shape(meta: Mapping[str, Any], key: str, name: str) -> tuple[int, int]:
    if key not in meta:
        raise ModelError(f"{name}: eval needs meta[{key!r}] (got keys {', '.join(map(str, meta))})")
    return int(meta[key][0]), int(meta[key][1])


def pad_target(target: Mapping[str, Any], size: Sequence[int], task: str, name: str = "knet-det") -> dict:
    """A training target padded at the bottom/right to the batch size: masks with 0, sem_seg with 255 (VOID)."""
    masks, labels = target.get("masks"), target.get("labels")
    if masks is None or labels is None or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
        raise ModelError(f"{name}: a target needs masks (G, h, w) and labels (G,), got "
                         f"{None if masks is None else tuple(masks.shape)} and "
                         f"{None if labels is None else tuple(labels.shape)}")
    height, width = size
    pad_h, pad_w = height - masks.shape[-2], width - masks.shape[-1]
    if pad_h < 0 or pad_w < 0:
        raise ModelError(f"{name}: target masks {tuple(masks.shape[-2:])} are larger than the images {tuple(size)}")
    sem_seg = target.get("sem_seg")
    if task == "panoptic":
        if sem_seg is None or tuple(sem_seg.shape) != tuple(masks.shape[-2:]):
            raise ModelError(f"{name}: a panoptic target needs sem_seg of the masks' size {tuple(masks.shape[-2:])}, "
                             f"got {None if sem_seg is None else tuple(sem_seg.shape)}")
        sem_seg = F.pad(sem_seg, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
    else:
        sem_seg = None
    return {"masks": F.pad(masks, (0, pad_w, 0, pad_h), value=False), "labels": labels, "sem_seg": sem_seg}
