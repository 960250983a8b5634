"""Swin-T and Swin-L backbones from timm that compute the same function as mmsegmentation's `SwinTransformer`.

`build_swin("swin-t" | "swin-l", img_size=..., drop_path_rate=...)` returns a `SwinBackbone`: timm's patch embedding
and 4 stages (keys `patch_embed.*`, `layers.{0-3}.*`, timm's own names), followed by mmseg's 4 output LayerNorms
`norm0..norm3`; `forward(images)` returns 4 NCHW maps at strides 4/8/16/32. It takes any input size, as mmseg does:

- the patch embedding pads the image at the bottom/right to a multiple of 4 (mmseg's `padding='corner'`);
- every block keeps window 7 and shift 3 whatever the map size (`always_partition`), and pads the map to a multiple
  of the window *before* the cyclic shift, building the shift mask on the padded map. Stock timm shifts first, then
  pads, which is a different function whenever a stage's size is not a multiple of 7 (at 512 and 640 none is);
- patch merging concatenates each 2x2 neighbourhood in mmseg's `nn.Unfold` order (channel-major), not timm's, so
  mmseg's weights load as they are and the float32 sums run in mmseg's order: with the same weights the outputs are
  bit-identical to mmseg's on CPU (K-Net's update stages amplify any rounding difference, see
  docs/reference-parity.md).

`convert_mmseg_swin_state_dict` maps mmseg's backbone keys onto these, `convert_timm_swin_state_dict` maps timm and
Microsoft (original Swin) ImageNet checkpoints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import nn

SWIN_VARIANTS = {
    "swin-t": "swin_tiny_patch4_window7_224",  # embed 96, depths 2-2-6-2, heads 3-6-12-24
    "swin-l": "swin_large_patch4_window7_224",  # embed 192, depths 2-2-18-2, heads 6-12-24-48
}

# timm's (and Microsoft's) PatchMerging concatenates the 2x2 neighbours as (kw, kh) = (0,0), (0,1), (1,0), (1,1),
# neighbour-major: k * C + c; mmseg's nn.Unfold gives channel-major c * 4 + (kh * 2 + kw). Neighbour k of timm's
# order is mmseg's neighbour TIMM_TO_UNFOLD_POSITION[k].
TIMM_TO_UNFOLD_POSITION = [0, 2, 1, 3]


class PadThenRollSwinBlock(SwinTransformerBlock):
    """timm's Swin block with mmseg's shifted-window order: pad to a multiple of the window, then roll, with the
    shift mask built on the padded map (mmseg `ShiftWindowMSA`, like the original Swin segmentation code).

    Only `_attn` differs from timm's; the built blocks get this class (no state is added), so weights, buffers and
    every other method stay timm's."""

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        pad_h = (win_h - height % win_h) % win_h
        pad_w = (win_w - width % win_w) % win_w
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1], x.shape[2]

        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
            attn_mask = self.get_attn_mask(x)  # regions of the padded, shifted map
        else:
            attn_mask = None

        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=attn_mask)
        x = window_reverse(windows.view(-1, win_h, win_w, channels), self.window_size, padded_h, padded_w)

        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x[:, :height, :width, :].contiguous()


class UnfoldPatchMerging(PatchMerging):
    """timm's PatchMerging with mmseg's channel order: each 2x2 neighbourhood is concatenated as `nn.Unfold(2, 2)`
    gives it (channel-major), then LayerNorm and the reduction, as mmseg's `PatchMerging`. An odd map is padded at the
    bottom/right (mmseg's `padding='corner'`). Same parameters as timm's, in mmseg's order."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, _ = x.shape
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)  # B, H/2 * W/2, 4C
        x = self.reduction(self.norm(x))
        return x.view(batch, (height + 1) // 2, (width + 1) // 2, -1)


class SwinBackbone(nn.Module):
    """timm Swin stages with mmseg's output LayerNorms; `forward(images)` -> 4 NCHW maps (strides 4, 8, 16, 32)."""

    def __init__(self, swin: SwinTransformer, variant: str):
        super().__init__()
        self.variant = variant
        self.patch_embed = swin.patch_embed
        self.layers = swin.layers  # timm's classifier norm and head are not part of the backbone
        self.out_channels: list[int] = [int(info["num_chs"]) for info in swin.feature_info]
        self.strides: list[int] = [int(info["reduction"]) for info in swin.feature_info]
        for i, channels in enumerate(self.out_channels):
            self.add_module(f"norm{i}", nn.LayerNorm(channels))
        # the deepest map is 1/32 of the input (the heads need at least one pixel there); any size pads as mmseg does
        self.min_input_size = self.strides[-1]
        self.input_size_divisor = 1
        # mmseg's versions of two timm modules: same parameters, only `forward`/`_attn` differ, no state is added
        for stage in self.layers:
            if isinstance(stage.downsample, PatchMerging):
                stage.downsample.__class__ = UnfoldPatchMerging
            for block in stage.blocks:
                block.__class__ = PadThenRollSwinBlock

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)  # B, H/4, W/4, C (channels last, as timm's stages take it)
        features = []
        for i, stage in enumerate(self.layers):
            x = stage(x)
            features.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
        return features


