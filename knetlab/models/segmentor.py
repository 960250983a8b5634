"""KNetSegmentor: backbone -> K-Net decode head (+ auxiliary FCN head in training), mmsegmentation's EncoderDecoder
for K-Net. Train mode: `model(images, labels) -> {"loss_s0", ..., "loss_s3", "loss_aux"}` (already weighted: sum
them for the total); eval mode: `model(images) -> logits (B, num_classes, H, W)` at the input size.

Images are normalised float (B, 3, H, W); labels are int64 (B, H, W) with 255 = ignore. Built with plain
BatchNorm2d: the trainer converts to SyncBatchNorm when it runs distributed on GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from knetlab.models.backbones import ModelError, check_input_size
from knetlab.models.heads import DecodeHead, resize
from knetlab.models.knet_head import IterativeDecodeHead
from knetlab.models.losses import IGNORE_INDEX, seg_cross_entropy


class KNetSegmentor(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        decode_head: IterativeDecodeHead,
        auxiliary_head: DecodeHead | None = None,
        *,
        aux_loss_weight: float = 0.4,
        ignore_index: int = IGNORE_INDEX,
        name: str = "knet",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.aux_loss_weight = aux_loss_weight
        self.ignore_index = ignore_index
        self.num_classes = decode_head.num_classes
        self.name = name

    def extract_feat(self, images: torch.Tensor) -> list[torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ModelError(f"{self.name}: images must be (B, 3, H, W), got {tuple(images.shape)}")
        check_input_size(self.backbone, *images.shape[-2:], name=f"{self.name}'s backbone")
        return self.backbone(images)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        if not self.training:
            if labels is not None:
                raise ModelError(f"{self.name}: labels are only taken in train mode (call model.train() for losses)")
            logits = self.decode_head(self.extract_feat(images))
            return resize(logits, images.shape[-2:])
        if labels is None:
            raise ModelError(f"{self.name}: train mode needs model(images, labels); call model.eval() for logits")
        if labels.shape != (images.shape[0], *images.shape[-2:]):
            raise ModelError(
                f"{self.name}: labels must be (B, H, W) = {(images.shape[0], *images.shape[-2:])}, "
                f"got {tuple(labels.shape)}"
            )
        return self.losses(self.extract_feat(images), labels)

    def losses(self, feats: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The 4 decode losses (weight 1) and the auxiliary loss (weight `aux_loss_weight`)."""
        losses = {
            f"loss_s{i}": seg_cross_entropy(logits, labels, ignore_index=self.ignore_index)
            for i, logits in enumerate(self.decode_head(feats))
        }
        if self.auxiliary_head is not None:
            losses["loss_aux"] = seg_cross_entropy(
                self.auxiliary_head(feats), labels, ignore_index=self.ignore_index, weight=self.aux_loss_weight
            )
        return losses
