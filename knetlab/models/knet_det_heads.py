"""The heads of panoptic/instance K-Net (K-Net repo `knet/det`): the kernel head `ConvKernelHead` (localization FPN,
100 learned proposal kernels, the semantic `conv_seg`, stuff kernels appended for panoptic) and `KernelIterHead`,
3 det `KernelUpdateHead`s (256-d kernels, K=1) that refine kernels, masks and class scores at stride 8.

Reference quirks kept (docs/knet_panoptic_reference.md §2, Q2-Q4, Q12): groups are hard masks (sigmoid > 0.5) and pooled
features are sums; stuff kernels are `conv_seg.weight[T:]` without bias or object features, stuff masks
`seg_preds[:, T:]` with bias; stages group and predict on `feat_transform(x_feats)`; a stage passes its post-FFN
object features on; the update heads are xavier-initialised and `init_kernels` ~ N(0, 1).
Parameter names are the reference's (`rpn_head.*`, `roi_head.mask_head.{i}.*`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knetlab.models.fpn import ConvModule, SemanticFPNWrapper
from knetlab.models.knet_head import FFN, KernelUpdator, MultiheadAttention

PRIOR_BIAS = -math.log((1 - 0.01) / 0.01)  # mmcv bias_init_with_prob(0.01) = -4.595


def hard_group_features(mask_logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Sum of the features over each mask's pixels with sigmoid > 0.5: (B, N, h, w), (B, C, h, w) -> (B, N, C), in
    float32 even under autocast (a sum over a mask's pixels can overflow float16)."""
    with torch.autocast(features.device.type, enabled=False):
        return torch.einsum("bnhw,bchw->bnc", (mask_logits.sigmoid() > 0.5).float(), features.float())


