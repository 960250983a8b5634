"""Backbones of the panoptic/instance K-Net models: mmdet 2.x's ResNet (style 'pytorch', output stride 32) with its
frozen stages and `norm_eval`, optionally with deformable convolutions (mmcv `DeformConv2dPack`, computed with
`torchvision.ops.deform_conv2d`) in stages 2-4, and the Swin-L of `swin.py` (mmdet's det Swin-L has mmseg's keys).

The ResNet's state-dict keys are torchvision's (`conv1`, `bn1`, `layer1-4.{j}.conv1..3/bn1..3/downsample.0-1`, no
`fc`), which are also mmdet's, so torchvision ImageNet weights and the released K-Net backbones load as they are; a
deformable conv2 adds mmcv's `conv2.conv_offset.{weight,bias}` (zero at the start, as mmcv initialises it).
`build_det_backbone(name)` returns a module with `out_channels: list[int]` whose `forward(images)` gives 4 maps at
strides 4/8/16/32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from knetlab.models.backbones import ModelError


class DeformConv2dPack(nn.Module):
    """mmcv's `DeformConv2dPack` (registered as 'DCN'): a 3x3 deformable convolution without bias whose offsets come
    from the plain convolution `conv_offset` (zero-initialised: it starts as a regular convolution). Inputs smaller
    than the kernel are zero-padded and the output cropped back, as mmcv does."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int = 1, dilation: int = 1, deform_groups: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * 2 * kernel_size * kernel_size, kernel_size,
                                     stride=stride, padding=padding, dilation=dilation, bias=True)
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")  # mmcv 1.7 DeformConv2d.reset_parameters
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset = self.conv_offset(x)
        pad_h, pad_w = max(self.kernel_size - x.shape[2], 0), max(self.kernel_size - x.shape[3], 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
            offset = F.pad(offset, (0, pad_w, 0, pad_h))
        # torchvision's offset layout (per kernel point: dy, dx) is mmcv's
        from torchvision.ops import deform_conv2d  # here: torchvision imports torch._dynamo (see backbones.py)

        out = deform_conv2d(x, offset, self.weight, stride=self.stride, padding=self.padding, dilation=self.dilation)
        if pad_h or pad_w:
            out = out[:, :, : out.shape[2] - pad_h, : out.shape[3] - pad_w].contiguous()
        return out


class Bottleneck(nn.Module):
    """mmdet/torchvision Bottleneck, style 'pytorch': the stride sits on the 3x3 conv2."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, *, dcn: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if dcn:
            self.conv2: nn.Module = DeformConv2dPack(planes, planes, 3, stride=stride, padding=1)
        else:
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class DetResNet(nn.Module):
    """mmdet's `ResNet(depth, out_indices=(0,1,2,3), frozen_stages, norm_eval, style='pytorch')` with torchvision's
    keys. `frozen_stages=1` keeps the stem and layer1 in eval mode without gradients; `norm_eval=True` keeps every
    BatchNorm in eval mode while training (its affine parameters still learn outside the frozen stages)."""

    def __init__(self, blocks: Sequence[int], *, base_channels: int = 64, dcn_stages: Sequence[bool] = (False,) * 4,
                 frozen_stages: int = 1, norm_eval: bool = True) -> None:
        super().__init__()
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.conv1 = nn.Conv2d(3, base_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, self.out_channels = base_channels, []
        for i, (num_blocks, dcn) in enumerate(zip(blocks, dcn_stages)):
            planes = base_channels * 2**i
            layer = [Bottleneck(inplanes, planes, 1 if i == 0 else 2, dcn=dcn)]
            inplanes = planes * Bottleneck.expansion
            layer += [Bottleneck(inplanes, planes, dcn=dcn) for _ in range(1, num_blocks)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            self.out_channels.append(inplanes)
        # mmdet's init without pretrained weights (Kaiming fan_out convs, BN 1/0, zero_init_residual: bn3 weight 0);
        # the zoo loads ImageNet weights on top. The offsets start at 0 as with the reference's pretrained start.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
        for m in self.modules():
            if isinstance(m, DeformConv2dPack):
                nn.init.zeros_(m.conv_offset.weight)
        self.min_input_size = 32
        self._freeze_stages()

    def _freeze_stages(self) -> None:
        frozen = [self.conv1, self.bn1] + [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen if self.frozen_stages >= 0 else []:
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode: bool = True) -> DetResNet:
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            outs.append(x)
        return outs


def build_swin_l(drop_path_rate: float) -> nn.Module:
    """mmdet's det Swin-L (embed 192, depths 2-2-18-2, window 7, out norms norm0-3): the same function and
    parameters as mmseg's, i.e. `swin.build_swin('swin-l')`."""
    from knetlab.models.swin import build_swin

    return build_swin("swin-l", img_size=224, drop_path_rate=drop_path_rate)


DCN_C3_C5 = (False, True, True, True)
DET_BACKBONES: dict[str, Callable[[float], nn.Module]] = {
    "r50": lambda rate: DetResNet((3, 4, 6, 3)),
    "r101": lambda rate: DetResNet((3, 4, 23, 3)),
    "r101-dcn": lambda rate: DetResNet((3, 4, 23, 3), dcn_stages=DCN_C3_C5),
    "swin-l": build_swin_l,
    # one bottleneck per stage at a quarter of the width (outputs 64/128/256/512), for CPU tests and the demo
    "tiny": lambda rate: DetResNet((1, 1, 1, 1), base_channels=16),
}
DET_BACKBONE_FAMILIES = {"r50": "resnet", "r101": "resnet", "r101-dcn": "resnet", "swin-l": "swin", "tiny": "resnet"}


def build_det_backbone(name: str, *, drop_path_rate: float = 0.0) -> nn.Module:
    """The det backbone `name` (see DET_BACKBONES), randomly initialised."""
    if name not in DET_BACKBONES:
        raise ModelError(f"unknown det backbone {name!r} (valid: {', '.join(DET_BACKBONES)})")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ModelError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
    return DET_BACKBONES[name](drop_path_rate)
