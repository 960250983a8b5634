"""The GPU fast paths and precision, on CPU where they apply there: the AMP dtype by compute capability (fp16 + a
GradScaler below Ampere, a branch the training step runs), float32 grouping under fp16 autocast, channels_last and
torch.compile keeping the logits, the TF32 switch, cuDNN autotuning off while benchmarking, and the progress window
that reads the losses only at log points and stops every worker alike on a non-finite loss (a real 2-process gloo
group). TF32, cudnn.benchmark and pinned-memory copies change nothing on a CPU: only their switches are tested here;
scripts/gpu_check.sh measures them on a GPU."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from gloo import run_in_gloo_group
from omegaconf import OmegaConf

from knetlab.data.transforms import collate_segmentation
from knetlab.evaluation import benchmark
from knetlab.models import create_model
from knetlab.models.knet_head import KernelUpdateHead
from knetlab.platform.bench_experiment import ray_task_placement
from knetlab.platform.checkpoint import bare_module, save_checkpoint
from knetlab.platform.semantic_task import FAMILY
from knetlab.platform.train_loop import train_one_iteration
from knetlab.platform.train_progress import ProgressWindow, max_across_workers, window_means
from knetlab.precision import amp_dtype, amp_dtype_for, precision_name, set_tf32, tf32_enabled

CPU = torch.device("cpu")


def tiny(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny", **overrides)


# -- precision ---------------------------------------------------------------------------------------------------
def test_amp_dtype_is_bf16_from_ampere_and_fp16_below_it():
    assert amp_dtype_for((7, 0)) is torch.float16  # V100: is_bf16_supported() says True, but bf16 is emulated
    assert amp_dtype_for((7, 5)) is torch.float16  # T4
    assert amp_dtype_for((8, 0)) is torch.bfloat16 and amp_dtype_for((9, 0)) is torch.bfloat16
    assert amp_dtype_for(None) is None and amp_dtype(CPU) is None
    assert precision_name(None, CPU) == "fp32" and precision_name(torch.float16, CPU) == "fp16"
    assert precision_name(torch.bfloat16, CPU) == "bf16"


def test_tf32_switch_sets_and_clears_the_flag():
    before = tf32_enabled()
    try:
        set_tf32(True)
        assert tf32_enabled()
        set_tf32(False)
        assert not tf32_enabled()
    finally:
        set_tf32(before)


def test_fp16_training_step_with_a_grad_scaler():
    """The fp16 branch of `train_one_iteration` (scaled backward, unscale before clipping, scaler step) trains."""
    model = tiny(num_classes=8).train()  # 8 classes: float16 on this CPU is slow
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    run = SimpleNamespace(
        device=CPU, amp_dtype=torch.float16, family=FAMILY, model=model, optimizer=optimizer, iteration=0, lr=0.0,
        scaler=torch.amp.GradScaler("cpu"), scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0),
        cfg=OmegaConf.create({"optim": {"clip_grad_norm": 1.0}}), loss_trace=None)
    generator = torch.Generator().manual_seed(0)
    batch = collate_segmentation([{"image": torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator),
                                   "label": torch.randint(0, 8, (32, 32), dtype=torch.uint8, generator=generator),
                                   "path": f"{i}.jpg"} for i in range(2)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = [train_one_iteration(run, batch)]
    assert run.iteration == 1 and all(torch.isfinite(step["loss"]) for step in losses)
    assert run.scaler.get_scale() > 0 and run.scaler._scale is not None  # the scaler really ran
    moved = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert len(moved) > 10, moved


def test_grouping_and_kernel_update_stay_float32_under_fp16_autocast():
    head = KernelUpdateHead(in_channels=16, num_heads=2, feedforward_channels=32, updator_channels=16)
    features = torch.full((1, 16, 64, 64), 100.0)  # 4096 pixels of 100: a grouped sum far above float16's 65504
    masks, kernels = torch.randn(1, 4, 64, 64), torch.randn(1, 4, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        plain = torch.einsum("bnhw,bchw->bnc", masks.softmax(1), features)
        logits, new_kernels = head(features, kernels, masks)
    assert not torch.isfinite(plain).all(), "the hazard: the einsum in float16 overflows"
    assert torch.isfinite(logits).all() and torch.isfinite(new_kernels).all()


# -- channels_last, compile ------------------------------------------------------------------------------------------
def test_channels_last_keeps_the_logits_and_the_losses():
    model = tiny().eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 150, (2, 32, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(images)
        losses = model.train()(images, labels)
        fast = tiny().to(memory_format=torch.channels_last).eval()
        fast_logits = fast(images.contiguous(memory_format=torch.channels_last))
        fast_losses = fast.train()(images, labels)
    torch.testing.assert_close(fast_logits, logits, rtol=1e-4, atol=1e-4)
    for key, value in losses.items():
        torch.testing.assert_close(fast_losses[key], value, rtol=1e-5, atol=1e-5)
    convolutions = [m.weight for m in fast.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convolutions and all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions)


@pytest.mark.slow
def test_compiled_model_keeps_the_logits_and_the_checkpoint_names(tmp_path: Path):
    """torch.compile through TorchDynamo + AOTAutograd ('aot_eager'): what trainer.compile captures. Inductor's code
    generation takes 45 s for the eval graph and 2.5 min for the training graph of the tiny model on this 2-core
    machine, too long for the suite; its output is PyTorch's to keep right."""
    model = tiny().eval()
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(model, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), model(images), rtol=1e-5, atol=1e-5)
    assert bare_module(compiled) is model
    save_checkpoint(tmp_path, rank=0, model=compiled, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                    scheduler=torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=0.1),
                                                                lambda _: 1.0),
                    scaler=None, iteration=1, epoch=0, metrics={}, config_yaml="{}", mlflow_run_id=None)
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert list(saved) == list(model.state_dict())  # no "_orig_mod." prefix: the checkpoint loads into the zoo model