class ConvKernelHead(nn.Module):
    """K-Net's kernel head (`rpn_head`): returns the stride-8 features every stage works on, the initial kernels
    (B, N, C) and mask logits (B, N, H/8, W/8) (N = proposals + stuff classes for panoptic), and the semantic logits
    `seg_preds` (B, T + S, H/8, W/8) that its loss uses. It predicts no classes."""

    def __init__(self, channels: int = 256, num_proposals: int = 100, num_thing_classes: int = 80,
                 num_stuff_classes: int = 0, num_groups: int = 32) -> None:
        super().__init__()
        self.num_proposals, self.num_thing_classes = num_proposals, num_thing_classes
        self.cat_stuff_mask = num_stuff_classes > 0
        self.localization_fpn = SemanticFPNWrapper(channels, num_groups)
        self.init_kernels = nn.Conv2d(channels, num_proposals, 1, bias=False)
        self.conv_seg = nn.Conv2d(channels, num_thing_classes + num_stuff_classes, 1)
        self.loc_convs = nn.ModuleList([ConvModule(channels, channels, 1, num_groups=num_groups)])
        self.seg_convs = nn.ModuleList([ConvModule(channels, channels, 1, num_groups=num_groups)])
        for conv in (self.loc_convs[0].conv, self.seg_convs[0].conv):
            nn.init.normal_(conv.weight, std=0.01)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, PRIOR_BIAS)
        nn.init.normal_(self.init_kernels.weight, std=1.0)  # kernel_init_std=1

    def forward(self, feats: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        loc_feats, sem_feats = self.localization_fpn(feats)
        loc_feats = self.loc_convs[0](loc_feats)
        mask_preds = self.init_kernels(loc_feats)
        sem_feats = self.seg_convs[0](sem_feats)
        seg_preds = self.conv_seg(sem_feats)
        x_feats = sem_feats + loc_feats
        batch = x_feats.shape[0]
        kernels = self.init_kernels.weight.clone()[None].expand(batch, -1, -1, -1, -1)
        obj_feats = hard_group_features(mask_preds, x_feats)  # proposal_feats_with_obj, use_binary
        kernels = kernels + obj_feats.view(batch, self.num_proposals, -1, 1, 1)
        thing_mask_preds = mask_preds
        if self.cat_stuff_mask:
            mask_preds = torch.cat([mask_preds, seg_preds[:, self.num_thing_classes:]], dim=1)
            stuff_kernels = self.conv_seg.weight[self.num_thing_classes:].clone()[None].expand(batch, -1, -1, -1, -1)
            kernels = torch.cat([kernels, stuff_kernels], dim=1)
        return {"x_feats": x_feats, "kernels": kernels, "mask_preds": mask_preds,
                "thing_mask_preds": thing_mask_preds, "seg_preds": seg_preds}


class KernelUpdateHead(nn.Module):
    """One det K-Net stage (`roi_head.mask_head.{i}`): transform the features (1x1 conv), group them by the previous
    hard masks, update the kernels (KernelUpdator), attend across kernels, FFN, then class logits and mask kernels
    that give the new masks on the transformed features."""

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8,
                 feedforward_channels: int = 2048) -> None:
        super().__init__()
        self.channels = channels
        self.attention = MultiheadAttention(channels, num_heads)
        self.attention_norm = nn.LayerNorm(channels)
        self.kernel_update_conv = KernelUpdator(channels, channels, channels)
        self.feat_transform = ConvModule(channels, channels, 1, num_groups=None, act=False)
        self.ffn = FFN(channels, feedforward_channels)
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = nn.ModuleList([nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels),
                                      nn.ReLU(inplace=True)])
        self.fc_cls = nn.Linear(channels, num_classes)
        self.mask_fcs = nn.ModuleList([nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels),
                                       nn.ReLU(inplace=True)])
        self.fc_mask = nn.Linear(channels, channels)
        nn.init.zeros_(self.feat_transform.conv.bias)  # ConvModule's init; MHA biases start at 0 in torch too
        for param in self.parameters():  # KernelUpdateHead.init_weights: xavier on matrices, other biases as built
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
        nn.init.constant_(self.fc_cls.bias, PRIOR_BIAS)

    def forward(self, x: torch.Tensor, kernels: torch.Tensor,
                mask_preds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: x_feats (B, C, H, W); kernels (B, N, C, 1, 1); mask_preds: previous logits (B, N, h, w).
        Returns class logits (B, N, num_classes), new mask logits (B, N, H, W), kernels (B, N, C, 1, 1)."""
        batch, num_kernels = kernels.shape[:2]
        x = self.feat_transform(x)
        channels, height, width = x.shape[-3:]
        if mask_preds.shape[-2:] != (height, width):
            mask_preds = F.interpolate(mask_preds, (height, width), mode="bilinear", align_corners=False)
        grouped = hard_group_features(mask_preds, x)
        kernels = kernels.reshape(batch, num_kernels, self.channels, -1).permute(0, 1, 3, 2)
        obj_feat = self.kernel_update_conv(grouped, kernels)
        obj_feat = obj_feat.reshape(batch, num_kernels, -1).permute(1, 0, 2)  # (N, B, C): attend across kernels
        obj_feat = self.attention_norm(self.attention(obj_feat)).permute(1, 0, 2)
        obj_feat = obj_feat.reshape(batch, num_kernels, -1, self.channels)
        obj_feat = self.ffn_norm(self.ffn(obj_feat))

        cls_feat, mask_feat = obj_feat.sum(-2), obj_feat
        for layer in self.cls_fcs:
            cls_feat = layer(cls_feat)
        for layer in self.mask_fcs:
            mask_feat = layer(mask_feat)
        cls_score = self.fc_cls(cls_feat).view(batch, num_kernels, -1)
        # the reference's permute + reshape: the CPU convolution's rounding depends on the weight's memory layout
        mask_feat = self.fc_mask(mask_feat).permute(0, 1, 3, 2).reshape(batch, num_kernels, channels, 1, 1)
        new_masks = torch.cat([F.conv2d(x[i : i + 1], mask_feat[i]) for i in range(batch)], dim=0)
        new_masks = new_masks.reshape(batch, num_kernels, height, width)
        next_kernels = obj_feat.permute(0, 1, 3, 2).reshape(batch, num_kernels, self.channels, 1, 1)
        return cls_score, new_masks, next_kernels


class KernelIterHead(nn.Module):
    """`roi_head`: the update stages in turn. `forward(x_feats, kernels, mask_preds, upsample_all)` returns one dict
    per stage: `cls_logits`, `mask_preds` (stride 8) and `scaled_mask_logits` (x2 bilinear to stride 4) for the last
    stage, or for every stage when `upsample_all` (training: every stage has a loss)."""

    def __init__(self, stages: Sequence[KernelUpdateHead]) -> None:
        super().__init__()
        self.mask_head = nn.ModuleList(stages)

    def forward(self, x_feats: torch.Tensor, kernels: torch.Tensor, mask_preds: torch.Tensor,
                upsample_all: bool = False) -> list[dict[str, torch.Tensor]]:
        results = []
        for i, stage in enumerate(self.mask_head):
            cls_score, mask_preds, kernels = stage(x_feats, kernels, mask_preds)
            result = {"cls_logits": cls_score, "mask_preds": mask_preds, "kernels": kernels}
            if upsample_all or i == len(self.mask_head) - 1:
                result["scaled_mask_logits"] = F.interpolate(mask_preds, scale_factor=2, mode="bilinear",
                                                             align_corners=False)
            results.append(result)
        return results
