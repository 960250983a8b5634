"""The necks of panoptic/instance K-Net: mmdet's FPN (P2-P5, 256 channels) and the kernel head's localization
branch, K-Net's `SemanticFPNWrapper` (all four levels brought to stride 8 and summed, a sine positional encoding
added to P5), with mmcv's module names (`lateral_convs.{i}.conv`, `convs_all_levels.{l}.conv{j}.conv/gn`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
    """mmcv's ConvModule as K-Net's det heads build it: conv (bias only without a norm) -> GroupNorm `gn` -> ReLU
    (each optional)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int = 1,
                 num_groups: int | None = 32, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              bias=num_groups is None)
        self.gn = nn.GroupNorm(num_groups, out_channels) if num_groups is not None else None
        self.activate = nn.ReLU(inplace=True) if act else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return self.activate(x) if self.activate is not None else x


class FPN(nn.Module):
    """mmdet's FPN with `num_outs == len(in_channels)` (K-Net's `add_extra_convs='on_input'` then adds nothing): 1x1
    laterals with bias, a top-down sum with nearest upsampling to the lower level's size, 3x3 output convs with bias;
    no norm, no activation. Xavier-uniform init, bias 0."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, num_groups=None, act=False)
                                           for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, num_groups=None, act=False)
                                       for _ in in_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                              mode="nearest")
        return [conv(x) for conv, x in zip(self.fpn_convs, laterals)]


def sine_positional_encoding(x: torch.Tensor, num_feats: int) -> torch.Tensor:
    """mmdet's `SinePositionalEncoding(num_feats, normalize=True)` (temperature 1e4, scale 2 pi, eps 1e-6, offset 0)
    for an all-valid mask over x's (padded) size: (B, 2 * num_feats, H, W), the y channels first."""
    batch, _, height, width = x.shape
    not_mask = torch.ones(batch, height, width, dtype=torch.int, device=x.device)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    eps, scale = 1e-6, 2 * math.pi
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=x.device)
    dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).view(batch, height, width, -1)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).view(batch, height, width, -1)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class SemanticFPNWrapper(nn.Module):
    """K-Net's localization FPN (start_level 0, end_level 3, upsample_times 2, num_aux_convs 1, GN everywhere):

    level 0 (P2): 3x3 stride-2 conv; level 1 (P3): 3x3 conv; level 2 (P4): conv, x2, conv; level 3 (P5 + sine
    positional encoding): conv, x2, conv, x2, conv (bilinear, align_corners=False). The sum of the four stride-8
    maps goes through `conv_pred` (-> localization features) and `aux_convs.0` (-> semantic features), 1x1 each.
    Forward returns [loc, sem]. Every conv ~ N(0, 0.01), GN weight 1 / bias 0."""

    upsample_times = 2
    end_level = 3

    def __init__(self, channels: int = 256, num_groups: int = 32) -> None:
        super().__init__()
        self.channels = channels
        self.convs_all_levels = nn.ModuleList()
        for level in range(self.end_level + 1):
            convs = nn.Sequential()
            if level == 0:
                for j in range(self.end_level - self.upsample_times):
                    convs.add_module(f"conv{j}", ConvModule(channels, channels, 3, stride=2, num_groups=num_groups))
            for j in range(level):
                convs.add_module(f"conv{j}", ConvModule(channels, channels, 3, num_groups=num_groups))
                if j < self.upsample_times - (self.end_level - level):
                    convs.add_module(f"upsample{j}", nn.Upsample(scale_factor=2, mode="bilinear",
                                                                 align_corners=False))
            self.convs_all_levels.append(convs)
        self.conv_pred = ConvModule(channels, channels, 1, num_groups=num_groups)
        self.aux_convs = nn.ModuleList([ConvModule(channels, channels, 1, num_groups=num_groups)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        levels = []
        for level, convs in enumerate(self.convs_all_levels):
            x = inputs[level]
            if level == self.end_level:  # cat_coors_level 3: the encoding is normalised by the padded P5 size
                x = x + sine_positional_encoding(x, self.channels // 2).to(x.dtype)
            levels.append(convs(x))
        fused = sum(levels)
        return [self.conv_pred(fused), self.aux_convs[0](fused)]
