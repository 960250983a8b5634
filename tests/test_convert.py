"""Conversion of released mmsegmentation K-Net checkpoints: for each of the 7 configs, a checkpoint with exactly the
released key/shape list (reference/mmseg_keys/*.tsv, random values) converts with zero missing and zero unexpected
keys, every tensor lands in the model unchanged, and the outputs survive a save/load round trip through the
`knetlab convert` file; mismatching checkpoints are refused with the offending keys named."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from released_keys import random_state_dict, read_key_list

from knetlab.models import ConversionError, convert_checkpoint_file, convert_mmseg_state_dict, create_model
from knetlab.models.convert import RESNET_STEM_RENAMES

KEYS_DIR = Path(__file__).parent / "test_convert_mmseg_keys"  # the released key/shape lists, one per config
RELEASED = sorted(p.stem for p in KEYS_DIR.glob("*.tsv"))


def released_keys(name: str) -> list[tuple[str, list[int]]]:
    return read_key_list(KEYS_DIR / f"{name}.tsv")


def released_checkpoint(name: str, seed: int = 0) -> dict:
    state_dict = random_state_dict(released_keys(name), seed)
    return {"meta": {"mmseg_version": "0.21.0", "iter": 80000, "CLASSES": ("wall", "building")},
            "state_dict": state_dict}


def released_param(name: str):
    marks = [pytest.mark.slow] if "swin-l" in name else []
    return pytest.param(name, marks=marks, id=name.split("_")[1] + "_" + name.split("_")[2] + name[-4:])


def test_every_released_config_has_a_key_list():
    assert len(RELEASED) == 7 and all(name.startswith("knet-s3_") for name in RELEASED)


@pytest.mark.parametrize("name", [released_param(n) for n in RELEASED])
def test_released_checkpoint_converts_exactly_and_survives_a_round_trip(name, tmp_path):
    checkpoint = released_checkpoint(name)
    source = checkpoint["state_dict"]
    converted = convert_mmseg_state_dict(checkpoint, name)  # raises on any missing/unexpected key

    model = create_model(name).eval()
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    # every non-backbone tensor keeps its name; every released tensor is used
    model_state = model.state_dict()
    for key, value in source.items():
        if not key.startswith("backbone."):
            assert torch.equal(model_state[key], value), key
    if "r50" in name:  # the 6 stem renames, the rest unchanged
        renamed = 0
        for key, value in source.items():
            for old, new in RESNET_STEM_RENAMES.items():
                if key.startswith(f"backbone.{old}"):
                    key, renamed = key.replace(old, new, 1), renamed + 1
            assert torch.equal(model_state[key], value), key
        assert renamed == 3 * 1 + 3 * 5 and len(converted) == len(source)

    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(images)
    assert torch.isfinite(before).all()

    buffer = io.BytesIO()  # a save/load round trip in memory: disk I/O of 0.3-1 GB per model would dominate
    torch.save({"state_dict": converted}, buffer)
    del checkpoint, source, converted
    buffer.seek(0)
    saved = torch.load(buffer, map_location="cpu", weights_only=True)
    # wipe every weight and statistic (one model build saved: Swin-L is 1 GB), then load what was saved
    with torch.no_grad():
        for value in model.state_dict().values():
            value.zero_()
    model.load_state_dict(saved["state_dict"], strict=True)
    with torch.no_grad():
        after = model(images)
    assert torch.equal(before, after)


def test_convert_checkpoint_file_writes_a_loadable_knetlab_checkpoint(tmp_path):
    name = "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"
    checkpoint = released_checkpoint(name, seed=3)
    in_path, out_path = tmp_path / "released.pth", tmp_path / "converted" / "knet.pt"
    torch.save(checkpoint, in_path)
    assert convert_checkpoint_file(in_path, out_path, name) == out_path
    saved = torch.load(out_path, map_location="cpu", weights_only=True)
    assert saved["meta"] == {"model": name, "converted_from": "mmsegmentation", "source_file": "released.pth",
                             "source_mmseg_version": "0.21.0", "source_iter": 80000}
    model = create_model(name)
    model.load_state_dict(saved["state_dict"], strict=True)
    source = checkpoint["state_dict"]
    assert torch.equal(model.state_dict()["backbone.bn1.running_var"], source["backbone.stem.7.running_var"])
    assert torch.equal(model.state_dict()["decode_head.kernel_update_head.1.attention.attn.in_proj_weight"],
                       source["decode_head.kernel_update_head.1.attention.attn.in_proj_weight"])


def test_raw_state_dict_and_ddp_prefix_are_accepted():
    name = "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"
    state_dict = released_checkpoint(name)["state_dict"]
    plain = convert_mmseg_state_dict(state_dict, name)
    prefixed = convert_mmseg_state_dict({f"module.{k}": v for k, v in state_dict.items()}, name)
    assert list(plain) == list(prefixed) and all(plain[k] is prefixed[k] for k in plain)


def test_checkpoint_of_another_head_is_refused_naming_the_keys():
    fcn = released_checkpoint("knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512")
    with pytest.raises(ConversionError) as err:
        convert_mmseg_state_dict(fcn, "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512")
    message = str(err.value)
    assert "for model 'knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512' does not match" in message
    assert "missing: decode_head.kernel_generate_head.psp_modules.0.1.conv.weight" in message
    assert "unexpected: decode_head.kernel_generate_head.convs.0.conv.weight" in message


def test_shape_mismatch_and_single_missing_key_are_named():
    name = "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"
    state_dict = released_checkpoint(name)["state_dict"]
    state_dict["decode_head.kernel_generate_head.conv_seg.weight"] = torch.zeros(19, 512, 1, 1)
    del state_dict["decode_head.kernel_update_head.2.fc_mask.bias"]
    state_dict["decode_head.extra.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as err:
        convert_mmseg_state_dict(state_dict, name)
    message = str(err.value)
    assert "1 missing: decode_head.kernel_update_head.2.fc_mask.bias" in message
    assert "1 unexpected: decode_head.extra.weight" in message
    assert ("1 shape mismatch: decode_head.kernel_generate_head.conv_seg.weight [19, 512, 1, 1] "
            "(model: [150, 512, 1, 1])") in message
    # a checkpoint of another dataset converts when the model is built for it
    state_dict = released_checkpoint(name)["state_dict"]
    for key in ("decode_head.kernel_generate_head.conv_seg", "auxiliary_head.conv_seg"):
        state_dict[f"{key}.weight"] = state_dict[f"{key}.weight"][:19]
        state_dict[f"{key}.bias"] = state_dict[f"{key}.bias"][:19]
    create_model(name, num_classes=19).load_state_dict(convert_mmseg_state_dict(state_dict, name, num_classes=19))


def test_backbone_of_another_depth_is_refused():
    r50 = released_checkpoint("knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512")["state_dict"]
    del r50["backbone.layer3.5.conv1.weight"]
    r50["backbone.layer3.6.conv1.weight"] = torch.zeros(256, 1024, 1, 1)
    with pytest.raises(ConversionError, match=r"missing: backbone.layer3.5.conv1.weight.*unexpected: "
                                              r"backbone.layer3.6.conv1.weight"):
        convert_mmseg_state_dict(r50, "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512")


def test_unreadable_and_missing_files_are_clear_errors(tmp_path):
    name = "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"
    with pytest.raises(ConversionError, match=r"nothing.pth: checkpoint file does not exist"):
        convert_checkpoint_file(tmp_path / "nothing.pth", tmp_path / "out.pt", name)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match=r"junk.pth: cannot be read as a PyTorch checkpoint"):
        convert_checkpoint_file(junk, tmp_path / "out.pt", name)
    empty = tmp_path / "empty.pth"
    torch.save({"meta": {"iter": 1}}, empty)
    with pytest.raises(ConversionError, match=r"empty.pth: holds no tensors \(top-level keys: meta\)"):
        convert_checkpoint_file(empty, tmp_path / "out.pt", name)
    with pytest.raises(Exception, match=r"unknown model 'knet'"):
        convert_checkpoint_file(junk, tmp_path / "out.pt", "knet")
    assert not (tmp_path / "out.pt").exists()
