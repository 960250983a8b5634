"""Backbone pretrained weights from files the tests write (mmseg `open-mmlab://resnet50_v1c` layout, timm layout,
a full segmentation checkpoint) and from a real S3-compatible server (moto, loopback); files that do not fit the
backbone are refused naming the keys."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch

from knetlab.models import PretrainedError, build_backbone, create_model, load_backbone_weights
from knetlab.models.convert import RESNET_STEM_RENAMES


def random_weights(backbone: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """The backbone's keys with fresh random values (integers kept), so loading them is visible."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=generator) if v.is_floating_point() else v.clone() + 7)
            for k, v in backbone.state_dict().items()}


def to_mmseg_resnet(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm resnet keys -> mmcv ResNetV1c keys (the layout of open-mmlab://resnet50_v1c), plus its classifier."""
    inverse = {new: old for old, new in RESNET_STEM_RENAMES.items()}
    out = {}
    for key, value in state_dict.items():
        for new, old in inverse.items():
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    out["fc.weight"], out["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return out


def assert_loaded(backbone: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = backbone.state_dict()
    assert set(state) == set(weights)
    for key, value in weights.items():
        assert torch.equal(state[key], value), key


def test_mmseg_resnet50_v1c_layout_loads_into_r50_d8(tmp_path, caplog):
    backbone = build_backbone("r50-d8", img_size=512)
    weights = random_weights(backbone)
    path = tmp_path / "resnet50_v1c.pth"
    torch.save({"state_dict": to_mmseg_resnet(weights), "meta": {"note": "mmcv layout"}}, path)
    with caplog.at_level(logging.INFO, logger="knetlab.models.pretrained"):
        report = load_backbone_weights(backbone, str(path), "r50-d8")
    assert_loaded(backbone, weights)
    assert report.layout == "mmseg ResNetV1c" and report.missing == []
    assert report.unexpected == ["fc.weight", "fc.bias"] and report.loaded == len(weights)
    assert "not used from" in caplog.text and "fc.weight" in caplog.text


def test_timm_layout_and_full_segmentation_checkpoint_load(tmp_path):
    backbone = build_backbone("tiny", img_size=64)
    weights = random_weights(backbone, seed=1)
    timm_file = tmp_path / "timm.pth"
    torch.save({**weights, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, timm_file)
    report = load_backbone_weights(backbone, str(timm_file), "tiny")
    assert_loaded(backbone, weights)
    assert report.layout == "timm/torchvision ResNet"

    # a knetlab (or converted) segmentation checkpoint: its backbone.* keys are taken
    donor = create_model("tiny")
    segmentation_file = tmp_path / "knet.pt"
    torch.save({"state_dict": donor.state_dict(), "meta": {"model": "tiny"}}, segmentation_file)
    model = create_model("tiny", pretrained=str(segmentation_file))
    assert_loaded(model.backbone, {k[len("backbone."):]: v for k, v in donor.state_dict().items()
                                   if k.startswith("backbone.")})


def test_weights_from_s3_through_the_endpoint(s3_server, tmp_path):
    backbone = build_backbone("tiny", img_size=64)
    weights = random_weights(backbone, seed=2)
    path = tmp_path / "w.pth"
    torch.save(to_mmseg_resnet(weights), path)
    s3_server.client().upload_file(str(path), s3_server.bucket, "pretrain/resnet_v1c.pth")
    uri = f"s3://{s3_server.bucket}/pretrain/resnet_v1c.pth"
    model = create_model("tiny", pretrained=uri)
    assert_loaded(model.backbone, weights)

    with pytest.raises(PretrainedError, match=r"s3://knetlab-test/pretrain/nothing.pth: cannot be downloaded"):
        create_model("tiny", pretrained=f"s3://{s3_server.bucket}/pretrain/nothing.pth")
    with pytest.raises(PretrainedError, match=r"s3://knetlab-test: an S3 URI must be s3://bucket/key"):
        create_model("tiny", pretrained=f"s3://{s3_server.bucket}")


def test_files_that_do_not_fit_are_refused_naming_the_keys(tmp_path):
    backbone = build_backbone("tiny", img_size=64)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    weights = random_weights(backbone)

    missing = dict(weights)
    del missing["layer2.0.conv2.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(PretrainedError, match=r"missing.pth \(timm/torchvision ResNet layout\) does not fit backbone "
                                              r"'tiny': 1 missing: layer2.0.conv2.weight"):
        load_backbone_weights(backbone, str(tmp_path / "missing.pth"), "tiny")

    # a ResNet-50 file into the tiny ResNet: every width differs
    r50 = random_weights(build_backbone("r50-d8", img_size=512))
    torch.save(r50, tmp_path / "r50.pth")
    with pytest.raises(PretrainedError, match=r"mismatch: conv1.0.weight \[32, 3, 3, 3\] \(model: \[16, 3, 3, 3\]\)"):
        load_backbone_weights(backbone, str(tmp_path / "r50.pth"), "tiny")

    torch.save({"encoder.conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(PretrainedError, match=r"other.pth: no key fits backbone 'tiny'.*encoder.conv.weight"):
        load_backbone_weights(backbone, str(tmp_path / "other.pth"), "tiny")

    with pytest.raises(PretrainedError, match=r"nothing.pth: pretrained weights file does not exist"):
        create_model("tiny", pretrained=str(tmp_path / "nothing.pth"))
    (tmp_path / "junk.pth").write_text("junk")
    with pytest.raises(PretrainedError, match=r"junk.pth: cannot be read as a PyTorch checkpoint"):
        load_backbone_weights(backbone, str(tmp_path / "junk.pth"), "tiny")
    # the refused files loaded nothing
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_swin_timm_classifier_checkpoint_loads_with_fresh_output_norms(tmp_path):
    import timm

    classifier = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path / "swin_tiny.pth"
    torch.save(classifier.state_dict(), path)
    backbone = build_backbone("swin-t", img_size=512, drop_path_rate=0.3)
    report = load_backbone_weights(backbone, str(path), "swin-t")
    assert report.layout == "timm/Microsoft Swin"
    assert report.missing and all("norm" in k for k in report.missing), report.missing
    state = backbone.state_dict()
    loaded = [k for k in state if k not in report.missing]
    assert len(loaded) == report.loaded > 100


# -- every table row's reference file, in its publisher's key layout, fits the row's backbone ------------------------
# The files cannot be downloaded here: each layout is rebuilt (shapes only, on the meta device) from an independent
# source: mmcv ResNetV1c and mmseg Swin from the reference's key lists (tests/test_convert_mmseg_keys, the backbone
# part of the released K-Net checkpoints, which mmseg's ImageNet files share, plus the classifier's `fc`/`norm` the
# files carry and minus Swin's norm0-3 they lack), torchvision's ResNets from torchvision itself, Microsoft's Swin-L
# from timm's model in Microsoft's arrangement (patch merging at the end of a stage, buffers kept, `head.*`).
KEY_LISTS = Path(__file__).resolve().parent / "test_convert_mmseg_keys"
ROW_FILES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "experiments").glob("*/knet-*.yaml"))


def mmseg_imagenet_layout(row: str, classifier_width: int) -> dict[str, torch.Tensor]:
    from released_keys import read_key_list

    keys = [(k[len("backbone."):], shape) for k, shape in read_key_list(KEY_LISTS / f"{row}.tsv")
            if k.startswith("backbone.") and not re.match(r"backbone\.norm[0-3]\.", k)]
    tensors = {k: torch.empty(shape, device="meta") for k, shape in keys}
    if "stem.0.weight" in tensors:  # ResNetV1c: its ImageNet classifier
        tensors.update({"fc.weight": torch.empty(1000, classifier_width, device="meta"),
                        "fc.bias": torch.empty(1000, device="meta")})
    else:  # mmseg's Swin conversion keeps the classifier's final norm
        tensors.update({"norm.weight": torch.empty(classifier_width, device="meta"),
                        "norm.bias": torch.empty(classifier_width, device="meta")})
    return tensors


def reference_file_layout(reference: str) -> dict[str, torch.Tensor]:
    import timm
    import torchvision

    with torch.device("meta"):
        if reference == "open-mmlab/resnet50_v1c":
            return mmseg_imagenet_layout("knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512", 2048)
        if reference == "mmseg/swin_tiny_patch4_window7_224":
            return mmseg_imagenet_layout("knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512", 768)
        if reference == "mmseg/swin_large_patch4_window7_224_22k":
            return mmseg_imagenet_layout("knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512", 1536)
        if reference.startswith("torchvision/"):
            return dict(getattr(torchvision.models, reference.split("/")[1])().state_dict())
        assert reference == "microsoft/swin_large_patch4_window7_224_22k", reference
        timm_keys = timm.create_model("swin_large_patch4_window7_224", num_classes=21841).state_dict()
        microsoft = {}
        for key, value in timm_keys.items():
            key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
            microsoft[key.replace("head.fc.", "head.")] = value
            if key.endswith("attn.relative_position_bias_table"):
                microsoft[key.replace("relative_position_bias_table", "relative_position_index")] = \
                    torch.empty(49, 49, dtype=torch.long)
        return microsoft


@pytest.mark.parametrize("row", ROW_FILES)
def test_each_rows_reference_weights_fit_its_backbone(row: str) -> None:
    from knetlab.models.backbones import backbone_info
    from knetlab.models.det_backbones import DET_BACKBONE_FAMILIES, build_det_backbone
    from knetlab.models.pretrained import ALLOWED_MISSING, CLASSIFIER_KEYS, fit_backbone_weights
    from knetlab.models.zoo import MODELS, DetModelSpec

    spec = MODELS[row]
    tensors = reference_file_layout(spec.reference_pretrained)
    with torch.device("meta"):
        if isinstance(spec, DetModelSpec):
            backbone, family = build_det_backbone(spec.backbone), DET_BACKBONE_FAMILIES[spec.backbone]
        else:
            backbone = build_backbone(spec.backbone, img_size=spec.crop_size, drop_path_rate=spec.drop_path_rate)
            family = backbone_info(spec.backbone).family
    expected = backbone.state_dict()
    to_load, report = fit_backbone_weights(tensors, expected, family, spec.reference_pretrained, spec.backbone)
    assert all(ALLOWED_MISSING.search(k) for k in report.missing), report.missing
    assert all(CLASSIFIER_KEYS.search(k) for k in report.unexpected), report.unexpected
    weights = [k for k in expected if not k.endswith("num_batches_tracked")]
    assert len(to_load) >= 0.95 * len(weights) and report.loaded == len(expected) - len(report.missing)
    if "swin" in spec.backbone:  # only the output norms (fresh in the reference too) start at their init
        assert sorted(report.missing) == [f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    if "dcn" in spec.backbone:  # the deformable convs' offsets start at 0, as in the reference
        assert report.missing and all(".conv_offset." in k or "num_batches" in k for k in report.missing)
