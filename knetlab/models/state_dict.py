"""State-dict helpers shared by checkpoint conversion (`convert.py`, `convert_mmdet.py`) and pretrained weights
(`pretrained.py`): the tensors of a checkpoint file, key and shape comparisons in one line, the renames of
mmsegmentation's backbone keys onto knetlab's backbones and the file-to-file conversion around a state-dict converter.
Nothing here builds a model, so the zoo is not imported."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from knetlab.models.backbones import backbone_info
from knetlab.models.errors import ConversionError

# mmcv's deep stem `stem.{0,1,3,4,6,7}.*` -> timm's `conv1.{0,1,3,4,6}.*` / `bn1.*` (0/3/6 convs, 1/4/7 their BNs).
RESNET_STEM_RENAMES = {
    "stem.0.": "conv1.0.",
    "stem.1.": "conv1.1.",
    "stem.3.": "conv1.3.",
    "stem.4.": "conv1.4.",
    "stem.6.": "conv1.6.",
    "stem.7.": "bn1.",
}
MAX_KEYS_LISTED = 12


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


def write_converted_checkpoint(
    in_path: str | Path,
    out_path: str | Path,
    name: str,
    convert_state_dict: Callable[..., dict[str, torch.Tensor]],
    converted_from: str,
    **overrides: Any,
) -> Path:
    """Read the checkpoint `in_path` (weights_only), convert it with `convert_state_dict(checkpoint, name,
    source=in_path, **overrides)` and write `{"state_dict": ..., "meta": {...}}` to `out_path`; the meta names the
    model, `converted_from`, the source file and the source's own scalar meta (as `source_*`)."""
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise ConversionError(f"{in_path}: checkpoint file does not exist")
    try:
        checkpoint = torch.load(in_path, map_location="cpu", weights_only=True)
    except Exception as error:  # any unreadable file is the same user error
        raise ConversionError(f"{in_path}: cannot be read as a PyTorch checkpoint with weights_only=True: "
                              f"{first_line(error)}") from None
    state_dict = convert_state_dict(checkpoint, name, source=str(in_path), **overrides)
    meta = {"model": name, "converted_from": converted_from, "source_file": in_path.name}
    source_meta = checkpoint.get("meta") if isinstance(checkpoint, Mapping) else None
    if isinstance(source_meta, Mapping):
        meta.update({f"source_{k}": v for k, v in source_meta.items() if isinstance(v, (str, int, float))})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "meta": meta}, out_path)
    return out_path
