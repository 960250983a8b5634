"""Released mmsegmentation K-Net checkpoints -> knetlab state dicts.

knetlab's module names mirror mmsegmentation's, so only backbone keys are renamed:
- `decode_head.kernel_generate_head.*`, `decode_head.kernel_update_head.{i}.*`, `auxiliary_head.*`: unchanged.
- ResNetV1c (`r50-d8`, `r50`): mmcv's deep stem `backbone.stem.{0,1,3,4,6,7}.*` becomes timm's
  `backbone.conv1.{0,1,3,4,6}.*` / `backbone.bn1.*` (0/3/6 are the convs, 1/4/7 their BNs); `backbone.layer1-4.*`
  (with `downsample.0/1`) are unchanged.
- Swin (`swin-t`, `swin-l`): `knetlab.models.swin.convert_mmseg_swin_state_dict` (patch_embed.projection ->
  patch_embed.proj, stages.i -> layers, w_msa/ffn renames, patch-merging channel reorder, norm0-3 kept).
Every key of the checkpoint must land on a key of the model and every key of the model must be filled, with equal
shapes; otherwise ConversionError names the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from knetlab.models.backbones import ModelError, backbone_info
from knetlab.models.zoo import create_model, model_spec

RESNET_STEM_RENAMES = {
    "stem.0.": "conv1.0.",
    "stem.1.": "conv1.1.",
    "stem.3.": "conv1.3.",
    "stem.4.": "conv1.4.",
    "stem.6.": "conv1.6.",
    "stem.7.": "bn1.",
}
MAX_KEYS_LISTED = 12


class ConversionError(ModelError):
    """A checkpoint that does not convert onto the model; the message names the offending keys."""


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def unwrap_state_dict(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a raw state dict, or a dict holding one under `state_dict` (mmengine/mmcv and
    knetlab files) or `model`; a DistributedDataParallel `module.` prefix is removed."""
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"{source}: expected a dict of tensors, got {type(checkpoint).__name__}")
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    state_dict = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise ConversionError(f"{source}: holds no tensors (top-level keys: {', '.join(map(str, checkpoint))})")
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    return state_dict


def convert_mmseg_resnet_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmcv/mmseg ResNetV1c keys (`stem.*`, `layer*`; no `backbone.` prefix) -> timm resnet50c keys."""
    converted = {}
    for key, value in state_dict.items():
        for old, new in RESNET_STEM_RENAMES.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        converted[key] = value
    return converted


def convert_mmseg_backbone_state_dict(state_dict: Mapping[str, torch.Tensor], backbone: str) -> dict:
    """Backbone keys without the `backbone.` prefix, from mmseg's layout to the knetlab backbone `backbone`'s."""
    family = backbone_info(backbone).family
    if family == "resnet":
        return convert_mmseg_resnet_state_dict(state_dict)
    from knetlab.models.swin import convert_mmseg_swin_state_dict

    return convert_mmseg_swin_state_dict(dict(state_dict))


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> str:
    """'2 missing: a, b; 1 unexpected: c' (long lists cut after MAX_KEYS_LISTED names); '' when all fit."""
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            listed = ", ".join(keys[:MAX_KEYS_LISTED])
            if len(keys) > MAX_KEYS_LISTED:
                listed += f", ... ({len(keys)} in all)"
            problems.append(f"{len(keys)} {label}: {listed}")
    return "; ".join(problems)


def shape_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    return [
        f"{k} {list(state_dict[k].shape)} (model: {list(expected[k].shape)})"
        for k in expected
        if k in state_dict and state_dict[k].shape != expected[k].shape
    ]


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], what: str
) -> None:
    """Raise a ConversionError naming every missing, unexpected and shape-mismatched key."""
    problems = key_problems(
        [k for k in expected if k not in state_dict],
        [k for k in state_dict if k not in expected],
        shape_mismatches(state_dict, expected),
    )
    if problems:
        raise ConversionError(f"{what} does not match: {problems}")


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
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise ConversionError(f"{in_path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(in_path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user error
        raise ConversionError(f"{in_path}: cannot be read as a PyTorch checkpoint with weights_only=True: "
                              f"{first_line(error)}") from None
    state_dict = convert_mmseg_state_dict(checkpoint, name, source=str(in_path), **overrides)
    meta = {"model": name, "converted_from": "mmsegmentation", "source_file": in_path.name}
    source_meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    if isinstance(source_meta, Mapping):
        meta.update({f"source_{k}": v for k, v in source_meta.items() if isinstance(v, (str, int, float))})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "meta": meta}, out_path)
    return out_path
