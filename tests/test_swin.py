"""The Swin backbones (knetlab/models/swin.py): mmseg's parameter counts, NCHW maps at strides 4-32 for any input
size, mmseg's pad-then-roll shifted windows (checked against a plain re-implementation of mmseg's block, which stock
timm fails), mmseg's Unfold-order patch merging, and the mmseg / timm / Microsoft checkpoint conversions (timm's
merging weights reordered, checked against timm's own merging and timm's classifier features)."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock

from knetlab.models.swin import (
    PadThenRollSwinBlock,
    UnfoldPatchMerging,
    build_swin,
    convert_mmseg_swin_state_dict,
    convert_timm_swin_state_dict,
)

KEYS_DIR = Path(__file__).parent / "test_convert_mmseg_keys"  # the released key lists and mmseg's parameter counts
PARAM_COUNTS = json.loads((KEYS_DIR / "param_counts.json").read_text())
SWIN_T = "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512"
SWIN_L = "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640"


@pytest.fixture(scope="module")
def swin_t() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_swin("swin-t", img_size=512, drop_path_rate=0.3).eval()


def perturb_(module: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight away from its init (norms at 1/0, zero biases) so a swapped or misplaced tensor shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("variant,name,count", [("swin-t", SWIN_T, 27_520_698), ("swin-l", SWIN_L, 194_998_164)])
def test_parameter_count_equals_mmseg(variant, name, count):
    assert PARAM_COUNTS[name]["backbone"] == count  # mmseg 1.2.2's SwinTransformer with norm0-3
    with torch.device("meta"):
        model = build_swin(variant, img_size=512, drop_path_rate=0.3)
    assert sum(p.numel() for p in model.parameters()) == count
    assert [f"norm{i}" in dict(model.named_children()) for i in range(4)] == [True] * 4


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown Swin variant 'swin-b' \(valid: swin-t, swin-l\)"):
        build_swin("swin-b", img_size=512, drop_path_rate=0.3)


def test_swin_t_at_512_gives_four_nchw_maps(swin_t):
    assert swin_t.out_channels == [96, 192, 384, 768]
    with torch.no_grad():
        features = swin_t(torch.randn(1, 3, 512, 512))
    assert [tuple(f.shape) for f in features] == [(1, 96, 128, 128), (1, 192, 64, 64), (1, 384, 32, 32),
                                                  (1, 768, 16, 16)]
    assert all(f.is_contiguous() for f in features)
    # each map went through its own output LayerNorm (per position over channels: mean 0, std 1 at init)
    assert features[3].mean(dim=1).abs().max() < 1e-4


@pytest.mark.parametrize("size", [(512, 683), (97, 131), (32, 32)])
def test_any_input_size_works_like_mmseg_padding(swin_t, size):
    # mmseg pads the image to a multiple of 4 and each odd map before patch merging: sizes round up
    height, width = size
    expected = []
    h, w = math.ceil(height / 4), math.ceil(width / 4)
    for channels in swin_t.out_channels:
        expected.append((1, channels, h, w))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    with torch.no_grad():
        features = swin_t(torch.randn(1, 3, height, width))
    assert [tuple(f.shape) for f in features] == expected


@pytest.mark.slow
def test_swin_l_of_the_640_row_gives_four_nchw_maps():
    model = build_swin("swin-l", img_size=640, drop_path_rate=0.4).eval()
    assert model.out_channels == [192, 384, 768, 1536]
    with torch.no_grad():  # any input size (padded as mmseg pads); a 640x640 forward costs tens of CPU-seconds
        features = model(torch.randn(1, 3, 192, 160))
    assert [tuple(f.shape) for f in features] == [(1, 192, 48, 40), (1, 384, 24, 20), (1, 768, 12, 10),
                                                  (1, 1536, 6, 5)]


def test_train_mode_backward_reaches_every_parameter():
    torch.manual_seed(0)
    # no drop path here: with 2 images it may drop a whole residual branch, which then rightly gets no gradient
    model = build_swin("swin-t", img_size=64, drop_path_rate=0.0).train()
    features = model(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in features).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


# ---------------------------------------------------------------------------------------------------------------
# mmseg's shifted-window block, written out plainly (mmseg/models/backbones/swin.py: SwinBlock, ShiftWindowMSA,
# WindowMSA), with explicit loops over windows and the relative-position index from its definition.


def mmseg_swin_block(block: SwinTransformerBlock, x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """x (B, H, W, C) -> the block's output as mmseg computes it: pad the normed map to a multiple of the window,
    roll by -shift, attend inside each window (regions of the padded, rolled map masked with -100), roll back,
    crop, add; then the MLP with its residual."""
    batch, height, width, channels = x.shape
    heads = block.attn.num_heads
    head_dim = channels // heads
    y = F.layer_norm(x, (channels,), block.norm1.weight, block.norm1.bias, block.norm1.eps)
    pad_b, pad_r = (window - height % window) % window, (window - width % window) % window
    y = F.pad(y, (0, 0, 0, pad_r, 0, pad_b))
    padded_h, padded_w = y.shape[1:3]
    region = torch.zeros(padded_h, padded_w)
    if shift:
        y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
        label = 0
        for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
                region[rows, cols] = label
                label += 1
    # relative position bias of token i = (r_i, c_i) to j: table[(r_i - r_j + w - 1) * (2w - 1) + c_i - c_j + w - 1]
    pos = [(r, c) for r in range(window) for c in range(window)]
    index = torch.tensor([[(ri - rj + window - 1) * (2 * window - 1) + (ci - cj + window - 1) for rj, cj in pos]
                          for ri, ci in pos])
    bias = block.attn.relative_position_bias_table[index.view(-1)].view(window**2, window**2, heads).permute(2, 0, 1)
    out = torch.zeros_like(y)
    for top in range(0, padded_h, window):
        for left in range(0, padded_w, window):
            tokens = y[:, top:top + window, left:left + window].reshape(batch, window**2, channels)
            labels = region[top:top + window, left:left + window].reshape(-1)
            mask = torch.where(labels[:, None] == labels[None, :], 0.0, -100.0)
            qkv = F.linear(tokens, block.attn.qkv.weight, block.attn.qkv.bias)
            q, k, v = qkv.view(batch, window**2, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            attn = (q * head_dim**-0.5) @ k.transpose(-2, -1) + bias + mask
            mixed = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, window**2, channels)
            mixed = F.linear(mixed, block.attn.proj.weight, block.attn.proj.bias)
            out[:, top:top + window, left:left + window] = mixed.view(batch, window, window, channels)
    if shift:
        out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
    x = x + out[:, :height, :width]
    hidden = F.layer_norm(x, (channels,), block.norm2.weight, block.norm2.bias, block.norm2.eps)
    hidden = F.gelu(F.linear(hidden, block.mlp.fc1.weight, block.mlp.fc1.bias))
    return x + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


@pytest.mark.parametrize("size", [(10, 12), (16, 16), (5, 9)])
def test_block_is_mmseg_pad_then_roll_while_stock_timm_is_not(swin_t, size):
    # stage 1 blocks: 192 channels, 6 heads; block 0 plain windows, block 1 shifted by 3. No size here is a multiple
    # of 7; (5, 9) is smaller than a window in height, which mmseg still pads, shifts and masks.
    shifted = copy.deepcopy(swin_t.layers[1].blocks[1]).eval()
    plain = copy.deepcopy(swin_t.layers[1].blocks[0]).eval()
    perturb_(shifted, seed=1)
    perturb_(plain, seed=2)
    assert isinstance(shifted, PadThenRollSwinBlock) and shifted.window_size == (7, 7)
    assert shifted.shift_size == (3, 3) and plain.shift_size == (0, 0)
    x = torch.randn(2, *size, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), mmseg_swin_block(plain, x, window=7, shift=0), atol=2e-5, rtol=1e-5)
        reference = mmseg_swin_block(shifted, x, window=7, shift=3)
        torch.testing.assert_close(shifted(x), reference, atol=2e-5, rtol=1e-5)
        # the same weights in timm's own block (roll, then pad) give another function at these sizes
        stock = copy.deepcopy(shifted)
        stock.__class__ = SwinTransformerBlock
        assert (stock(x) - reference).abs().max() > 1e-2


def test_block_order_does_not_matter_where_windows_tile_the_map(swin_t):
    # at 14 x 21 (multiples of 7) nothing is padded: stock timm and mmseg agree, so the test above measures padding
    block = copy.deepcopy(swin_t.layers[1].blocks[1]).eval()
    perturb_(block, seed=4)
    stock = copy.deepcopy(block)
    stock.__class__ = SwinTransformerBlock
    x = torch.randn(1, 14, 21, 192)
    with torch.no_grad():
        torch.testing.assert_close(block(x), stock(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint conversion


def mmseg_patch_merging(x: torch.Tensor, norm_weight, norm_bias, reduction_weight) -> torch.Tensor:
    """mmseg PatchMerging on (B, H, W, C), H and W even: nn.Unfold(2, stride 2) -> LayerNorm -> Linear."""
    batch, height, width, channels = x.shape
    columns = F.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2)  # B, C*4 (channel-major), L
    columns = columns.transpose(1, 2)
    columns = F.layer_norm(columns, (4 * channels,), norm_weight, norm_bias)
    return F.linear(columns, reduction_weight).view(batch, height // 2, width // 2, -1)


def test_patch_merging_is_mmseg_unfold_merging_and_takes_reordered_timm_weights(swin_t):
    generator = torch.Generator().manual_seed(5)
    channels = 96
    merging = copy.deepcopy(swin_t.layers[1].downsample)
    assert isinstance(merging, UnfoldPatchMerging)
    mmseg_weights = {
        "stages.0.downsample.norm.weight": 1 + torch.randn(4 * channels, generator=generator),
        "stages.0.downsample.norm.bias": torch.randn(4 * channels, generator=generator),
        "stages.0.downsample.reduction.weight": torch.randn(2 * channels, 4 * channels, generator=generator),
    }
    converted = convert_mmseg_swin_state_dict(mmseg_weights)
    assert sorted(converted) == ["layers.1.downsample.norm.bias", "layers.1.downsample.norm.weight",
                                 "layers.1.downsample.reduction.weight"]
    merging.load_state_dict({k[len("layers.1.downsample."):]: v for k, v in converted.items()})
    x = torch.randn(2, 6, 10, channels, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(merging(x), mmseg_patch_merging(x, *mmseg_weights.values()), atol=1e-5, rtol=1e-5)
    # the tensors themselves are moved, unchanged (the merging keeps mmseg's channel order)
    assert sorted(map(id, converted.values())) == sorted(map(id, mmseg_weights.values()))

    # timm's own merging (neighbour-major order) with random weights: reordered, ours computes the same, odd sizes too
    stock = PatchMerging(channels, 2 * channels)
    perturb_(stock, seed=6)
    timm_weights = convert_timm_swin_state_dict({f"layers.1.downsample.{k}": v for k, v in stock.state_dict().items()})
    merging.load_state_dict({k[len("layers.1.downsample."):]: v for k, v in timm_weights.items()})
    x = torch.randn(2, 7, 9, channels, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(merging(x), stock(x), atol=1e-5, rtol=1e-5)
    assert not torch.equal(timm_weights["layers.1.downsample.reduction.weight"], stock.reduction.weight)


def released_swin_keys(name: str) -> dict[str, list[int]]:
    keys = {}
    for line in (KEYS_DIR / f"{name}.tsv").read_text().splitlines():
        if line.startswith("backbone."):
            key, shape = line.split("\t")
            keys[key[len("backbone."):]] = json.loads(shape)
    return keys


@pytest.mark.parametrize("variant,name", [("swin-t", SWIN_T), ("swin-l", SWIN_L)])
def test_released_mmseg_swin_keys_convert_with_nothing_missing_or_unexpected(variant, name):
    keys = released_swin_keys(name)
    generator = torch.Generator().manual_seed(6)
    mmseg_state = {k: (torch.randint(0, 169, shape, generator=generator) if k.endswith("relative_position_index")
                       else torch.randn(shape, generator=generator)) for k, shape in keys.items()}
    converted = convert_mmseg_swin_state_dict(mmseg_state)
    with torch.device("meta"):
        expected = build_swin(variant, img_size=512, drop_path_rate=0.3).state_dict()
    assert sorted(converted) == sorted(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    # every released tensor is used once, as it is (less the computed index buffers)
    released = {k: v for k, v in mmseg_state.items() if not k.endswith("relative_position_index")}
    assert sorted(map(id, converted.values())) == sorted(map(id, released.values()))
    # every tensor keeps its value (the patch merging keeps mmseg's channel order), only names change
    assert torch.equal(converted["layers.1.downsample.reduction.weight"],
                       mmseg_state["stages.0.downsample.reduction.weight"])
    assert torch.equal(converted["patch_embed.proj.weight"], mmseg_state["patch_embed.projection.weight"])
    assert torch.equal(converted["layers.2.blocks.1.attn.qkv.weight"],
                       mmseg_state["stages.2.blocks.1.attn.w_msa.qkv.weight"])
    assert torch.equal(converted["layers.3.blocks.0.mlp.fc1.bias"],
                       mmseg_state["stages.3.blocks.0.ffn.layers.0.0.bias"])
    assert torch.equal(converted["norm3.weight"], mmseg_state["norm3.weight"])


def test_mmseg_imagenet_file_drops_buffers_and_leaves_the_classifier_norm_to_the_caller():
    # mmseg's swin2mmseg keeps Microsoft's attn_mask buffers and the classifier's final norm
    state = {"stages.0.blocks.1.attn_mask": torch.zeros(4, 49, 49),
             "stages.0.blocks.1.attn.w_msa.relative_position_index": torch.zeros(49, 49, dtype=torch.long),
             "stages.0.blocks.1.attn.w_msa.proj.bias": torch.ones(96),
             "norm.weight": torch.ones(768)}
    assert sorted(convert_mmseg_swin_state_dict(state)) == ["layers.0.blocks.1.attn.proj.bias", "norm.weight"]


def microsoft_layout(timm_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm classifier state dict in the original Microsoft layout: patch merging at the end of stage i-1,
    `head.*` instead of `head.fc.*`, and the buffers Microsoft saves."""
    state = {}
    for key, value in timm_state.items():
        key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
        state[key.replace("head.fc.", "head.")] = value
    state["layers.0.blocks.1.attn_mask"] = torch.zeros(64, 49, 49)
    state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(49, 49, dtype=torch.long)
    return state


