"""The model zoo: K-Net models by name and `create_model(name, **overrides)`, the one door to both families:
semantic segmentation (the 7 released ADE20K configs, named as mmsegmentation 1.x names them, plus small `tiny*`
models for CPU tests and the demo) and COCO panoptic/instance segmentation (`det_zoo.py`: the K-Net release's
configs plus `tiny-panoptic`/`tiny-instance`), and
`build_segmentor(cfg.model)`, the one place an experiment's model section becomes a model."""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from knetlab.models.backbones import BACKBONES, build_backbone
from knetlab.models.det_backbones import build_det_backbone
from knetlab.models.det_zoo import (
    DET_MODELS,
    DET_SPEC_FIELDS,
    DetModelSpec,
    build_det_model,
    count_det_parameters,
    det_model_spec,
    load_det_backbone_weights,
)
from knetlab.models.errors import ModelError
from knetlab.models.heads import HEADS, build_auxiliary_head, build_kernel_generate_head
from knetlab.models.knet_detector import KNetDetector
from knetlab.models.knet_head import IterativeDecodeHead, KernelUpdateHead
from knetlab.models.pretrained import PretrainedError, PretrainedReport, load_backbone_weights, read_weights
from knetlab.models.segmentor import KNetSegmentor
from knetlab.models.state_dict import check_state_dict, unwrap_state_dict
from knetlab.models.weights import DEFAULT_CACHE_DIR, LocalWeights, WeightsSource, fetch_weights, weights_source
from knetlab.redact import redact


@dataclass(frozen=True)
class ModelSpec:
    """Everything that tells one zoo model from another; any field can be overridden in create_model."""

    backbone: str  # a name in backbones.BACKBONES
    head: str  # kernel-generating head: a name in heads.HEADS
    crop_size: int  # training crop of the released config
    num_classes: int = 150
    channels: int = 512  # kernel-generating head width = kernel size = update-head width
    aux_channels: int = 256
    aux_in_index: int = 2
    aux_loss_weight: float = 0.4
    num_stages: int = 3
    num_heads: int = 8
    feedforward_channels: int = 2048
    updator_channels: int = 256  # the updator works on chunks of this many channels (256 of 512 in the release)
    dropout_ratio: float = 0.1
    drop_path_rate: float | None = None  # None: the backbone's default
    pretrained: str | None = None  # backbone weights to load: a local path, s3:// URI or https:// URL
    crop_divisor: int = 1  # training crops must be a multiple of this (checked by the config)
    reference_pretrained: str = ""  # the ImageNet weights the released model started from: a REFERENCE_WEIGHTS key


# Keys of weights.REFERENCE_WEIGHTS (URL and checksum), as the released mmseg configs name them.
_R50_WEIGHTS = "open-mmlab/resnet50_v1c"
_SWIN_T_WEIGHTS = "mmseg/swin_tiny_patch4_window7_224"
_SWIN_L_WEIGHTS = "mmseg/swin_large_patch4_window7_224_22k"
# Small widths for CPU: same modules and code path as the table's rows.
_TINY = dict(channels=64, aux_channels=32, num_heads=4, feedforward_channels=256, updator_channels=32, crop_size=64)

SEMANTIC_MODELS: dict[str, ModelSpec] = {
    "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "r50-d8", "fcn", 512, reference_pretrained=_R50_WEIGHTS),
    "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "r50-d8", "psp", 512, reference_pretrained=_R50_WEIGHTS),
    "knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "r50-d8", "aspp", 512, reference_pretrained=_R50_WEIGHTS),
    # The released "R-50-D8" UperNet config uses strides (1,2,2,2) without dilation: output stride 32.
    "knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "r50", "upernet", 512, reference_pretrained=_R50_WEIGHTS),
    "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "swin-t", "upernet", 512, drop_path_rate=0.3, crop_divisor=32, reference_pretrained=_SWIN_T_WEIGHTS),
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512": ModelSpec(
        "swin-l", "upernet", 512, drop_path_rate=0.3, crop_divisor=32, reference_pretrained=_SWIN_L_WEIGHTS),
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640": ModelSpec(
        "swin-l", "upernet", 640, drop_path_rate=0.4, crop_divisor=32, reference_pretrained=_SWIN_L_WEIGHTS),
    "tiny": ModelSpec("tiny", "fcn", **_TINY),
    "tiny-fcn": ModelSpec("tiny", "fcn", **_TINY),
    "tiny-psp": ModelSpec("tiny", "psp", **_TINY),
    "tiny-aspp": ModelSpec("tiny", "aspp", **_TINY),
    "tiny-upernet": ModelSpec("tiny", "upernet", **_TINY),
}

