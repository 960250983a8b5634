"""Released K-Net COCO checkpoints (the K-Net repo's mmdet 2.x layout) -> knetlab state dicts.

The panoptic/instance models use the reference's own module names (`neck.*`, `rpn_head.*`, `roi_head.mask_head.{i}.*`,
and torchvision's = mmdet's ResNet keys under `backbone.*`, deformable `conv2.conv_offset.*` included), so only the
Swin-L backbone keys are renamed (`swin.convert_mmseg_swin_state_dict`: mmdet's det Swin has mmseg's keys; its
`relative_position_index` buffers are dropped, they are computed). Every key of the checkpoint must land on a key of
the model and every key of the model must be filled, with equal shapes; otherwise ConversionError names the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from knetlab.models.backbones import ModelError
from knetlab.models.det_backbones import DET_BACKBONE_FAMILIES
from knetlab.models.det_zoo import DET_MODELS, build_det_model, det_model_spec
from knetlab.models.state_dict import check_state_dict, unwrap_state_dict, write_converted_checkpoint


def check_det_model_name(name: str) -> None:
    if name not in DET_MODELS:
        raise ModelError(f"unknown panoptic/instance model {name!r} for an mmdet checkpoint "
                         f"(valid: {', '.join(DET_MODELS)})")


def convert_mmdet_state_dict(state_dict: Mapping[str, Any], name: str, *, source: str = "checkpoint",
                             **overrides: Any) -> dict[str, torch.Tensor]:
    """A released K-Net COCO checkpoint (a raw state dict, or a checkpoint dict with `state_dict`/`meta`) -> the
    state dict of `create_model(name, **overrides)`, the same tensors under knetlab's keys. Refuses (with
    ConversionError) a checkpoint whose keys or shapes do not match that model exactly."""
    check_det_model_name(name)
    spec = det_model_spec(name, **{**overrides, "pretrained": None})
    tensors = unwrap_state_dict(state_dict, source)
    converted = {k: v for k, v in tensors.items() if not k.startswith("backbone.")}
    backbone = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if DET_BACKBONE_FAMILIES[spec.backbone] == "swin":
        from knetlab.models.swin import convert_mmseg_swin_state_dict

        backbone = convert_mmseg_swin_state_dict(backbone)
    converted.update({f"backbone.{k}": v for k, v in backbone.items()})

    with torch.device("meta"):  # only names and shapes are needed
        expected = build_det_model(spec, name).state_dict()
    check_state_dict(converted, expected, f"{source} (mmdet K-Net layout) for model {name!r}")
    return {k: converted[k] for k in expected}


def convert_mmdet_checkpoint_file(in_path: str | Path, out_path: str | Path, name: str, **overrides: Any) -> Path:
    """`knetlab convert mmdet IN.pth OUT.pt --model NAME`: writes `{"state_dict": ..., "meta": {...}}` with knetlab
    keys (load with `model.load_state_dict(torch.load(OUT, weights_only=True)["state_dict"])`)."""
    check_det_model_name(name)  # an unknown model name fails before the file is read
    det_model_spec(name, **overrides)
    return write_converted_checkpoint(in_path, out_path, name, convert_mmdet_state_dict, "mmdetection (K-Net repo)",
                                      **overrides)
