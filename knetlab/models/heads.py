"""Kernel-generating heads (FCN, PSP, ASPP, UPerNet) and the auxiliary FCN head, as mmsegmentation builds them.

Module and parameter names mirror mmsegmentation's (`convs.0.conv`, `psp_modules.0.1.bn`, `conv_seg`, ...) so that
released checkpoints load without renaming. Each head's `forward_feature(feats)` is the map before dropout and
`conv_seg` (K-Net's kernel update heads work on it); `forward(feats)` gives the class logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knetlab.models.backbones import ModelError


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d -> ReLU, named like mmcv's ConvModule (`conv`, `bn`, `activate`); the conv has a bias
    only when there is no norm, and starts with mmcv's Kaiming-normal (fan_out) init, which ConvModule applies
    when it is built."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        padding: int = 0,
        dilation: int = 1,
        norm: bool = True,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=not norm
        )
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.activate = nn.ReLU(inplace=True) if act else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activate is not None:
            x = self.activate(x)
        return x


def resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize with align_corners=False, as every K-Net config does it."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class DecodeHead(nn.Module):
    """What every mmseg decode head has: `dropout` (Dropout2d) then `conv_seg` (1x1, Normal(0, 0.01), bias 0)."""

    def __init__(self, channels: int, num_classes: int, dropout_ratio: float = 0.1) -> None:
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout_ratio) if dropout_ratio > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward_feature(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def cls_seg(self, feature: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(feature))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.cls_seg(self.forward_feature(feats))


class FCNHead(DecodeHead):
    """`num_convs` 3x3 ConvModules on feats[in_index]; with `concat_input` the input is concatenated to their
    output and fused by a further 3x3 ConvModule (`conv_cat`)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        in_index: int = 3,
        num_convs: int = 2,
        concat_input: bool = True,
        kernel_size: int = 3,
        dilation: int = 1,
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        if num_convs < 0:
            raise ValueError(f"FCNHead num_convs must be >= 0, got {num_convs}")
        self.in_index = in_index
        self.concat_input = concat_input
        padding = (kernel_size // 2) * dilation
        convs = [
            ConvNormAct(in_channels if i == 0 else channels, channels, kernel_size, padding=padding, dilation=dilation)
            for i in range(num_convs)
        ]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if concat_input:
            self.conv_cat = ConvNormAct(in_channels + channels, channels, kernel_size, padding=kernel_size // 2)

    def forward_feature(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index]
        out = self.convs(x)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1))
        return out


class PPM(nn.ModuleList):
    """Pyramid pooling: per scale, adaptive average pooling then a 1x1 ConvModule, upsampled back to the input."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), ConvNormAct(in_channels, channels, 1)) for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [resize(branch(x), x.shape[2:]) for branch in self]


class PSPHead(DecodeHead):
    """PSPNet: the input, concatenated with its pyramid pooling branches, fused by a 3x3 ConvModule."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        in_index: int = 3,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        self.psp_modules = PPM(pool_scales, in_channels, channels)
        self.bottleneck = ConvNormAct(in_channels + len(pool_scales) * channels, channels, 3, padding=1)

    def forward_feature(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index]
        return self.bottleneck(torch.cat([x, *self.psp_modules(x)], dim=1))


class ASPPHead(DecodeHead):
    """DeepLabV3: an image-pooling branch plus one ConvModule per dilation (1x1 for dilation 1, else 3x3),
    concatenated and fused by a 3x3 ConvModule."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        *,
        in_index: int = 3,
        dilations: Sequence[int] = (1, 12, 24, 36),
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        self.in_index = in_index
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvNormAct(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList(
            ConvNormAct(in_channels, channels, 1 if d == 1 else 3, padding=0 if d == 1 else d, dilation=d)
            for d in dilations
        )
        self.bottleneck = ConvNormAct((len(dilations) + 1) * channels, channels, 3, padding=1)

    def forward_feature(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[self.in_index]
        outs = [resize(self.image_pool(x), x.shape[2:])]
        outs.extend(branch(x) for branch in self.aspp_modules)
        return self.bottleneck(torch.cat(outs, dim=1))


class UPerHead(DecodeHead):
    """UPerNet: pyramid pooling on the last level, a top-down FPN over all levels, every level upsampled to the
    first and fused by a 3x3 ConvModule (`fpn_bottleneck`)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        num_classes: int,
        *,
        in_index: Sequence[int] = (0, 1, 2, 3),
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout_ratio: float = 0.1,
    ) -> None:
        super().__init__(channels, num_classes, dropout_ratio)
        in_channels = list(in_channels)
        if len(in_channels) != len(in_index):
            raise ValueError(f"UPerHead needs one in_channels per in_index, got {in_channels} and {list(in_index)}")
        self.in_index = list(in_index)
        self.psp_modules = PPM(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvNormAct(in_channels[-1] + len(pool_scales) * channels, channels, 3, padding=1)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvNormAct(channels, channels, 3, padding=1) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvNormAct(len(in_channels) * channels, channels, 3, padding=1)

    def forward_feature(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        inputs = [feats[i] for i in self.in_index]
        laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
        top = inputs[-1]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(laterals[i]) for i, conv in enumerate(self.fpn_convs)]
        outs.append(laterals[-1])
        outs = [outs[0]] + [resize(out, outs[0].shape[2:]) for out in outs[1:]]
        return self.fpn_bottleneck(torch.cat(outs, dim=1))


HEADS: dict[str, type[DecodeHead]] = {"fcn": FCNHead, "psp": PSPHead, "aspp": ASPPHead, "upernet": UPerHead}


def build_kernel_generate_head(
    name: str, in_channels: Sequence[int], channels: int, num_classes: int, dropout_ratio: float = 0.1
) -> DecodeHead:
    """The K-Net kernel-generating head `name` (see HEADS) on a backbone with `in_channels` per level, with the
    settings of the released configs (FCN: 2 convs + concat; PSP: scales 1,2,3,6; ASPP: dilations 1,12,24,36;
    UPerNet: all 4 levels). Single-level heads read the last level."""
    if name not in HEADS:
        raise ModelError(f"unknown head {name!r} (valid: {', '.join(HEADS)})")
    in_channels = list(in_channels)
    if name == "upernet":
        return UPerHead(in_channels, channels, num_classes, dropout_ratio=dropout_ratio)
    return HEADS[name](in_channels[3], channels, num_classes, in_index=3, dropout_ratio=dropout_ratio)


def build_auxiliary_head(
    in_channels: Sequence[int], channels: int, num_classes: int, in_index: int = 2, dropout_ratio: float = 0.1
) -> FCNHead:
    """The auxiliary FCN head of every K-Net config: one 3x3 ConvModule on level `in_index`, no concat."""
    return FCNHead(
        list(in_channels)[in_index], channels, num_classes,
        in_index=in_index, num_convs=1, concat_input=False, dropout_ratio=dropout_ratio,
    )