# -- the benchmark ---------------------------------------------------------------------------------------------------
class FlagRecorder(torch.nn.Module):
    """A one-conv segmentor that records cudnn.benchmark and the autocast state on every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, images, labels=None):
        self.seen.append((torch.backends.cudnn.benchmark, torch.is_autocast_enabled("cpu")))
        logits = self.conv(images)
        if labels is None:
            return logits
        return {"loss": torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=255)}


def test_benchmark_turns_cudnn_autotuning_off_and_runs_in_the_asked_precision():
    model = FlagRecorder()
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True  # as a training run leaves it
    try:
        result = benchmark(model, image_size=(16, 16), warmup=1, timed=2, train_steps=1, train_warmup=0,
                           batch_size=2, crop_size=(16, 16), device="cpu", verbose=False, amp_dtype=torch.bfloat16,
                           channels_last=True)
        assert torch.backends.cudnn.benchmark is True  # restored
    finally:
        torch.backends.cudnn.benchmark = previous
    assert model.seen and all(seen == (False, True) for seen in model.seen), model.seen
    assert result["precision"] == "bf16" and result["channels_last"] is True and result["bench/step_s"] > 0
    assert model.conv.weight.is_contiguous(memory_format=torch.channels_last)
    json.dumps(result)


def test_bench_on_ray_asks_for_a_gpu_and_uses_the_one_it_gets():
    assert ray_task_placement("cuda:1", use_gpu=False) == (1, "cuda")  # the task sees its GPU as cuda:0
    assert ray_task_placement("cuda", use_gpu=False) == (1, "cuda")
    assert ray_task_placement(None, use_gpu=True) == (1, "cuda")
    assert ray_task_placement("cpu", use_gpu=True) == (0, "cpu")
    assert ray_task_placement(None, use_gpu=False) == (0, "cpu")


# -- the progress window ---------------------------------------------------------------------------------------------
def losses(value: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(value), "loss_s0": torch.tensor(value / 2)}


def test_window_reads_the_mean_losses_and_names_the_first_non_finite_iteration():
    window = ProgressWindow()
    for iteration, value in enumerate([1.0, 2.0, 3.0], start=11):
        window.add(losses(value), iteration)
    assert window_means(window, CPU) == {"train/loss": 2.0, "train/loss_s0": 1.0}
    for iteration, value in enumerate([float("nan"), 1.0, float("inf")], start=14):
        window.add(losses(value), iteration)
    with pytest.raises(FloatingPointError, match=r"^iteration 14: the loss is not finite"):
        window_means(window, CPU)


def _two_ranks(rank: int, out_dir: str) -> None:
    """Rank 1's loss turns NaN at iteration 7; both ranks must stop at the same check. Then the peak memory."""
    window = ProgressWindow()
    for iteration in range(5, 9):
        window.add(losses(float("nan") if rank == 1 and iteration >= 7 else 1.0), iteration)
    try:
        window_means(window, CPU)
        outcome = "no error"
    except FloatingPointError as error:
        outcome = str(error)
    peak = max_across_workers([3.5, 7.25][rank], CPU)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"outcome": outcome, "peak": peak}))


@pytest.mark.slow
def test_a_nan_on_one_worker_stops_every_worker_at_the_same_point(tmp_path: Path):
    run_in_gloo_group(_two_ranks, tmp_path)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["outcome"].startswith("iteration 7: the loss is not finite on at least one worker"), result
        assert result["peak"] == 7.25
