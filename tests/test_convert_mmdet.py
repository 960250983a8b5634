"""Conversion of released K-Net COCO checkpoints (the K-Net repo's mmdet 2.x layout): for each reference key list
(tests/data/knet_det_keys/*.tsv, random values), every key converts with none left over either way and every tensor
lands in the model unchanged; the `knetlab convert mmdet` file round-trips; mismatching checkpoints are refused with
a one-line error naming the offending keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from released_keys import random_state_dict, read_key_list

from knetlab.models import (
    ConversionError,
    ModelError,
    convert_mmdet_checkpoint_file,
    convert_mmdet_state_dict,
    create_model,
)
from knetlab.models.det_zoo import reference_config_name
from knetlab.models.swin import convert_mmseg_swin_state_dict

KEYS_DIR = Path(__file__).parent / "data" / "knet_det_keys"
RELEASED = {
    "knet-s3_r50_fpn_1x_coco-panoptic": 502,
    "knet-s3_r50_fpn_1x_coco": 502,
    "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic": 541,
}


def released_keys(name: str) -> list[tuple[str, list[int]]]:
    return read_key_list(KEYS_DIR / f"{reference_config_name(name)}.tsv")


def released_state_dict(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return random_state_dict(released_keys(name), seed)


@pytest.mark.parametrize("name", list(RELEASED))
def test_every_released_key_converts_with_none_left_over(name):
    keys = released_keys(name)
    assert len(keys) == RELEASED[name]
    with torch.device("meta"):  # names and shapes: Swin-L would allocate 1 GB
        checkpoint = {key: torch.empty(shape) for key, shape in keys}
        expected = create_model(name).state_dict()
        converted = convert_mmdet_state_dict({"meta": {"epoch": 12}, "state_dict": checkpoint}, name)
    assert list(converted) == list(expected)
    assert all(converted[k].shape == expected[k].shape for k in expected)
    dropped = {k for k, _ in keys} - {k for k in converted}
    if "swin" in name:  # renamed backbone keys; only the computed relative_position_index buffers are dropped
        assert {k for k in dropped if not k.startswith("backbone.")} == set()
        assert len(keys) - len(converted) == sum(k.endswith("relative_position_index") for k, _ in keys) == 24
    else:  # the module names are the reference's: nothing is renamed
        assert dropped == set()


@pytest.mark.parametrize("name", ["knet-s3_r50_fpn_1x_coco-panoptic", "knet-s3_r50_fpn_1x_coco"])
def test_released_tensors_land_unchanged_and_load_strictly(name):
    state_dict = released_state_dict(name)
    converted = convert_mmdet_state_dict(state_dict, name)
    assert all(converted[k] is state_dict[k] for k in converted)
    with torch.device("meta"):
        model = create_model(name)
    model.load_state_dict(converted, strict=True, assign=True)
    assert torch.equal(model.rpn_head.init_kernels.weight, state_dict["rpn_head.init_kernels.weight"])
    assert torch.equal(model.roi_head.mask_head[2].fc_cls.bias, state_dict["roi_head.mask_head.2.fc_cls.bias"])


def test_swin_backbone_keys_take_the_mmseg_swin_conversion():
    name = "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic"
    with torch.device("meta"):
        state_dict = {key: torch.empty(shape) for key, shape in released_keys(name)}
        converted = convert_mmdet_state_dict(state_dict, name)
    backbone = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    for key, value in convert_mmseg_swin_state_dict(backbone).items():
        assert converted[f"backbone.{key}"] is value
    assert converted["backbone.layers.1.downsample.reduction.weight"] is state_dict[
        "backbone.stages.0.downsample.reduction.weight"]
    assert converted["neck.lateral_convs.0.conv.weight"].shape == (256, 192, 1, 1)


@pytest.mark.parametrize("name", ["knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco", "knet-s3_r101_fpn_ms-3x_coco-panoptic"])
def test_r101_checkpoints_convert_as_their_own_keys(name):
    # no released key list here: the R-101 (DCN) keys are torchvision's (+ mmcv's conv2.conv_offset), see
    # test_det_models.py; a checkpoint in that layout converts unchanged
    with torch.device("meta"):
        state_dict = create_model(name).state_dict()
        converted = convert_mmdet_state_dict(state_dict, name)
    assert list(converted) == list(state_dict)
    assert ("backbone.layer4.2.conv2.conv_offset.weight" in converted) == ("dcn" in name)


def test_mismatching_checkpoints_are_refused_with_the_keys_named():
    name = "knet-s3_r50_fpn_1x_coco"
    with torch.device("meta"):
        state_dict = {key: torch.empty(shape) for key, shape in released_keys(name)}
        del state_dict["roi_head.mask_head.1.fc_mask.bias"]
        state_dict["roi_head.mask_head.3.fc_mask.bias"] = torch.empty(256)
        with pytest.raises(ConversionError) as info:
            convert_mmdet_state_dict(state_dict, name)
        message = str(info.value)
        assert "\n" not in message
        assert "1 missing: roi_head.mask_head.1.fc_mask.bias" in message
        assert "1 unexpected: roi_head.mask_head.3.fc_mask.bias" in message
        # a panoptic checkpoint for the instance model: the class layers' shapes differ
        panoptic = {key: torch.empty(shape) for key, shape in released_keys("knet-s3_r50_fpn_1x_coco-panoptic")}
        with pytest.raises(ConversionError, match=r"shape mismatch: .*rpn_head.conv_seg.weight \[133, 256, 1, 1\]"):
            convert_mmdet_state_dict(panoptic, name)
    with pytest.raises(ModelError, match="unknown panoptic/instance model"):
        convert_mmdet_state_dict({}, "tiny")


def test_convert_file_round_trip_and_command_line(tmp_path, capsys):
    from knetlab.platform.cli import main

    torch.manual_seed(0)
    released = create_model("tiny-instance")  # stands in for a released file: the same layout, small
    source = tmp_path / "released.pth"
    torch.save({"meta": {"epoch": 12, "mmdet_version": "2.17.0"}, "state_dict": released.state_dict()}, source)
    out = convert_mmdet_checkpoint_file(source, tmp_path / "out" / "converted.pt", "tiny-instance")
    saved = torch.load(out, map_location="cpu", weights_only=True)
    assert saved["meta"]["model"] == "tiny-instance" and saved["meta"]["source_mmdet_version"] == "2.17.0"
    model = create_model("tiny-instance").eval()
    model.load_state_dict(saved["state_dict"], strict=True)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.raw_outputs(images)["cls_logits"], released.eval().raw_outputs(images)["cls_logits"])

    assert main(["convert", "mmdet", str(source), str(tmp_path / "cli.pt"), "--model", "tiny-instance"]) == 0
    assert "mmdet" in capsys.readouterr().out and (tmp_path / "cli.pt").is_file()
    with pytest.raises(ConversionError, match="does not exist"):
        convert_mmdet_checkpoint_file(tmp_path / "missing.pth", tmp_path / "x.pt", "tiny-instance")
    with pytest.raises(ConversionError, match="tiny-panoptic"):
        convert_mmdet_checkpoint_file(source, tmp_path / "x.pt", "tiny-panoptic")
