"""`benchmark` on CPU with a small segmentor: every figure is returned (timings are printed, never asserted), the
training steps really run, and the weights are restored."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from knetlab.evaluation import benchmark


class SmallSegmentor(nn.Module):
    """Follows knetlab's segmentor contract: train mode (images, labels) -> named losses, eval mode -> logits."""

    def __init__(self, num_classes: int = 6) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv_seg = nn.Conv2d(8, num_classes, 1)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None):
        logits = F.interpolate(self.conv_seg(self.stem(images)), size=images.shape[-2:], mode="bilinear")
        if self.training and labels is not None:
            return {"loss_ce": F.cross_entropy(logits, labels, ignore_index=255)}
        return logits


def small_run(model: nn.Module, **kwargs) -> dict:
    settings = dict(image_size=(32, 48), warmup=1, timed=3, train_steps=2, train_warmup=1, batch_size=2,
                    crop_size=(32, 32), device="cpu")  # fmt: skip
    settings.update(kwargs)
    return benchmark(model, **settings)


def test_benchmark_returns_every_figure_on_cpu(capsys):
    torch.manual_seed(0)
    model = SmallSegmentor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = small_run(model)
    for key in ("bench/fps", "bench/step_s", "bench/mem_gb", "infer_ms_median"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["device"] and result["device_type"] == "cpu"
    assert result["torch"] == torch.__version__
    assert result["num_threads"] == torch.get_num_threads()
    assert result["num_classes"] == 6 and result["num_params"] == sum(p.numel() for p in model.parameters())
    assert "RSS" in result["mem_kind"]
    assert result["mem_baseline_gb"] is None or 0 < result["mem_baseline_gb"] <= result["bench/mem_gb"]
    json.dumps(result)  # the result is the bench.json artifact
    printed = capsys.readouterr().out
    assert "fps" in printed and "train step" in printed and "GiB" in printed
    # the training steps ran on the model, and the weights (BN statistics included) were put back
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training


def test_training_steps_really_update_the_model():
    torch.manual_seed(0)
    model = SmallSegmentor()
    before = model.conv_seg.weight.detach().clone()
    small_run(model, restore_weights=False, verbose=False, timed=1, warmup=0, train_warmup=0, train_steps=1)
    assert not torch.equal(model.conv_seg.weight, before)


def test_no_training_steps_reports_inference_only():
    result = small_run(SmallSegmentor(), train_steps=0, verbose=False)
    assert result["bench/fps"] > 0
    assert result["bench/step_s"] is None and result["bench/mem_gb"] is None


def test_bad_settings_and_models_give_clear_errors():
    with pytest.raises(ValueError, match="timed must be >= 1"):
        small_run(SmallSegmentor(), timed=0)
    with pytest.raises(ValueError, match="train_steps must be >= 0"):
        small_run(SmallSegmentor(), train_steps=-1)

    class NoLosses(SmallSegmentor):
        def forward(self, images, labels=None):
            return super().forward(images) if not self.training else [images.sum()]

    with pytest.raises(TypeError, match="must return a dict of named loss tensors"):
        small_run(NoLosses(), verbose=False)


def test_benchmark_runs_the_zoo_tiny_model():
    from knetlab.models import create_model

    torch.manual_seed(0)
    result = small_run(create_model("tiny", num_classes=11), image_size=(64, 80), crop_size=(64, 64), verbose=False)
    assert result["num_classes"] == 11
    assert all(result[k] > 0 for k in ("bench/fps", "bench/step_s", "bench/mem_gb"))


@pytest.mark.parametrize("name", ["tiny-panoptic", "tiny-instance"])
def test_benchmark_times_a_detector_with_its_post_processing_and_training_step(name: str) -> None:
    from knetlab.models import create_model

    model = create_model(name)
    result = benchmark(model, image_size=(100, 150), warmup=1, timed=2, train_steps=1, train_warmup=0,
                       batch_size=2, crop_size=(128, 160), device="cpu", verbose=False)
    assert result["bench/fps"] > 0 and result["bench/step_s"] > 0
    assert result["num_classes"] == (133 if name == "tiny-panoptic" else 80)
    assert result["bench/mem_gb"] is None or result["bench/mem_gb"] > 0