def build_swin(variant: str, *, img_size: int, drop_path_rate: float) -> SwinBackbone:
    """Swin-T (`swin-t`) or Swin-L (`swin-l`), window 7, as mmseg's K-Net configs build them: drop path rising
    linearly over all blocks to `drop_path_rate`, randomly initialised (pretrained weights are loaded by the caller).
    `img_size` is the training crop; any other input size works too."""
    if variant not in SWIN_VARIANTS:
        raise ValueError(f"unknown Swin variant {variant!r} (valid: {', '.join(SWIN_VARIANTS)})")
    swin = timm.create_model(
        SWIN_VARIANTS[variant],
        pretrained=False,
        num_classes=0,
        img_size=img_size,
        drop_path_rate=drop_path_rate,
        strict_img_size=False,  # any input size; the shift masks are built per forward
        always_partition=True,  # window 7 / shift 3 even where a map is smaller than the window, as mmseg
        embed_layer=partial(PatchEmbed, dynamic_img_pad=True),  # pad to a multiple of 4, as mmseg
    )
    return SwinBackbone(swin, variant)


def timm_to_unfold_order(tensor: torch.Tensor) -> torch.Tensor:
    """Reorder the last dimension (4C, the patch-merging input) from timm's/Microsoft's order to mmseg's Unfold
    order, which `UnfoldPatchMerging` uses."""
    *lead, four_c = tensor.shape
    inverse = [TIMM_TO_UNFOLD_POSITION.index(k) for k in range(4)]
    reordered = tensor.reshape(*lead, 4, four_c // 4).transpose(-1, -2)[..., inverse]
    return reordered.reshape(*lead, four_c).contiguous()


_MMSEG_BLOCK_RENAMES = (
    (".attn.w_msa.", ".attn."),
    (".ffn.layers.0.0.", ".mlp.fc1."),
    (".ffn.layers.1.", ".mlp.fc2."),
)


def convert_mmseg_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg `SwinTransformer` keys (no `backbone.` prefix; released K-Net checkpoints and mmseg's converted
    ImageNet weights) -> `SwinBackbone` keys. The buffers `relative_position_index` and `attn_mask` (which mmseg's
    ImageNet conversion keeps from Microsoft's files) are dropped: they are computed. Keys that are not mmseg Swin
    keys (e.g. the classifier's `norm.*` in mmseg's ImageNet files) pass through unchanged for the caller to judge.

    - `patch_embed.projection.*` -> `patch_embed.proj.*`
    - `stages.i.blocks.j.attn.w_msa.*` -> `layers.i.blocks.j.attn.*`; `ffn.layers.0.0` / `ffn.layers.1` -> `mlp.fc1` /
      `mlp.fc2`; `norm1`, `norm2` unchanged
    - `stages.i.downsample.*` (mmseg merges patches at the end of stage i) -> `layers.{i+1}.downsample.*` (timm at
      the start of the next); the values are unchanged (`UnfoldPatchMerging` keeps mmseg's channel order)
    - `norm0..norm3` unchanged
    """
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if key.startswith("patch_embed.projection."):
            key = "patch_embed.proj." + key[len("patch_embed.projection."):]
        elif match := re.match(r"stages\.(\d+)\.downsample\.(.+)$", key):
            key = f"layers.{int(match.group(1)) + 1}.downsample.{match.group(2)}"
        elif key.startswith("stages."):
            key = "layers." + key[len("stages."):]
            for old, new in _MMSEG_BLOCK_RENAMES:
                key = key.replace(old, new)
        converted[key] = value
    return converted


def convert_timm_swin_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm (`swin_*_patch4_window7_224.*`, classifier or `features_only`) or original Microsoft Swin ImageNet
    checkpoint -> `SwinBackbone` keys. Microsoft checkpoints merge patches at the end of stage i: their
    `layers.i.downsample.*` moves to `layers.{i+1}` (as timm's `checkpoint_filter_fn` does). Both concatenate the
    2x2 neighbours in the same order, which the patch-merging `reduction.weight` and `norm` are reordered from to
    mmseg's Unfold order (`UnfoldPatchMerging`). Buffers (`relative_position_index`, `attn_mask`) are dropped;
    the classifier (`head.*`, `norm.*`) passes through for the caller to drop. Window-7 weights only: the relative
    position tables are not resized."""
    state_dict = {re.sub(r"^layers_(\d+)\.", r"layers.\1.", k): v for k, v in state_dict.items()}
    microsoft_layout = "layers.0.downsample.reduction.weight" in state_dict
    converted: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            continue
        if microsoft_layout:
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", key)
        if re.match(r"layers\.\d+\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$", key):
            value = timm_to_unfold_order(value)
        converted[key] = value
    return converted
