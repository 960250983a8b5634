"""Panoptic/instance K-Net models: the zoo's rows and the one create_model door, parameter counts equal to the
reference's (total and per part), ResNet keys equal to torchvision's, the reference's init and frozen stages /
norm_eval, deformable convs, the tiny models' eval outputs, and the post-processing rules on hand-built logits
(panoptic fusion thresholds and ids, instance top-k)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from knetlab.models import (
    DET_MODELS,
    MODELS,
    KNetDetector,
    ModelError,
    count_parameters,
    create_model,
    list_models,
    models_table,
    reference_panoptic_map,
)
from knetlab.models.det_backbones import DeformConv2dPack, build_det_backbone
from knetlab.models.det_zoo import reference_config_name
from knetlab.models.fpn import sine_positional_encoding
from knetlab.models.panoptic_fusion import instance_topk, panoptic_fusion, rescale_masks

# The reference's counts (K-Net repo on mmdet 2.28.2), docs/knet_panoptic_reference.md §2.5
PARAM_COUNTS = json.loads((Path(__file__).parent / "data" / "param_counts_det.json").read_text())
COUNTED = ["knet-s3_r50_fpn_1x_coco-panoptic", "knet-s3_r50_fpn_1x_coco", "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic"]
RELEASED_DET = [n for n in DET_MODELS if not n.startswith("tiny")]


def test_zoo_has_the_reference_configs_behind_one_create_model():
    assert RELEASED_DET == [
        "knet-s3_r50_fpn_1x_coco-panoptic", "knet-s3_r50_fpn_ms-3x_coco-panoptic",
        "knet-s3_r101_fpn_ms-3x_coco-panoptic", "knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco-panoptic",
        "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic", "knet-s3_r50_fpn_1x_coco", "knet-s3_r50_fpn_ms-3x_coco",
        "knet-s3_r101_fpn_ms-3x_coco", "knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco"]
    names = list_models()
    assert set(DET_MODELS) <= set(names) and set(names) == set(MODELS)
    assert names.index("tiny-upernet") < names.index("knet-s3_r50_fpn_1x_coco-panoptic")  # semantic rows first
    for name, spec in DET_MODELS.items():
        assert (spec.task, spec.num_thing_classes, spec.num_stuff_classes) == (
            ("panoptic", 80, 53) if "panoptic" in name else ("instance", 80, 0)), name
        assert spec.reference_pretrained or name.startswith("tiny")
    assert "resnet101" in DET_MODELS["knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco"].reference_pretrained
    assert "22k" in DET_MODELS["knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic"].reference_pretrained
    assert reference_config_name("knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco") == "knet_s3_r101_dcn-c3-c5_fpn_ms-3x_coco"
    with torch.device("meta"):
        model = create_model("knet-s3_r50_fpn_1x_coco")
    assert isinstance(model, KNetDetector)
    assert (model.task, model.num_thing_classes, model.num_stuff_classes) == ("instance", 80, 0)


@pytest.mark.parametrize("name", COUNTED)
def test_parameter_counts_equal_the_reference_per_part(name):
    with torch.device("meta"):
        model = create_model(name)
    assert count_parameters(model) == PARAM_COUNTS[reference_config_name(name)]


def test_models_table_covers_both_families():
    rows = {row["name"]: row for row in models_table()}
    assert list(rows) == list_models()
    assert rows["knet-s3_r50_fpn_1x_coco-panoptic"] == {
        "name": "knet-s3_r50_fpn_1x_coco-panoptic", "backbone": "r50", "head": "fpn-panoptic", "crop": "1333x800",
        "params": 37_536_852}
    assert rows["knet-s3_r50_fpn_ms-3x_coco"]["params"] == 37_482_368
    assert rows["knet-s3_r50_fpn_ms-3x_coco"]["crop"] == "1333x640-800"


@pytest.mark.parametrize("name,depth", [("r50", 50), ("r101", 101)])
def test_resnet_keys_and_shapes_are_torchvisions(name, depth):
    with torch.device("meta"):
        ours = build_det_backbone(name).state_dict()
        reference = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    reference = {k: tuple(v.shape) for k, v in reference.items() if not k.startswith("fc.")}
    assert {k: tuple(v.shape) for k, v in ours.items()} == reference


def test_dcn_backbone_adds_mmcv_offset_convs_in_stages_2_to_4():
    with torch.device("meta"):
        plain, dcn = build_det_backbone("r101").state_dict(), build_det_backbone("r101-dcn").state_dict()
    extra = sorted(set(dcn) - set(plain))
    assert set(plain) <= set(dcn) and len(extra) == 2 * (4 + 23 + 3)
    assert all(k.startswith(("layer2.", "layer3.", "layer4.")) and ".conv2.conv_offset." in k for k in extra)
    assert tuple(dcn["layer3.0.conv2.conv_offset.weight"].shape) == (18, 256, 3, 3)
    assert tuple(dcn["layer3.0.conv2.weight"].shape) == (256, 256, 3, 3)  # DeformConv2d's own weight, no bias


def test_deformable_conv_with_zero_offsets_is_the_plain_convolution():
    torch.manual_seed(0)
    conv = DeformConv2dPack(8, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 8, 11, 9)
    expected = F.conv2d(x, conv.weight, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    # an offset of exactly (dy, dx) = (1, 0) at every kernel point samples the row below (the bottom row reads zero
    # padding); output row 0 differs, its top kernel row reads image row 0 instead of the padding
    with torch.no_grad():
        conv.conv_offset.bias.copy_(torch.tensor([1.0, 0.0] * 9))
    shifted = F.conv2d(F.pad(x[:, :, 1:], (0, 0, 0, 1)), conv.weight, stride=2, padding=1)
    torch.testing.assert_close(conv(x)[:, :, 1:], shifted[:, :, 1:], rtol=1e-5, atol=1e-5)
    tiny = torch.randn(1, 8, 2, 2)  # smaller than the kernel: padded and cropped as mmcv does
    torch.testing.assert_close(conv(tiny).shape, (1, 6, 1, 1))


def test_frozen_stem_and_layer1_and_batchnorm_eval_hold_in_train_mode():
    torch.manual_seed(0)
    model = create_model("tiny-instance").train()
    backbone = model.backbone
    frozen = [n for n, p in backbone.named_parameters() if not p.requires_grad]
    stem_and_layer1 = [n for n, _ in backbone.named_parameters() if n.startswith(("conv1.", "bn1.", "layer1."))]
    assert frozen == stem_and_layer1
    assert all(p.requires_grad for n, p in backbone.named_parameters() if n.startswith(("layer2.", "layer3.")))
    batchnorms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(m.training for m in batchnorms)
    assert model.neck.training and model.roi_head.training
    stats = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone(torch.randn(2, 3, 64, 64)).__getitem__(-1).sum().backward()
    assert all(torch.equal(v, backbone.state_dict()[k]) for k, v in stats.items()), "BN statistics must not move"
    assert backbone.layer1[0].conv1.weight.grad is None and backbone.layer2[0].bn1.weight.grad is not None


def test_r50_frozen_parameters_are_the_references_225344():
    with torch.device("meta"):
        model = create_model("knet-s3_r50_fpn_1x_coco-panoptic").train()
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == 225_344


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = create_model("knet-s3_r50_fpn_1x_coco-panoptic")
    prior = -math.log(99)
    rpn = model.rpn_head
    assert abs(rpn.init_kernels.weight.std().item() - 1.0) < 0.02  # N(0, 1)
    assert abs(rpn.conv_seg.weight.std().item() - 0.01) < 0.001
    assert torch.allclose(rpn.conv_seg.bias, torch.full((133,), prior))
    conv = rpn.localization_fpn.convs_all_levels[3].conv2
    assert abs(conv.conv.weight.std().item() - 0.01) < 0.001 and conv.conv.bias is None
    assert torch.equal(conv.gn.weight, torch.ones(256)) and torch.equal(conv.gn.bias, torch.zeros(256))
    lateral = model.neck.lateral_convs[3].conv
    bound = math.sqrt(6 / (2048 + 256))
    assert lateral.weight.abs().max() <= bound and lateral.weight.abs().max() > 0.9 * bound  # xavier uniform
    assert torch.equal(lateral.bias, torch.zeros(256))
    for stage in model.roi_head.mask_head:
        assert torch.allclose(stage.fc_cls.bias, torch.full((133,), prior))
        assert torch.equal(stage.feat_transform.conv.bias, torch.zeros(256))
        assert torch.equal(stage.attention.attn.in_proj_bias, torch.zeros(768))
        w = stage.ffn.layers[0][0].weight
        assert w.abs().max() <= math.sqrt(6 / (256 + 2048)) and w.abs().max() > 0.9 * math.sqrt(6 / 2304)


def test_sine_positional_encoding_values():
    pos = sine_positional_encoding(torch.zeros(1, 256, 3, 5), 128)
    assert pos.shape == (1, 256, 3, 5)
    y = torch.arange(1, 4, dtype=torch.float32) / (3 + 1e-6) * 2 * math.pi
    x = torch.arange(1, 6, dtype=torch.float32) / (5 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(pos[0, 0, :, 0], y.sin())  # y first, sin/cos interleaved
    torch.testing.assert_close(pos[0, 1, :, 0], y.cos())
    torch.testing.assert_close(pos[0, 128, 0, :], x.sin())
    torch.testing.assert_close(pos[0, 3, :, 0], (y / 10000 ** (2 / 128)).cos())


@pytest.mark.parametrize("name", ["tiny-panoptic", "tiny-instance"])
def test_tiny_model_eval_outputs(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    images = torch.randn(2, 3, 96, 128)
    metas = [{"img_shape": (90, 128), "ori_shape": (45, 64)}, {"img_shape": (96, 100), "ori_shape": (120, 125)}]
    with torch.no_grad():
        raw = model.raw_outputs(images)
        results = model(images, metas)
    n, c = (153, 133) if name == "tiny-panoptic" else (100, 80)
    assert raw["cls_logits"].shape == (2, n, c) and raw["mask_logits"].shape == (2, n, 24, 32)
    assert len(results) == 2
    for result, meta in zip(results, metas):
        if model.task == "panoptic":
            assert result["pan_seg"].shape == meta["ori_shape"] and result["pan_seg"].dtype == torch.int64
            ids = [s["id"] for s in result["segments"]]
            assert ids == list(range(1, len(ids) + 1))
            assert set(result["pan_seg"].unique().tolist()) <= {0, *ids}
            assert reference_panoptic_map(result, 133).shape == meta["ori_shape"]
        else:
            assert result["masks"].shape == (100, *meta["ori_shape"]) and result["masks"].dtype == torch.bool
            assert result["labels"].dtype == torch.int64 and result["scores"].dtype == torch.float32
            assert torch.all(result["scores"][:-1] >= result["scores"][1:])
            assert result["labels"].max() < 80


def test_panoptic_fusion_rules_on_hand_built_scores():
    # 3 thing proposals + 2 stuff kernels (T=2 thing classes, S=2 stuff classes) on a 4x6 image
    cls = torch.zeros(5, 4)
    cls[0, 1] = 0.9  # thing 0: class 1, kept
    cls[1, 0] = 0.29  # thing 1: under 0.3, dropped
    cls[2, 0] = 0.8  # thing 2: half of it is covered by thing 0 -> kept area / area 0.5 < 0.6, dropped
    cls[3, 2], cls[3, 3] = 0.05, 0.99  # stuff kernel 0 is scored on its own class (2) only: 0.05, no threshold
    cls[4, 3] = 0.5  # stuff kernel 1: class 3
    probs = torch.zeros(5, 4, 6)
    probs[0, :2, :3] = 1.0
    probs[1, 2:, :2] = 1.0
    probs[2, :2, 1:5] = 0.6  # 8 pixels at >= 0.5; 0.8 * 0.6 = 0.48 < 0.9 where thing 0 is
    probs[3, 2:, 2:4] = probs[3, :2, 5] = 1.0
    probs[4, 2:, 4:] = 1.0
    result = panoptic_fusion(cls, probs, num_proposals=3, num_thing_classes=2)
    segments = result["segments"]
    assert [(s["id"], s["category"], s["isthing"]) for s in segments] == [(1, 1, True), (2, 3, False), (3, 2, False)]
    assert segments[0]["score"] == pytest.approx(0.9) and segments[2]["score"] == pytest.approx(0.05)
    expected = torch.tensor([[1, 1, 1, 0, 0, 3],
                             [1, 1, 1, 0, 0, 3],
                             [0, 0, 3, 3, 2, 2],
                             [0, 0, 3, 3, 2, 2]])
    # the pixels whose argmax is a rejected segment (things 1 and 2) stay VOID: they are not re-assigned
    assert torch.equal(result["pan_seg"], expected)
    void, lookup = 4, {0: 4, 1: 1 + 0 * 1000, 2: 3 + 1 * 1000, 3: 2 + 2 * 1000}
    assert torch.equal(reference_panoptic_map(result, void), expected.apply_(lookup.get))


def test_panoptic_fusion_overlap_bar_is_inclusive():
    cls = torch.tensor([[0.9], [0.8]])
    probs = torch.zeros(2, 1, 10)
    probs[0, 0, :4] = 1.0
    probs[1, 0, :] = 0.7  # 10 pixels at >= 0.5, 6 left after thing 0 takes 4: 6 / 10 = 0.6 is kept
    result = panoptic_fusion(cls, probs, num_proposals=2, num_thing_classes=1)
    assert [s["id"] for s in result["segments"]] == [1, 2]
    assert result["pan_seg"].tolist() == [[1] * 4 + [2] * 6]
    probs[0, 0, :5] = 1.0  # thing 0 takes 5: 5 / 10 < 0.6, thing 1 dropped and its pixels VOID
    result = panoptic_fusion(cls, probs, num_proposals=2, num_thing_classes=1)
    assert [s["id"] for s in result["segments"]] == [1]
    assert result["pan_seg"].tolist() == [[1] * 5 + [0] * 5]


def test_instance_topk_takes_class_proposal_pairs():
    cls = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.3, 0.85]])  # proposal 0 appears twice
    logits = torch.full((2, 4, 4), -10.0)
    logits[0, :2] = 10.0
    logits[1, 2:, 2:] = 10.0
    result = instance_topk(cls, logits, pad_shape=(16, 16), img_shape=(16, 16), ori_shape=(8, 8), max_per_img=4)
    assert result["labels"].tolist() == [0, 2, 1, 1]
    torch.testing.assert_close(result["scores"], torch.tensor([0.9, 0.85, 0.8, 0.3]))
    assert torch.equal(result["masks"][0], result["masks"][2])  # one proposal, two labels, the same mask
    assert result["masks"][0, :4].all() and not result["masks"][0, 4:].any()
    assert result["masks"][1, 4:, 4:].all() and result["masks"][1].sum() == 16


def test_rescale_masks_takes_the_sigmoid_first_then_crops_the_padding():
    # sigmoid, then bilinear: 0.75 * sigmoid(20) + 0.25 * sigmoid(-20) (bilinear first would give sigmoid(10))
    probs = rescale_masks(torch.tensor([[[20.0, -20.0]]]), pad_shape=(1, 4), img_shape=(1, 4), ori_shape=(1, 4))
    torch.testing.assert_close(probs, torch.tensor([[[1.0, 0.75, 0.25, 0.0]]]))
    logits = torch.full((1, 4, 4), -20.0)
    logits[0, :, 3] = 20.0  # only where the padding is
    assert rescale_masks(logits, pad_shape=(16, 16), img_shape=(16, 16), ori_shape=(8, 8)).max() > 0.9
    cropped = rescale_masks(logits, pad_shape=(16, 16), img_shape=(16, 8), ori_shape=(8, 4))
    assert cropped.shape == (1, 8, 4) and cropped.max() < 1e-6


def test_bad_inputs_give_one_line_errors():
    model = create_model("tiny-instance").eval()
    with pytest.raises(ModelError, match="multiple of 32"):
        model(torch.randn(1, 3, 70, 64), [{"img_shape": (70, 64), "ori_shape": (70, 64)}])
    with pytest.raises(ModelError, match="ori_shape"):
        model(torch.randn(1, 3, 64, 64), [{"img_shape": (64, 64)}])
    with pytest.raises(ModelError, match="2 images but 1"):
        model(torch.randn(2, 3, 64, 64), [{"img_shape": (64, 64), "ori_shape": (64, 64)}])
    with pytest.raises(ModelError, match="unknown option"):
        create_model("tiny-panoptic", num_classes=3)
    with pytest.raises(ModelError, match="num_stuff_classes"):
        create_model("tiny-instance", num_stuff_classes=53)
    with pytest.raises(ModelError, match="unknown backbone"):
        create_model("tiny-panoptic", backbone="r50-d8")


def test_tiny_model_trains_through_the_det_losses():
    pytest.importorskip("knetlab.models.det_losses", reason="the det losses come from the det-losses branch")
    torch.manual_seed(0)
    model = create_model("tiny-panoptic").train()
    images = torch.randn(2, 3, 64, 96)
    masks = torch.zeros(2, 60, 90, dtype=torch.bool)
    masks[0, 10:30, 10:40] = True
    masks[1, 30:50, 50:80] = True
    sem_seg = torch.full((60, 90), 85, dtype=torch.long)
    sem_seg[masks[0]] = 3
    sem_seg[masks[1]] = 7
    targets = [{"masks": masks, "labels": torch.tensor([3, 7]), "sem_seg": sem_seg},
               {"masks": torch.zeros(0, 50, 90, dtype=torch.bool), "labels": torch.zeros(0, dtype=torch.long),
                "sem_seg": torch.full((50, 90), 100, dtype=torch.long)}]  # no thing, one stuff class
    losses = model(images, targets)
    expected = {"rpn_mask", "rpn_dice", "rpn_seg", "rpn_rank"}
    expected |= {f"s{i}_{k}" for i in range(3) for k in ("cls", "mask", "dice", "rank")}
    assert set(losses) == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"every trainable parameter takes part in the loss: {no_grad}"


def test_pretrained_torchvision_resnet_weights_load_into_the_backbone(tmp_path):
    from knetlab.models import PretrainedError

    torch.manual_seed(0)
    donor = build_det_backbone("tiny")
    imagenet = {**donor.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    path = tmp_path / "resnet.pth"
    torch.save(imagenet, path)
    model = create_model("tiny-panoptic", pretrained=str(path))
    assert all(torch.equal(v, donor.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert not model.backbone.layer1[0].conv1.weight.requires_grad  # still frozen after loading
    del imagenet["layer4.0.conv3.weight"]
    torch.save(imagenet, path)
    with pytest.raises(PretrainedError, match=r"1 missing: layer4.0.conv3.weight"):
        create_model("tiny-panoptic", pretrained=str(path))
