"""Released mmsegmentation K-Net checkpoints -> knetlab state dicts.

knetlab's module names mirror mmsegmentation's, so only backbone keys are renamed:
- `decode_head.kernel_generate_head.*`, `decode_head.kernel_update_head.{i}.*`, `auxiliary_head.*`: unchanged.
- ResNetV1c (`r50-d8`, `r50`): mmcv's deep stem `backbone.stem.{0,1,3,4,6,7}.*` becomes timm's
  `backbone.conv1.{0,1,3,4,6}.*` / `backbone.bn1.*` (0/3/6 are the convs, 1/4/7 their BNs); `backbone.layer1-4.*`
  (with `downsample.0/1`) are unchanged.
- Swin (`swin-t`, `swin-l`): `knetlab.models.swin.convert_mmseg_swin_state_dict` (patch_embed.projection ->
  patch_embed.proj, stages.i -> layers, w_msa/ffn renames, patch-merging channel reorder, norm0-3 kept).
Every key of the checkpoint must land on a key of the model and every key of the model must be filled, with equal
shapes; otherwise ConversionError names the keys. The key renames and comparisons live in `state_dict.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from knetlab.models.errors import ConversionError
from knetlab.models.state_dict import (
    RESNET_STEM_RENAMES,
    check_state_dict,
    convert_mmseg_backbone_state_dict,
    unwrap_state_dict,
    write_converted_checkpoint,
)
from knetlab.models.zoo import create_model, model_spec

__all__ = [
    "RESNET_STEM_RENAMES",
    "ConversionError",
    "convert_checkpoint_file",
    "convert_mmseg_state_dict",
]


def convert_mmseg_state_dict(
    state_dict: Mapping[str, Any], name: str, *, source: str = "checkpoint", **overrides: Any
) -> dict[str, torch.Tensor]:
    """A released mmsegmentation K-Net checkpoint (a raw state dict, or a checkpoint dict with `state_dict`/`meta`)
    -> the state dict of `create_model(name, **overrides)`, same tensors under knetlab's keys. Refuses (with
    ConversionError) a checkpoint whose keys or shapes do not match that model exactly."""
    spec = model_spec(name, **overrides)
    tensors = unwrap_state_dict(state_dict, source)
    backbone_keys = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    converted = {
        f"backbone.{k}": v for k, v in convert_mmseg_backbone_state_dict(backbone_keys, spec.backbone).items()
    }
    converted.update({k: v for k, v in tensors.items() if not k.startswith("backbone.")})

    with torch.device("meta"):  # only names and shapes are needed
        expected = create_model(name, **{**overrides, "pretrained": None}).state_dict()
    check_state_dict(converted, expected, f"{source} (mmseg layout) for model {name!r}")
    return {k: converted[k] for k in expected}


def convert_checkpoint_file(in_path: str | Path, out_path: str | Path, name: str, **overrides: Any) -> Path:
    """`knetlab convert mmseg IN.pth OUT.pt --model NAME`: writes `{"state_dict": ..., "meta": {...}}` with knetlab
    keys (load with `model.load_state_dict(torch.load(OUT, weights_only=True)["state_dict"])`)."""
    model_spec(name, **overrides)  # an unknown model name fails before the file is read
    return write_converted_checkpoint(in_path, out_path, name, convert_mmseg_state_dict, "mmsegmentation", **overrides)
