"""The K-Net model zoo: every released config builds with mmsegmentation's exact parameter counts, runs a forward
pass at its crop size on CPU, `tiny` trains; the K-Net head's quirks (2x256 updator chunks, post-FFN kernels,
cloned conv_seg kernels, default init) and mmseg's loss definition; clear errors for bad names and inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from knetlab.models import (
    BACKBONES,
    HEADS,
    MODELS,
    KNetSegmentor,
    ModelError,
    build_backbone,
    count_parameters,
    create_model,
    list_models,
    models_table,
)
from knetlab.models.knet_head import KernelUpdateHead, KernelUpdator
from knetlab.models.losses import seg_cross_entropy

# mmsegmentation 1.2.2's counts per part (total, backbone, heads; SyncBN -> BN), kept in the repo with the key lists.
PARAM_COUNTS = json.loads((Path(__file__).parent / "test_convert_mmseg_keys" / "param_counts.json").read_text())
RELEASED_TOTALS = {
    "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512": 62_810_508,
    "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512": 62_288_268,
    "knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512": 81_425_804,
    "knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512": 79_728_012,
    "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512": 73_153_766,
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512": 246_971_840,
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640": 246_971_840,
}
RELEASED = list(RELEASED_TOTALS)


def released_param(name: str):
    marks = [pytest.mark.slow] if "swin-l" in name else []
    return pytest.param(name, marks=marks, id=name.split("_")[1] + "_" + name.split("_")[2] + name[-4:])


def test_zoo_lists_the_released_configs_and_tiny_models():
    names = list_models()
    assert names[:7] == RELEASED
    assert {"tiny", "tiny-fcn", "tiny-psp", "tiny-aspp", "tiny-upernet"} <= set(names)
    assert set(names) == set(MODELS)
    assert MODELS["knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512"].backbone == "r50"  # really OS32
    assert MODELS["knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640"].crop_size == 640
    assert MODELS["knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640"].drop_path_rate == 0.4
    assert {k: v["total"] for k, v in PARAM_COUNTS.items()} == RELEASED_TOTALS


@pytest.mark.parametrize("name", [released_param(n) for n in RELEASED if "swin-l" not in n]
                         + [n for n in RELEASED if "swin-l" in n])
def test_parameter_counts_equal_mmsegmentation_per_part(name):
    with torch.device("meta"):  # names and shapes only: Swin-L would allocate 1 GB
        model = create_model(name)
    counts = count_parameters(model)
    assert counts == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", [released_param(n) for n in RELEASED])
def test_released_model_forward_on_cpu(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert count_parameters(model)["total"] == RELEASED_TOTALS[name]
    # A quarter of the training crop (a forward at 512 or 640 costs tens of CPU-seconds each; the real sizes run in
    # scripts/bench_models.py and the GPU check): same modules, same code path, logits at the input size.
    size = MODELS[name].crop_size // 4
    with torch.no_grad():
        logits = model(torch.randn(1, 3, size, size))
    assert logits.shape == (1, 150, size, size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["tiny", "tiny-fcn", "tiny-psp", "tiny-aspp", "tiny-upernet"])
def test_tiny_models_train_and_eval_contract(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    images, labels = torch.randn(2, 3, 64, 96), torch.randint(0, 7, (2, 64, 96))
    labels[:, :4] = 255
    losses = model.train()(images, labels)
    assert list(losses) == ["loss_s0", "loss_s1", "loss_s2", "loss_s3", "loss_aux"]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters()), "every parameter takes part in the loss"
    with torch.no_grad():
        logits = model.eval()(torch.randn(1, 3, 70, 90))  # not a multiple of the output stride
    assert logits.shape == (1, 7, 70, 90)


def test_tiny_training_step_decreases_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("tiny").train()
    images = torch.randn(2, 3, 64, 64)
    labels = torch.zeros(2, 64, 64, dtype=torch.long)
    labels[:, :, 32:] = 3
    labels[:, :8] = 255
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(8):
        loss = sum(model(images, labels).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.9 * history[0], history


def test_released_model_builds_on_meta_device_without_allocating():
    with torch.device("meta"):
        model = create_model("knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512")
    assert all(p.is_meta for p in model.parameters())


def test_models_table_has_one_row_per_model():
    rows = models_table()
    assert [r["name"] for r in rows] == list_models()
    by_name = {r["name"]: r for r in rows}
    fcn = by_name["knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"]
    assert fcn == {"name": fcn["name"], "backbone": "r50-d8", "head": "fcn", "crop": "512x512",
                   "params": 62_810_508}


# ---------------------------------------------------------------------------------------------------------------
# Backbones


def test_r50_d8_is_timm_resnet50c_dilated_to_output_stride_8():
    backbone = build_backbone("r50-d8", img_size=512)
    assert backbone.out_channels == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in backbone.parameters()) == 23_527_264
    # contract_dilation: the first block of a dilated stage uses half the dilation
    assert backbone.layer3[0].conv2.dilation == (1, 1) and backbone.layer3[1].conv2.dilation == (2, 2)
    assert backbone.layer4[0].conv2.dilation == (2, 2) and backbone.layer4[1].conv2.dilation == (4, 4)
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in backbone.eval()(torch.randn(1, 3, 64, 64))]
    assert shapes == [(1, 256, 16, 16), (1, 512, 8, 8), (1, 1024, 8, 8), (1, 2048, 8, 8)]
    r50 = build_backbone("r50", img_size=512)
    with torch.no_grad():
        shapes = [tuple(f.shape[-2:]) for f in r50.eval()(torch.randn(1, 3, 64, 64))]
    assert shapes == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(ModelError, match=r"unknown backbone 'r101'.*valid: r50-d8, r50, swin-t, swin-l, tiny"):
        build_backbone("r101", img_size=512)
    assert list(BACKBONES) == ["r50-d8", "r50", "swin-t", "swin-l", "tiny"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_model_name_lists_the_valid_ones():
    with pytest.raises(ModelError, match=r"unknown model 'knet-s3_r50-d8_fcn'.*valid: knet-s3_r50-d8_fcn_8xb2") as err:
        create_model("knet-s3_r50-d8_fcn")
    assert "tiny-upernet" in str(err.value)


def test_unknown_head_backbone_and_option_list_the_valid_ones():
    with pytest.raises(ModelError, match=r"unknown head 'segformer'.*valid: fcn, psp, aspp, upernet"):
        create_model("tiny", head="segformer")
    with pytest.raises(ModelError, match=r"unknown backbone 'vit'.*valid: r50-d8, r50, swin-t, swin-l, tiny"):
        create_model("tiny", backbone="vit")
    with pytest.raises(ModelError, match=r"unknown option\(s\) num_class for model 'tiny' \(valid: .*num_classes"):
        create_model("tiny", num_class=19)
    with pytest.raises(ModelError, match=r"num_classes must be a positive integer, got 0"):
        create_model("tiny", num_classes=0)
    with pytest.raises(ModelError, match=r"drop_path_rate must be in \[0, 1\), got 1.5"):
        create_model("tiny", drop_path_rate=1.5)
    with pytest.raises(ModelError, match=r"channels 64 is not a multiple of num_heads 5"):
        create_model("tiny", num_heads=5)
    assert list(HEADS) == ["fcn", "psp", "aspp", "upernet"]


def test_input_the_backbone_cannot_take_is_a_clear_error():
    model = create_model("tiny").eval()
    with pytest.raises(ModelError, match=r"input size 16x64 is smaller than the 32x32 minimum of tiny's backbone"):
        model(torch.randn(1, 3, 16, 64))
    with pytest.raises(ModelError, match=r"images must be \(B, 3, H, W\), got \(3, 64, 64\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ModelError, match=r"labels are only taken in train mode"):
        model(torch.randn(1, 3, 64, 64), torch.zeros(1, 64, 64, dtype=torch.long))
    model.train()
    with pytest.raises(ModelError, match=r"train mode needs model\(images, labels\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(ModelError, match=r"labels must be \(B, H, W\) = \(2, 64, 64\), got \(2, 1, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 1, 64, 64, dtype=torch.long))


def test_swin_input_size_is_checked():
    model = create_model("knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512").eval()
    with pytest.raises(ModelError, match=r"input size 16x16"):
        model(torch.randn(1, 3, 16, 16))


# ---------------------------------------------------------------------------------------------------------------
# K-Net head and loss, as mmsegmentation computes them


def test_kernel_updator_works_on_two_256_chunks_of_512_channel_kernels():
    torch.manual_seed(0)
    updator = KernelUpdator(256, 256, 256)
    grouped, kernels = torch.randn(1, 150, 512), torch.randn(1, 150, 512)
    out = updator(grouped, kernels)
    assert out.shape == (300, 1, 256)
    # chunk 1 of class 0 (channels 256..511) alone gives row 1: the chunks share the weights and do not mix
    alone = updator(grouped[:, :1, 256:], kernels[:, :1, 256:])
    torch.testing.assert_close(alone[0], out[1])


def test_kernel_update_head_returns_post_ffn_features_as_kernels_and_masks_from_fc_mask():
    torch.manual_seed(0)
    head = KernelUpdateHead(64, num_heads=4, feedforward_channels=128, updator_channels=32).eval()
    x, kernels, masks = torch.randn(2, 64, 6, 7), torch.randn(2, 10, 64), torch.randn(2, 10, 3, 4)
    captured = {}
    head.ffn_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("ffn_norm", o))
    new_masks, new_kernels = head(x, kernels, masks)
    assert new_masks.shape == (2, 10, 6, 7) and new_kernels.shape == (2, 10, 64)
    torch.testing.assert_close(new_kernels, captured["ffn_norm"])
    mask_kernels = head.fc_mask(torch.relu(head.mask_fcs[1](head.mask_fcs[0](new_kernels))))
    expected = torch.einsum("bnc,bchw->bnhw", mask_kernels, head.feat_transform(x))
    torch.testing.assert_close(new_masks, expected, rtol=1e-4, atol=1e-5)


def test_decode_head_starts_from_conv_seg_kernels_and_returns_every_stage_in_training():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=5, dropout_ratio=0.0).eval()
    feats = model.backbone(torch.randn(2, 3, 64, 64))
    head = model.decode_head
    last = head(feats)
    head.training = True  # only the top module: BN stays in eval mode, so the stages are comparable
    stages = head(feats)
    assert len(stages) == 4 and all(s.shape == (2, 5, 8, 8) for s in stages)
    torch.testing.assert_close(stages[-1], last)
    generate = head.kernel_generate_head
    torch.testing.assert_close(stages[0], generate.conv_seg(generate.forward_feature(feats)))
    # stage 1 starts from a clone of conv_seg.weight (not its bias), in the graph: gradients reach the weight
    captured = {}
    head.kernel_update_head[0].register_forward_pre_hook(lambda m, args: captured.__setitem__("kernels", args[1]))
    head(feats)
    kernels = captured["kernels"]
    assert kernels.shape == (2, 5, 64)
    assert torch.equal(kernels[1], generate.conv_seg.weight.reshape(5, 64))
    (kernels * torch.randn_like(kernels)).sum().backward()
    assert generate.conv_seg.weight.grad is not None and generate.conv_seg.weight.grad.abs().sum() > 0


def test_initialisation_follows_the_reference():
    torch.manual_seed(0)
    model = create_model("knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512")
    conv_seg = model.decode_head.kernel_generate_head.conv_seg
    assert abs(conv_seg.weight.std().item() - 0.01) < 0.001 and not conv_seg.bias.any()
    # update heads keep PyTorch's default Linear init (uniform, bound 1/sqrt(fan_in)), not xavier (bound ~0.077)
    fc_mask = model.decode_head.kernel_update_head[0].fc_mask.weight
    bound = 1 / math.sqrt(512)
    assert 0.95 * bound < fc_mask.abs().max().item() <= bound
    # mmcv ConvModule: Kaiming normal, fan_out, ReLU gain
    conv = model.decode_head.kernel_generate_head.convs[0].conv.weight
    expected_std = math.sqrt(2 / (512 * 9))
    assert abs(conv.std().item() - expected_std) < 0.02 * expected_std


def test_cross_entropy_averages_over_all_pixels_including_ignored():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 5, 8, 8), torch.randint(0, 5, (2, 8, 8))
    labels[0, :4] = 255
    valid = (labels != 255).sum().item()
    expected = F.cross_entropy(logits, labels, ignore_index=255) * valid / labels.numel()
    torch.testing.assert_close(seg_cross_entropy(logits, labels), expected)
    torch.testing.assert_close(seg_cross_entropy(logits, labels, weight=0.4), 0.4 * expected)
    # logits at a lower resolution are resized bilinearly (align_corners=False) to the labels first
    small = torch.randn(2, 5, 4, 4)
    upsampled = F.interpolate(small, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seg_cross_entropy(small, labels), seg_cross_entropy(upsampled, labels))


def test_segmentor_losses_are_the_four_stages_and_the_weighted_auxiliary_head():
    torch.manual_seed(0)
    model = create_model("tiny", num_classes=6, dropout_ratio=0.0)
    model.eval()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 6, (2, 64, 64))
    with torch.no_grad():
        feats = model.backbone(images)
        model.decode_head.training = True
        stages = model.decode_head(feats)
        aux = model.auxiliary_head(feats)
        losses = model.losses(feats, labels)
    for i in range(4):
        torch.testing.assert_close(losses[f"loss_s{i}"], seg_cross_entropy(stages[i], labels))
    torch.testing.assert_close(losses["loss_aux"], 0.4 * seg_cross_entropy(aux, labels))
    assert isinstance(model, KNetSegmentor) and model.auxiliary_head.in_index == 2


def test_sync_batchnorm_conversion_keeps_the_checkpoint_layout():
    model = create_model("tiny-upernet")
    keys = {k: v.shape for k, v in model.state_dict().items()}
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert {k: v.shape for k, v in synced.state_dict().items()} == keys


def test_build_segmentor_is_the_model_of_a_config_section(tmp_path: Path):
    from omegaconf import OmegaConf

    from knetlab.models import build_segmentor

    torch.manual_seed(0)
    trained = create_model("tiny", num_classes=7, channels=32, aux_channels=16, updator_channels=16)
    torch.save({"state_dict": trained.state_dict(), "meta": {}}, tmp_path / "init.pt")
    torch.save(build_backbone("tiny", img_size=64).state_dict(), tmp_path / "backbone.pt")
    section = OmegaConf.create({"name": "tiny", "num_classes": 7, "pretrained": str(tmp_path / "backbone.pt"),
                                "init_checkpoint": str(tmp_path / "init.pt"), "drop_path_rate": 0.1,
                                "overrides": {"channels": 32, "aux_channels": 16, "updator_channels": 16}})
    model = build_segmentor(section)
    assert model.decode_head.kernel_generate_head.conv_seg.out_channels == 7
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in trained.state_dict().items())
    # without weights: the same architecture, its own initialisation, no file read
    fresh = build_segmentor({**OmegaConf.to_container(section), "init_checkpoint": str(tmp_path / "none.pt"),
                             "pretrained": str(tmp_path / "none.pt")}, load_weights=False)
    assert fresh.state_dict().keys() == trained.state_dict().keys()
    # weights of another model: one line naming the key and what does not fit
    with pytest.raises(ModelError, match=r"model.init_checkpoint=.*init.pt for model 'tiny' does not match: .*"
                                         r"shape mismatch"):
        build_segmentor({**OmegaConf.to_container(section), "overrides": {}, "pretrained": None})
    with pytest.raises(ModelError, match=r"model.init_checkpoint: .*none.pt: pretrained weights file does not exist"):
        build_segmentor({**OmegaConf.to_container(section), "init_checkpoint": str(tmp_path / "none.pt")})
