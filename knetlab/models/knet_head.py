"""K-Net's decode head for semantic segmentation: kernel update heads refining the kernel-generating head's
class kernels (one kernel per class), as mmsegmentation's `knet_head.py` computes them.

Quirks of the released models that are kept on purpose (docs/knet_reference.md §2.3, §2.5):
- the updator works on 256-channel chunks of the 512-channel kernels (2 chunks sharing its weights);
- a stage returns its post-FFN object features, not the `fc_mask` output, as the next stage's kernels;
- the stage-0 kernels are a clone of `conv_seg.weight` (its bias is not used);
- the update heads keep PyTorch's default init: the reference's xavier init never ran.
Parameter names mirror mmcv's (`attention.attn.in_proj_weight`, `ffn.layers.0.0.weight`, ...).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knetlab.models.heads import ConvNormAct, DecodeHead, resize


class KernelUpdator(nn.Module):
    """The gated kernel update of K-Net (Eq. 4-5): group features and old kernels, both cut into chunks of
    `in_channels`, are mixed through an input gate and an update gate."""

    def __init__(self, in_channels: int = 256, feat_channels: int = 256, out_channels: int = 256) -> None:
        super().__init__()
        if in_channels != feat_channels:
            # the gates are Linear(in_channels, ...) applied to feat_channels-wide products, as in the reference
            raise ValueError(f"KernelUpdator needs in_channels == feat_channels, got {in_channels}, {feat_channels}")
        self.in_channels = in_channels
        self.feat_channels = feat_channels
        self.out_channels = out_channels
        self.dynamic_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_layer = nn.Linear(in_channels, 2 * feat_channels)
        self.input_gate = nn.Linear(in_channels, feat_channels)
        self.update_gate = nn.Linear(in_channels, feat_channels)
        self.norm_in = nn.LayerNorm(feat_channels)
        self.norm_out = nn.LayerNorm(feat_channels)
        self.input_norm_in = nn.LayerNorm(feat_channels)
        self.input_norm_out = nn.LayerNorm(feat_channels)
        self.activation = nn.ReLU(inplace=True)
        self.fc_layer = nn.Linear(feat_channels, out_channels)
        self.fc_norm = nn.LayerNorm(out_channels)

    def forward(self, update_feature: torch.Tensor, input_feature: torch.Tensor) -> torch.Tensor:
        """update_feature: grouped features (..., C); input_feature: old kernels (..., C) with C a multiple of
        in_channels. Returns (chunks, 1, out_channels), chunks = numel / in_channels. In float32 even under autocast:
        the grouped features are sums over pixels, too large for float16; the output is layer-normed (unit scale)."""
        with torch.autocast(update_feature.device.type, enabled=False):
            return self.update(update_feature.float(), input_feature.float())

    def update(self, update_feature: torch.Tensor, input_feature: torch.Tensor) -> torch.Tensor:
        update_feature = update_feature.reshape(-1, self.in_channels)
        num_chunks = update_feature.size(0)
        parameters = self.dynamic_layer(update_feature)
        param_in = parameters[:, : self.feat_channels]
        param_out = parameters[:, -self.feat_channels :]

        input_feats = self.input_layer(input_feature.reshape(num_chunks, -1, self.feat_channels))
        input_in = input_feats[..., : self.feat_channels]
        input_out = input_feats[..., -self.feat_channels :]

        gate_feats = input_in * param_in.unsqueeze(-2)
        input_gate = self.input_norm_in(self.input_gate(gate_feats)).sigmoid()
        update_gate = self.norm_in(self.update_gate(gate_feats)).sigmoid()
        param_out = self.norm_out(param_out)
        input_out = self.input_norm_out(input_out)

        features = update_gate * param_out.unsqueeze(-2) + input_gate * input_out
        return self.activation(self.fc_norm(self.fc_layer(features)))


class MultiheadAttention(nn.Module):
    """mmcv's MultiheadAttention as K-Net uses it: `x + MHA(x, x, x)` over (sequence, batch, channels), the
    torch module under the name `attn`."""

    def __init__(self, embed_dims: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # need_weights left at its default (True), as mmcv calls it: torch then runs the same (non-fused) attention
        # as mmseg, rounding alike; the fused path's float32 differences grow ~100x over K-Net's three stages
        return x + self.attn(x, x, x)[0]


class FFN(nn.Module):
    """mmcv's FFN with two fully connected layers and the identity added: `x + fc2(relu(fc1(x)))`."""

    def __init__(self, embed_dims: int, feedforward_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), nn.ReLU(inplace=True), nn.Dropout(dropout)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x)


