"""The COCO panoptic/instance K-Net zoo: the K-Net release's configs (named as the reference configs, with '-' for
'_' after `knet`), plus `tiny-panoptic`/`tiny-instance` for CPU tests and the demo, and their builder. `zoo.py`
serves them through the one `create_model` door."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import torch

from knetlab.models.backbones import ModelError
from knetlab.models.det_backbones import DET_BACKBONE_FAMILIES, DET_BACKBONES, build_det_backbone
from knetlab.models.fpn import FPN
from knetlab.models.knet_det_heads import ConvKernelHead, KernelIterHead, KernelUpdateHead
from knetlab.models.knet_detector import KNetDetector
from knetlab.models.pretrained import PretrainedReport, load_backbone_weights


@dataclass(frozen=True)
class DetModelSpec:
    """One panoptic/instance zoo model; any field can be overridden in create_model."""

    task: str  # "panoptic" | "instance"
    backbone: str  # a name in det_backbones.DET_BACKBONES
    schedule: str  # the released training schedule ("1x" | "ms-3x"), for the record
    num_thing_classes: int = 80
    num_stuff_classes: int = 53  # 0 for instance models
    channels: int = 256  # FPN, kernel head, kernels and update heads
    num_proposals: int = 100
    num_stages: int = 3
    num_heads: int = 8
    feedforward_channels: int = 2048
    num_groups: int = 32  # GroupNorm groups of the kernel head
    drop_path_rate: float = 0.0
    pretrained: str | None = None  # backbone weights to load: a local path, s3:// URI or https:// URL
    reference_pretrained: str = ""  # the ImageNet weights the released model started from: a REFERENCE_WEIGHTS key


# Keys of weights.REFERENCE_WEIGHTS (URL and checksum): what each released model's backbone started from.
_R50, _R101, _SWIN_L = "torchvision/resnet50", "torchvision/resnet101", "microsoft/swin_large_patch4_window7_224_22k"
_INSTANCE = dict(task="instance", num_stuff_classes=0)
# Small widths for CPU: same modules and code path as the released rows.
_TINY = dict(backbone="tiny", schedule="1x", channels=64, num_heads=4, feedforward_channels=128)

DET_MODELS: dict[str, DetModelSpec] = {
    "knet-s3_r50_fpn_1x_coco-panoptic": DetModelSpec("panoptic", "r50", "1x", reference_pretrained=_R50),
    "knet-s3_r50_fpn_ms-3x_coco-panoptic": DetModelSpec("panoptic", "r50", "ms-3x", reference_pretrained=_R50),
    "knet-s3_r101_fpn_ms-3x_coco-panoptic": DetModelSpec("panoptic", "r101", "ms-3x", reference_pretrained=_R101),
    "knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco-panoptic": DetModelSpec("panoptic", "r101-dcn", "ms-3x",
                                                                   reference_pretrained=_R101),
    "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic": DetModelSpec("panoptic", "swin-l", "ms-3x", drop_path_rate=0.2,
                                                                reference_pretrained=_SWIN_L),
    "knet-s3_r50_fpn_1x_coco": DetModelSpec(backbone="r50", schedule="1x", reference_pretrained=_R50, **_INSTANCE),
    "knet-s3_r50_fpn_ms-3x_coco": DetModelSpec(backbone="r50", schedule="ms-3x", reference_pretrained=_R50,
                                               **_INSTANCE),
    "knet-s3_r101_fpn_ms-3x_coco": DetModelSpec(backbone="r101", schedule="ms-3x", reference_pretrained=_R101,
                                                **_INSTANCE),
    "knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco": DetModelSpec(backbone="r101-dcn", schedule="ms-3x",
                                                          reference_pretrained=_R101, **_INSTANCE),
    "tiny-panoptic": DetModelSpec(task="panoptic", **_TINY),
    "tiny-instance": DetModelSpec(**_TINY, **_INSTANCE),
}

DET_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(DetModelSpec))
_POSITIVE = ("num_thing_classes", "channels", "num_proposals", "num_stages", "num_heads", "feedforward_channels",
             "num_groups")


def reference_config_name(name: str) -> str:
    """The K-Net repo's config stem of a zoo name ('knet-s3_r101-dcn-c3-c5_...' -> 'knet_s3_r101_dcn-c3-c5_...')."""
    return re.sub(r"^knet-s3_", "knet_s3_", name).replace("r101-dcn-c3-c5", "r101_dcn-c3-c5")