MODELS: dict[str, ModelSpec | DetModelSpec] = {**SEMANTIC_MODELS, **DET_MODELS}

SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(ModelSpec))


def list_models() -> list[str]:
    """The zoo's model names: the 7 released ADE20K configs first, then the tiny semantic models, then the COCO
    panoptic/instance configs and their tiny models."""
    return list(MODELS)


def spec_fields(name: str) -> tuple[str, ...]:
    """The option names model `name` takes (its spec's fields): semantic and panoptic/instance specs differ."""
    return DET_SPEC_FIELDS if name in DET_MODELS else SPEC_FIELDS


def model_spec(name: str, **overrides: Any) -> ModelSpec | DetModelSpec:
    """The spec of model `name` with `overrides` applied (a None value keeps the spec's own value); a ModelError
    names an unknown model, key, backbone or head together with the valid ones."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelError(f"unknown model {name!r}{hint} (valid: {', '.join(MODELS)})")
    if name in DET_MODELS:
        return det_model_spec(name, **overrides)
    unknown = sorted(set(overrides) - set(SPEC_FIELDS))
    if unknown:
        raise ModelError(f"unknown option(s) {', '.join(unknown)} for model {name!r} (valid: {', '.join(SPEC_FIELDS)})")
    spec = dataclasses.replace(MODELS[name], **{k: v for k, v in overrides.items() if v is not None})
    if spec.backbone not in BACKBONES:
        raise ModelError(f"unknown backbone {spec.backbone!r} for model {name!r} (valid: {', '.join(BACKBONES)})")
    if spec.head not in HEADS:
        raise ModelError(f"unknown head {spec.head!r} for model {name!r} (valid: {', '.join(HEADS)})")
    for key in ("num_classes", "channels", "aux_channels", "num_stages", "num_heads", "feedforward_channels",
                "updator_channels", "crop_size", "crop_divisor"):
        value = getattr(spec, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"model {name!r}: {key} must be a positive integer, got {value!r}")
    for key, divisor in (("num_heads", spec.num_heads), ("updator_channels", spec.updator_channels)):
        if spec.channels % divisor:
            raise ModelError(f"model {name!r}: channels {spec.channels} is not a multiple of {key} {divisor}")
    return spec


def build_model(spec: ModelSpec, name: str = "knet") -> KNetSegmentor:
    """A KNetSegmentor from a spec (create_model is the entry point for zoo names)."""
    backbone = build_backbone(spec.backbone, img_size=spec.crop_size, drop_path_rate=spec.drop_path_rate)
    if spec.pretrained:
        load_backbone_weights(backbone, spec.pretrained, spec.backbone)
    in_channels = list(backbone.out_channels)
    generate_head = build_kernel_generate_head(
        spec.head, in_channels, spec.channels, spec.num_classes, dropout_ratio=spec.dropout_ratio
    )
    update_heads = [
        KernelUpdateHead(
            spec.channels,
            num_heads=spec.num_heads,
            feedforward_channels=spec.feedforward_channels,
            updator_channels=spec.updator_channels,
        )
        for _ in range(spec.num_stages)
    ]
    aux_head = build_auxiliary_head(
        in_channels, spec.aux_channels, spec.num_classes, in_index=spec.aux_in_index, dropout_ratio=spec.dropout_ratio
    )
    return KNetSegmentor(
        backbone,
        IterativeDecodeHead(generate_head, update_heads),
        aux_head,
        aux_loss_weight=spec.aux_loss_weight,
        name=name,
    )


def create_model(name: str, **overrides: Any) -> KNetSegmentor | KNetDetector:
    """The zoo model `name` (see list_models()), e.g. `create_model("tiny", num_classes=19)`; overrides are
    ModelSpec fields (num_classes, drop_path_rate, pretrained, ...), or DetModelSpec fields for the COCO models
    (which give a KNetDetector)."""
    spec = model_spec(name, **overrides)
    if isinstance(spec, DetModelSpec):
        return build_det_model(spec, name=name)
    return build_model(spec, name=name)


def build_segmentor(model_cfg: Mapping[str, Any], *, load_weights: bool = True) -> KNetSegmentor | KNetDetector:
    """The model an experiment's `model` section describes (`cfg.model`: name, num_classes, pretrained,
    pretrained_sha256, cache_dir, drop_path_rate, overrides, init_checkpoint), with the backbone's pretrained weights
    (`pretrained_source`: fetched into this node's cache if remote) and then the full weights of `init_checkpoint`
    (local or s3://, `torch.load(weights_only=True)`) loaded, unless `load_weights` is False (a model about to
    receive trained weights, or one only timed). SyncBN and norm_eval are the train loop's concern."""
    weights = fetch_pretrained(model_cfg) if load_weights else None
    model = create_model(model_cfg["name"], **model_options(model_cfg),
                         pretrained=str(weights.path) if weights else None)
    init_checkpoint = model_cfg.get("init_checkpoint") if load_weights else None
    if init_checkpoint:
        source = f"model.init_checkpoint={init_checkpoint}"
        try:
            weights_dict = unwrap_state_dict(read_weights(init_checkpoint), source)
        except PretrainedError as error:
            raise ModelError(f"model.init_checkpoint: {error}") from None
        check_state_dict(weights_dict, model.state_dict(), f"{source} for model {model_cfg['name']!r}")
        model.load_state_dict(weights_dict)
    return model


def model_options(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The create_model options of an experiment's model section, pretrained weights aside."""
    options = {**dict(model_cfg.get("overrides") or {}), "drop_path_rate": model_cfg.get("drop_path_rate")}
    if "num_classes" in spec_fields(model_cfg["name"]):  # panoptic/instance models count COCO's classes themselves
        options["num_classes"] = model_cfg["num_classes"]
    return options


def pretrained_source(model_cfg: Mapping[str, Any]) -> WeightsSource | None:
    """The backbone weights an experiment's model section asks for: model.pretrained (null: the zoo model's reference
    ImageNet weights, none for the tiny models; `none`: random initialisation) with model.pretrained_sha256."""
    reference = getattr(MODELS.get(model_cfg["name"]), "reference_pretrained", "") or None
    return weights_source(model_cfg.get("pretrained"), model_cfg.get("pretrained_sha256"), reference)


def fetch_pretrained(model_cfg: Mapping[str, Any]) -> LocalWeights | None:
    """The experiment's pretrained backbone weights as a file on this node (a remote one fetched once per node into
    model.cache_dir, its checksum checked), None when the backbone starts from random weights."""
    source = pretrained_source(model_cfg)
    return None if source is None else fetch_weights(source, model_cfg.get("cache_dir") or DEFAULT_CACHE_DIR)


def check_pretrained(model_cfg: Mapping[str, Any]) -> tuple[LocalWeights, PretrainedReport] | None:
    """Fetch the experiment's pretrained backbone weights and check that they fit, the backbone built on the meta
    device (nothing allocated, no model built): what the driver does before any worker starts. The report says what
    loading will do; None when the backbone starts from random weights."""
    weights = fetch_pretrained(model_cfg)
    if weights is None:
        return None
    spec = model_spec(model_cfg["name"], **model_options(model_cfg))
    with torch.device("meta"):
        if isinstance(spec, DetModelSpec):
            backbone = build_det_backbone(spec.backbone, drop_path_rate=float(spec.drop_path_rate))
            report = load_det_backbone_weights(backbone, str(weights.path), spec.backbone, load=False)
        else:
            backbone = build_backbone(spec.backbone, img_size=spec.crop_size, drop_path_rate=spec.drop_path_rate)
            report = load_backbone_weights(backbone, str(weights.path), spec.backbone, load=False)
    report.source = redact(weights.source.uri)
    return weights, report


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Parameter counts: total and per part (the parts of tests/test_convert_mmseg_keys/param_counts.json, or of
    tests/data/param_counts_det.json for a KNetDetector)."""
    if isinstance(model, KNetDetector):
        return count_det_parameters(model)
    parts = {"total": model, "backbone": model.backbone,
             "kernel_generate_head": model.decode_head.kernel_generate_head}
    if model.auxiliary_head is not None:
        parts["auxiliary_head"] = model.auxiliary_head
    for i, head in enumerate(model.decode_head.kernel_update_head):
        parts[f"kernel_update_head.{i}"] = head
    return {part: sum(p.numel() for p in module.parameters()) for part, module in parts.items()}


@functools.cache
def zoo_model_parameters(name: str) -> int:
    """The parameter count of zoo model `name` as released (built on the meta device, nothing allocated; cached: the
    zoo's specs are frozen)."""
    with torch.device("meta"):
        return count_parameters(create_model(name))["total"]


def models_table() -> list[dict[str, Any]]:
    """One row per zoo model: name, backbone, head, crop, params (counted on the meta device, nothing allocated).
    COCO models show head `fpn-panoptic`/`fpn-instance` and their training scale (long side x short side)."""
    rows = []
    for name, spec in MODELS.items():
        params = zoo_model_parameters(name)
        if isinstance(spec, DetModelSpec):
            head, crop = f"fpn-{spec.task}", "1333x640-800" if spec.schedule == "ms-3x" else "1333x800"
        else:
            head, crop = spec.head, f"{spec.crop_size}x{spec.crop_size}"
        rows.append({"name": name, "backbone": spec.backbone, "head": head, "crop": crop, "params": params})
    return rows
