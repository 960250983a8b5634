"""Backbones by name: timm ResNets (mmsegmentation's ResNetV1c) and the Swin transformers of `swin.py`.

Every backbone is an `nn.Module` with `out_channels: list[int]`, `min_input_size: int` and
`input_size_divisor: int`, whose `forward(images)` returns 4 NCHW feature maps (strides 4, 8, 16/8, 32/8).

The ResNets are timm `features_only` models whose parameter names are timm's own (`conv1.*`, `bn1.*`, `layer1-4.*`),
so a released mmsegmentation checkpoint maps onto them by renaming the 6 stem keys (see `state_dict.py`).
Pretrained weights are loaded by the zoo (`pretrained.py`), not here, so that nothing here imports the converters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from knetlab.models.errors import ModelError

__all__ = ["BACKBONES", "BackboneInfo", "ModelError", "backbone_info", "build_backbone", "check_input_size"]


@dataclass(frozen=True)
class BackboneInfo:
    """What a backbone name stands for."""

    description: str
    build: Callable[..., nn.Module]
    family: str  # "resnet" | "swin": selects the checkpoint key conversions
    default_drop_path_rate: float


def _timm_resnet(
    *, output_stride: int, drop_path_rate: float, min_input_size: int = 32, **resnet_args
) -> nn.Module:
    import timm  # here, not at the top: timm imports torchvision and torch._dynamo (about 2 CPU-s), which a process
    # that only reads the zoo's specs (a CLI driver, a sweep's trial actor) never needs

    # resnet50c is ResNetV1c: deep 3x3 stem (32-32-64), no average-pool downsample; with output_stride=8 timm dilates
    # layer3/4 with contracted dilation (first block 1 resp. 2), exactly mmseg's `contract_dilation=True`.
    model = timm.create_model(
        "resnet50c",
        pretrained=False,
        features_only=True,
        out_indices=(1, 2, 3, 4),
        output_stride=output_stride,
        drop_path_rate=drop_path_rate,
        **resnet_args,
    )
    model.out_channels = list(model.feature_info.channels())
    model.min_input_size = min_input_size
    model.input_size_divisor = 1  # convolutions take any size; the heads resize to the lateral map's size
    return model


def build_r50_d8(*, img_size: int, drop_path_rate: float) -> nn.Module:
    """ResNetV1c-50 with output stride 8 (mmseg `strides=(1,2,1,1), dilations=(1,1,2,4), contract_dilation=True`)."""
    return _timm_resnet(output_stride=8, drop_path_rate=drop_path_rate)


def build_r50(*, img_size: int, drop_path_rate: float) -> nn.Module:
    """ResNetV1c-50 with output stride 32 (what the released "KNet + UperNet R-50-D8" config really uses)."""
    return _timm_resnet(output_stride=32, drop_path_rate=drop_path_rate)


def build_tiny(*, img_size: int, drop_path_rate: float) -> nn.Module:
    """A 4-block ResNetV1c (one bottleneck per stage, channels 64/128/256/512 out), output stride 8: the same code
    path as `r50-d8` at about 2 % of its size, for CPU tests and the demo."""
    return _timm_resnet(
        output_stride=8, drop_path_rate=drop_path_rate, layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_width=16
    )


def _swin_builder(variant: str) -> Callable[..., nn.Module]:
    def build(*, img_size: int, drop_path_rate: float) -> nn.Module:
        from knetlab.models.swin import build_swin  # timm: see _timm_resnet

        return build_swin(variant, img_size=img_size, drop_path_rate=drop_path_rate)

    build.__doc__ = f"{variant} from knetlab.models.swin (timm Swin with mmseg's pad-then-roll windows)."
    return build


BACKBONES: dict[str, BackboneInfo] = {
    "r50-d8": BackboneInfo("ResNetV1c-50, output stride 8 (timm resnet50c, dilated)", build_r50_d8, "resnet", 0.0),
    "r50": BackboneInfo("ResNetV1c-50, output stride 32 (timm resnet50c)", build_r50, "resnet", 0.0),
    "swin-t": BackboneInfo("Swin-T, window 7, 224 pretraining (timm swin_tiny_patch4_window7_224)",
                           _swin_builder("swin-t"), "swin", 0.3),
    "swin-l": BackboneInfo("Swin-L, window 7, 224 pretraining (timm swin_large_patch4_window7_224)",
                           _swin_builder("swin-l"), "swin", 0.3),
    "tiny": BackboneInfo("small ResNetV1c (1 bottleneck per stage), output stride 8, for CPU tests", build_tiny,
                         "resnet", 0.0),
}


def backbone_info(name: str) -> BackboneInfo:
    """The registry entry for `name`, or a ModelError listing the valid names."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r} (valid: {', '.join(BACKBONES)})")
    return BACKBONES[name]


def build_backbone(name: str, *, img_size: int, drop_path_rate: float | None = None) -> nn.Module:
    """The backbone `name` (see BACKBONES) for training crops of `img_size`, randomly initialised;
    `drop_path_rate=None` takes the backbone's default. ImageNet weights: `pretrained.load_backbone_weights`."""
    info = backbone_info(name)
    rate = info.default_drop_path_rate if drop_path_rate is None else float(drop_path_rate)
    if not 0.0 <= rate < 1.0:
        raise ModelError(f"drop_path_rate must be in [0, 1), got {rate}")
    model = info.build(img_size=img_size, drop_path_rate=rate)
    if len(getattr(model, "out_channels", ())) != 4:
        raise ModelError(f"backbone {name!r} ({type(model).__name__}) must list the channels of its 4 feature maps "
                         f"in out_channels")
    return model


def check_input_size(backbone: nn.Module, height: int, width: int, name: str = "backbone") -> None:
    """Raise a ModelError when `backbone` cannot take an image of height x width."""
    min_size = int(getattr(backbone, "min_input_size", 32))
    divisor = int(getattr(backbone, "input_size_divisor", 1))
    if height < min_size or width < min_size:
        raise ModelError(
            f"input size {height}x{width} is smaller than the {min_size}x{min_size} minimum of {name} "
            f"(its deepest feature map would be empty)"
        )
    if divisor > 1 and (height % divisor or width % divisor):
        raise ModelError(f"input size {height}x{width} is not a multiple of {divisor}, which {name} needs")

