"""Whole / sliding-window / multi-scale+flip inference and `predict`, with small test models whose exact outputs
are known."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from knetlab.evaluation import (
    MS_RATIOS,
    inference_ms_flip,
    inference_slide,
    inference_whole,
    ms_test_scales,
    predict,
    predict_settings,
    rescale_size,
    slide_windows,
)


def pointwise_model(num_classes: int = 5) -> nn.Module:
    """A 1x1 conv: translation-equivariant with no border effects, so any window sees the same logits."""
    torch.manual_seed(0)
    return nn.Conv2d(3, num_classes, kernel_size=1).eval()


class HorizontalGradient(nn.Module):
    """Logits [g, 0] with g = a horizontal [-1, 0, 1] difference of the channel sum (zero padded).
    g(flip(x)) = -flip(g(x)), so a correct flip test averages sigmoid(g) and sigmoid(-g): exactly 0.5."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        kernel = torch.tensor([[[[-1.0, 0.0, 1.0]]]]).repeat(1, 3, 1, 1)
        g = F.conv2d(images, kernel, padding=(0, 1))
        return torch.cat([g, torch.zeros_like(g)], dim=1)


class RecordingModel(nn.Module):
    """A 1x1 conv that records the input size of every call."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = pointwise_model(4)
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.sizes.append(tuple(images.shape[-2:]))
        return self.conv(images)


@pytest.mark.parametrize("shape", [(1, 3, 37, 50), (2, 3, 64, 48)])
def test_slide_equals_whole_for_a_pointwise_model(shape):
    model = pointwise_model()
    images = torch.randn(*shape)
    whole = inference_whole(model, images)
    slide = inference_slide(model, images, num_classes=5, crop=(16, 20), stride=(11, 13))
    assert slide.shape == whole.shape == (shape[0], 5, *shape[-2:])
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-6)


def test_slide_on_an_image_smaller_than_the_crop_is_one_window():
    model = RecordingModel()
    images = torch.randn(1, 3, 10, 12)
    out = inference_slide(model, images, crop=16, stride=8)
    assert model.sizes == [(10, 12)]
    torch.testing.assert_close(out, model.conv(images))


def test_slide_grid_matches_mmseg_by_hand():
    # h=37, crop 16, stride 11: grids = (37-16+10)//11+1 = 3 -> rows [0,16), [11,27), then [22,38)->[21,37)
    # w=20, crop 16, stride 11: grids = (20-16+10)//11+1 = 2 -> cols [0,16), [11,27)->[4,20)
    assert slide_windows(37, 20, 16, 11) == [
        (0, 16, 0, 16), (0, 16, 4, 20),
        (11, 27, 0, 16), (11, 27, 4, 20),
        (21, 37, 0, 16), (21, 37, 4, 20),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("crop", "stride"), [(16, 11), ((16, 24), (16, 24)), ((512, 512), (341, 341)), ((7, 9), (5, 2))]
)
def test_slide_windows_cover_every_pixel(crop, stride):
    crop_hw = (crop, crop) if isinstance(crop, int) else crop
    for h, w in itertools.product([1, 5, 16, 17, 33, 100, 515, 683], [1, 7, 24, 25, 341, 683, 1195]):
        count = torch.zeros(h, w, dtype=torch.int32)
        for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
            assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
            assert (y2 - y1, x2 - x1) == (min(crop_hw[0], h), min(crop_hw[1], w))  # windows are never padded
            count[y1:y2, x1:x2] += 1
        assert int(count.min()) > 0, (h, w, crop, stride)


def test_slide_rejects_a_stride_larger_than_the_crop():
    with pytest.raises(ValueError, match=r"eval.stride \(20, 20\) larger than eval.crop \(16, 16\)"):
        inference_slide(pointwise_model(), torch.randn(1, 3, 40, 40), crop=16, stride=20)


def test_model_output_is_checked():
    images = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="must return logits at the input size"):
        inference_whole(lambda x: x[:, :, ::2, ::2], images)
    with pytest.raises(ValueError, match="expected num_classes=7"):
        inference_slide(pointwise_model(5), images, num_classes=7, crop=8, stride=8)
    with pytest.raises(ValueError, match="float tensor"):
        inference_whole(pointwise_model(), torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_rescale_size_is_mmcv_keep_ratio_by_hand():
    # A typical ADE20K val image (h=512, w=683) under the (2048, 512) test scale keeps its size.
    assert rescale_size((512, 683), (2048, 512)) == (512, 683)
    # ratio 0.5 -> (1024, 256): factor min(1024/683, 256/512) = 0.5 -> w = int(341.5 + 0.5) = 342
    assert rescale_size((512, 683), (1024, 256)) == (256, 342)
    # ratio 1.75 -> (3584, 896): factor 1.75 -> (896, int(1195.25 + 0.5) = 1195)
    assert rescale_size((512, 683), (3584, 896)) == (896, 1195)
    # a very wide image is limited by the long edge: factor 2048/2400 -> h = int(256.0 + 0.5) = 256
    assert rescale_size((300, 2400), (2048, 512)) == (256, 2048)
    # portrait: the short edge is the width
    assert rescale_size((683, 512), (2048, 512)) == (683, 512)
    assert ms_test_scales((2048, 512), MS_RATIOS) == [
        (1024, 256), (1536, 384), (2048, 512), (2560, 640), (3072, 768), (3584, 896)
    ]  # fmt: skip


def test_ms_flip_runs_every_scale_and_flip_and_returns_the_original_size():
    model = RecordingModel()
    image = torch.randn(1, 3, 20, 30)
    # test_scale (64, 16) x ratios: (32, 8) -> factor 0.4 -> (8, 12); (64, 16) -> 0.8 -> (16, 24);
    # (96, 24) -> 1.2 -> (24, 36); each once plain and once flipped.
    scores = inference_ms_flip(model, image, num_classes=4, test_scale=(64, 16), ratios=(0.5, 1.0, 1.5), flip=True)
    assert model.sizes == [(8, 12), (8, 12), (16, 24), (16, 24), (24, 36), (24, 36)]
    assert scores.shape == (1, 4, 20, 30)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1, 20, 30))  # averaged softmax probabilities


def test_ms_flip_single_scale_equals_resize_forward_resize_softmax():
    model = pointwise_model(4)
    image = torch.randn(2, 3, 20, 30)
    scores = inference_ms_flip(model, image, test_scale=(64, 16), ratios=(1.0,), flip=False)
    resized = F.interpolate(image, size=(16, 24), mode="bilinear", align_corners=False)
    expected = F.softmax(F.interpolate(model(resized), size=(20, 30), mode="bilinear", align_corners=False), dim=1)
    torch.testing.assert_close(scores, expected)


def test_flip_is_really_applied():
    model = HorizontalGradient()
    image = torch.randn(1, 3, 16, 24)
    # (24, 16) keeps a 16x24 image at its size, so only the flip acts
    plain = inference_ms_flip(model, image, test_scale=(24, 16), ratios=(1.0,), flip=False)
    flipped = inference_ms_flip(model, image, test_scale=(24, 16), ratios=(1.0,), flip=True)
    assert (plain - 0.5).abs().max() > 0.1  # the model is not flip-symmetric
    torch.testing.assert_close(flipped, torch.full_like(flipped, 0.5))


def test_ms_flip_with_slide_mode():
    model = pointwise_model(4)
    image = torch.randn(1, 3, 20, 30)
    whole = inference_ms_flip(model, image, test_scale=(64, 16), ratios=(1.0, 1.5), flip=True)
    slide = inference_ms_flip(
        model, image, test_scale=(64, 16), ratios=(1.0, 1.5), flip=True, mode="slide", crop=8, stride=5
    )
    torch.testing.assert_close(slide, whole)


def test_predict_resizes_to_the_test_scale_and_back_to_the_label_size():
    model = RecordingModel()
    image = torch.randn(1, 3, 20, 30)
    pred = predict(model, image, (20, 30), test_scale=(64, 16))
    assert model.sizes == [(16, 24)]
    resized = F.interpolate(image, size=(16, 24), mode="bilinear", align_corners=False)
    expected = F.interpolate(model.conv(resized), size=(20, 30), mode="bilinear", align_corners=False).argmax(1)
    assert pred.dtype == torch.int64 and pred.shape == (1, 20, 30)
    assert torch.equal(pred, expected)
    # slide mode gives the same classes for the pointwise model; no test_scale -> the image goes in as is
    assert torch.equal(predict(model, image, (20, 30), test_scale=(64, 16), mode="slide", crop=8, stride=6), pred)
    model.sizes.clear()
    predict(model, image, (40, 60), test_scale=None)
    assert model.sizes == [(20, 30)]


def test_predict_with_flip_uses_the_ms_flip_average():
    model = pointwise_model(4)
    image = torch.randn(1, 3, 20, 30)
    pred = predict(model, image, (20, 30), test_scale=(64, 16), ms_ratios=(0.5, 1.0), flip=True)
    scores = inference_ms_flip(model, image, test_scale=(64, 16), ratios=(0.5, 1.0), flip=True)
    assert torch.equal(pred, scores.argmax(1))


def test_unknown_mode_and_missing_slide_settings_are_clear_errors():
    image = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match=r"eval\.mode='tiles' is not supported; valid modes: 'whole', 'slide'"):
        predict(pointwise_model(), image, (8, 8), mode="tiles")
    with pytest.raises(ValueError, match=r"needs eval\.crop and eval\.stride"):
        predict(pointwise_model(), image, (8, 8), mode="slide")


def test_predict_settings_from_the_config_eval_section():
    from omegaconf import OmegaConf

    from knetlab.platform.config import EvalConfig

    cfg = OmegaConf.structured(EvalConfig)
    cfg.mode = "slide"
    single = predict_settings(cfg)
    assert single == {
        "mode": "slide", "crop": (512, 512), "stride": (341, 341), "test_scale": (2048, 512),
        "ms_ratios": None, "flip": False,
    }  # fmt: skip
    assert predict_settings(cfg, ms_flip=True) == single | {"ms_ratios": MS_RATIOS, "flip": True}
    model = pointwise_model(4)
    image = torch.randn(1, 3, 20, 30)
    cfg.test_scale, cfg.crop, cfg.stride, cfg.ms_ratios = (64, 16), (8, 8), (5, 5), [0.5, 1.0]
    pred = predict(model, image, (20, 30), **predict_settings(cfg, ms_flip=True))
    scores = inference_ms_flip(model, image, test_scale=(64, 16), ratios=(0.5, 1.0), flip=True)
    assert torch.equal(pred, scores.argmax(1))


def test_the_zoo_tiny_segmentor_through_predict_and_ms_flip():
    from knetlab.models import create_model

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=9).eval()
    image = torch.randn(1, 3, 48, 72)
    scores = inference_ms_flip(model, image, num_classes=9, test_scale=(96, 64), ratios=(0.5, 1.0), flip=True)
    assert scores.shape == (1, 9, 48, 72)
    torch.testing.assert_close(scores.sum(dim=1), torch.ones(1, 48, 72))
    pred = predict(model, image, (50, 70), test_scale=(96, 64), mode="slide", crop=64, stride=42)
    assert pred.shape == (1, 50, 70) and 0 <= int(pred.min()) and int(pred.max()) < 9