def det_model_spec(name: str, **overrides: Any) -> DetModelSpec:
    """The spec of det model `name` with `overrides` applied (a None value keeps the spec's own value); a ModelError
    names a bad key or value together with the valid ones."""
    unknown = sorted(set(overrides) - set(DET_SPEC_FIELDS))
    if unknown:
        raise ModelError(f"unknown option(s) {', '.join(unknown)} for model {name!r} "
                         f"(valid: {', '.join(DET_SPEC_FIELDS)})")
    spec = dataclasses.replace(DET_MODELS[name], **{k: v for k, v in overrides.items() if v is not None})
    if spec.backbone not in DET_BACKBONES:
        raise ModelError(f"unknown backbone {spec.backbone!r} for model {name!r} (valid: {', '.join(DET_BACKBONES)})")
    if spec.task not in ("panoptic", "instance"):
        raise ModelError(f"model {name!r}: task must be 'panoptic' or 'instance', got {spec.task!r}")
    for key in _POSITIVE:
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    if (spec.task == "panoptic") != (spec.num_stuff_classes > 0):
        raise ModelError(f"model {name!r}: a {spec.task} model needs num_stuff_classes "
                         f"{'> 0' if spec.task == 'panoptic' else '= 0'}, got {spec.num_stuff_classes!r}")
    for key, divisor in (("num_heads", spec.num_heads), ("num_groups", spec.num_groups)):
        if spec.channels % divisor:
            raise ModelError(f"model {name!r}: channels {spec.channels} is not a multiple of {key} {divisor}")
    return spec


def build_det_model(spec: DetModelSpec, name: str = "knet-det") -> KNetDetector:
    """A KNetDetector from a spec (create_model is the entry point for zoo names)."""
    backbone = build_det_backbone(spec.backbone, drop_path_rate=float(spec.drop_path_rate))
    if spec.pretrained:
        load_det_backbone_weights(backbone, spec.pretrained, spec.backbone)
    stages = [KernelUpdateHead(spec.num_thing_classes + spec.num_stuff_classes, spec.channels, spec.num_heads,
                               spec.feedforward_channels) for _ in range(spec.num_stages)]
    return KNetDetector(
        backbone,
        FPN(backbone.out_channels, spec.channels),
        ConvKernelHead(spec.channels, spec.num_proposals, spec.num_thing_classes, spec.num_stuff_classes,
                       spec.num_groups),
        KernelIterHead(stages),
        num_thing_classes=spec.num_thing_classes,
        num_stuff_classes=spec.num_stuff_classes,
        name=name,
    )


def load_det_backbone_weights(backbone: torch.nn.Module, uri: str, name: str, *,
                              load: bool = True) -> PretrainedReport:
    """ImageNet weights from a local file, s3:// or https:// URI: torchvision's ResNets (their keys are the
    backbone's; `fc` dropped; the deformable convs' `conv_offset` stay at 0 as in the reference) or a Swin checkpoint
    in any layout `pretrained.py` reads; with `load=False` only checked (see `pretrained.load_backbone_weights`)."""
    return load_backbone_weights(backbone, uri, name, family=DET_BACKBONE_FAMILIES[name], load=load)


def count_det_parameters(model: KNetDetector) -> dict[str, int]:
    """Parameter counts: total and per part, the parts of the reference's param_counts_det.json."""
    parts: dict[str, torch.nn.Module] = {"total": model, "backbone": model.backbone, "neck": model.neck,
                                         "rpn_head": model.rpn_head, "roi_head": model.roi_head}
    for part in ("localization_fpn", "init_kernels", "conv_seg", "loc_convs", "seg_convs"):
        parts[f"rpn_head.{part}"] = getattr(model.rpn_head, part)
    for i, head in enumerate(model.roi_head.mask_head):
        parts[f"roi_head.mask_head.{i}"] = head
    return {part: sum(p.numel() for p in module.parameters()) for part, module in parts.items()}