def test_timm_and_microsoft_checkpoints_convert_to_the_same_backbone_weights(swin_t):
    classifier = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    timm_state = classifier.state_dict()
    from_timm = convert_timm_swin_state_dict(timm_state)
    from_microsoft = convert_timm_swin_state_dict(microsoft_layout(timm_state))
    features_only = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in timm_state.items()
                     if not k.startswith(("head.", "norm."))}
    from_features_only = convert_timm_swin_state_dict(features_only)

    backbone_keys = set(swin_t.state_dict()) - {f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")}
    for converted in (from_timm, from_microsoft, from_features_only):
        assert set(converted) - backbone_keys <= {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias",
                                                  "head.weight", "head.bias"}
        assert backbone_keys <= set(converted)
        # same values, except the patch merging's, which are reordered to mmseg's Unfold order
        assert all(torch.equal(converted[k], timm_state[k]) for k in backbone_keys if ".downsample." not in k)
        assert all(torch.equal(converted[k], from_timm[k]) for k in backbone_keys)

    backbone = copy.deepcopy(swin_t)
    result = backbone.load_state_dict({k: from_microsoft[k] for k in backbone_keys}, strict=False)
    assert sorted(result.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight"))
    # stage 2 before norm2 is timm's stage-2 map (at 224 it is 14 x 14: windows tile it, so the order of pad and
    # roll does not matter; stage 3, 7 x 7, differs on purpose: timm's classifier stops shifting there, mmseg not)
    x = torch.randn(1, 3, 224, 224)
    backbone.norm2 = torch.nn.Identity()
    with torch.no_grad():
        ours = backbone.eval()(x)[2]
        (theirs,) = classifier.eval().forward_intermediates(x, indices=[2], intermediates_only=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