class KernelUpdateHead(nn.Module):
    """One K-Net stage: group the features by the previous masks, update the kernels, let them attend to each other,
    and predict new masks (= class logits) with a per-image 1x1 convolution."""

    def __init__(
        self,
        in_channels: int = 512,
        num_heads: int = 8,
        feedforward_channels: int = 2048,
        updator_channels: int = 256,
        num_mask_fcs: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if in_channels % updator_channels:
            raise ValueError(f"in_channels {in_channels} is not a multiple of updator_channels {updator_channels}")
        if in_channels % num_heads:
            raise ValueError(f"in_channels {in_channels} is not a multiple of num_heads {num_heads}")
        self.in_channels = in_channels
        self.attention = MultiheadAttention(in_channels, num_heads, dropout)
        self.attention_norm = nn.LayerNorm(in_channels)
        self.kernel_update_conv = KernelUpdator(updator_channels, updator_channels, updator_channels)
        self.feat_transform = ConvNormAct(in_channels, in_channels, 1, norm=False, act=False)
        self.ffn = FFN(in_channels, feedforward_channels, dropout)
        self.ffn_norm = nn.LayerNorm(in_channels)
        mask_fcs: list[nn.Module] = []
        for _ in range(num_mask_fcs):
            mask_fcs += [nn.Linear(in_channels, in_channels, bias=False), nn.LayerNorm(in_channels), nn.ReLU(True)]
        self.mask_fcs = nn.ModuleList(mask_fcs)
        self.fc_mask = nn.Linear(in_channels, in_channels)

    def forward(
        self, x: torch.Tensor, kernels: torch.Tensor, mask_preds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: features (B, C, H, W); kernels: (B, N, C); mask_preds: previous logits (B, N, h, w).
        Returns the new logits (B, N, H, W) and the kernels for the next stage (B, N, C)."""
        batch, num_kernels = kernels.shape[:2]
        x = self.feat_transform(x)
        height, width = x.shape[-2:]
        if mask_preds.shape[-2:] != (height, width):
            mask_preds = resize(mask_preds, (height, width))
        # Group features: a softmax-weighted sum over pixels, not normalised by the mask area. In float32 even under
        # autocast: a sum over thousands of pixels overflows float16 (max 65504).
        with torch.autocast(x.device.type, enabled=False):
            grouped = torch.einsum("bnhw,bchw->bnc", mask_preds.float().softmax(dim=1), x.float())

        obj_feat = self.kernel_update_conv(grouped, kernels)
        obj_feat = obj_feat.reshape(batch, num_kernels, -1).permute(1, 0, 2)  # (N, B, C): attend across kernels
        obj_feat = self.attention_norm(self.attention(obj_feat)).permute(1, 0, 2)
        obj_feat = self.ffn_norm(self.ffn(obj_feat))

        mask_feat = obj_feat
        for layer in self.mask_fcs:
            mask_feat = layer(mask_feat)
        mask_feat = self.fc_mask(mask_feat)

        # kernels (B, N, C, 1, 1) with the strides mmseg's permute + reshape gives them: the CPU convolution is chosen
        # by the weight's memory layout, and only mmseg's layout rounds exactly as mmseg does
        mask_kernels = mask_feat.reshape(batch, num_kernels, 1, -1).permute(0, 1, 3, 2)
        mask_kernels = mask_kernels.reshape(batch, num_kernels, -1, 1, 1)
        new_masks = torch.cat([F.conv2d(x[i : i + 1], mask_kernels[i]) for i in range(batch)], dim=0)
        return new_masks, obj_feat


class IterativeDecodeHead(nn.Module):
    """The kernel-generating head's logits and kernels (`conv_seg.weight`), refined by `num_stages` update heads.
    Train mode returns the logits of every stage [s0, ..., s_num_stages]; eval mode the last stage's."""

    def __init__(self, kernel_generate_head: DecodeHead, kernel_update_head: Sequence[KernelUpdateHead]) -> None:
        super().__init__()
        self.kernel_generate_head = kernel_generate_head
        self.kernel_update_head = nn.ModuleList(kernel_update_head)
        self.num_stages = len(self.kernel_update_head)
        self.num_classes = kernel_generate_head.num_classes
        self.out_channels = self.num_classes

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        head = self.kernel_generate_head
        x = head.forward_feature(feats)
        logits = head.cls_seg(x)
        weight = head.conv_seg.weight
        kernels = weight.clone().reshape(weight.shape[0], -1)[None].expand(x.shape[0], -1, -1)
        stage_logits = [logits]
        for update_head in self.kernel_update_head:
            logits, kernels = update_head(x, kernels, logits)
            stage_logits.append(logits)
        return stage_logits if self.training else stage_logits[-1]
