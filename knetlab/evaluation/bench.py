"""Inference speed and training step time / peak memory of a segmentor, as the table's `Inf time (fps)` and
`Mem (GB)` columns define them: fps = forward + post-processing at batch 1 after warm-up, no data loading;
memory = peak allocated training memory. In float32 (TF32 where the process allows it) or under autocast
(`amp_dtype`), optionally channels_last; cuDNN's autotuner stays off while it measures."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from knetlab.evaluation.inference import inference_whole, resize_logits
from knetlab.precision import precision_name

GIB = 1024**3  # mmseg logs max_memory_allocated / 2**20 MB; the README's GB is that / 1024


# A typical ADE20K validation image (height, width) before the test resize; benchmarks resize it like the test
# pipeline does (keep ratio within eval.test_scale).
TYPICAL_ADE20K_IMAGE = (512, 683)


def peak_memory_gb(device: torch.device) -> float | None:
    """The process's peak so far: `torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = _peak_rss_bytes()
    return None if peak is None else peak / 2**30


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak from now (`peak_memory_gb` then measures what follows); False where it cannot be reset."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_peak_rss()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model string."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_cudnn_autotuning() -> Iterator[None]:
    """cudnn.benchmark off while measuring (training turns it on): no autotuner trials, no luck of its pick."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


def _autocast(device: torch.device, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0: clear_refs '5')."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _total_loss(out: object) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and out and all(isinstance(v, torch.Tensor) for v in out.values()):
        return sum(out.values())  # type: ignore[return-value]
    raise TypeError(
        "benchmark: in train mode model(images, labels) must return a dict of named loss tensors (or one loss tensor), "
        f"got {type(out).__name__}"
    )


@torch.inference_mode()
def _time_inference(
    model: nn.Module, image_size: tuple[int, int], orig_size: tuple[int, int], warmup: int, timed: int, device,
    amp_dtype: torch.dtype | None = None, channels_last: bool = False,
) -> tuple[list[float], int]:
    model.eval()
    # The image waits in host memory like a loaded batch; its copy to the device is timed, as mmseg's
    # benchmark times the scatter inside model(...), but reading and decoding it is not.
    image = torch.randn(1, 3, *image_size)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        image = image.pin_memory()
    times = []
    num_classes = 0
    for i in range(warmup + timed):
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, amp_dtype):
            num_classes = _inference_step(model, image.to(device, non_blocking=True), orig_size)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, num_classes


def is_detector(model: nn.Module) -> bool:
    """A panoptic/instance K-Net (model(images, metas) -> per-image results) rather than a semantic segmentor."""
    return getattr(model, "task", None) in ("panoptic", "instance")


def _inference_step(model: nn.Module, image: torch.Tensor, orig_size: tuple[int, int]) -> int:
    """One timed inference with its post-processing, results copied to the host; returns the number of classes."""
    if is_detector(model):
        # As the reference benchmark: the image padded to 32, the panoptic fusion / instance top-k at the original
        # size, results on the host.
        height, width = image.shape[-2:]
        padded = F.pad(image, (0, -width % 32, 0, -height % 32))
        (result,) = model(padded, [{"img_shape": (height, width), "ori_shape": orig_size}])
        for value in result.values():
            if isinstance(value, torch.Tensor):
                value.cpu()
        return model.num_thing_classes + model.num_stuff_classes
    logits = inference_whole(model, image)
    resize_logits(logits, orig_size).argmax(dim=1).cpu()  # mmseg 0.x simple_test ends with .cpu()
    return logits.shape[1]


def _training_inputs(model: nn.Module, num_classes: int, batch_size: int, size: tuple[int, int],
                     device: torch.device) -> tuple[torch.Tensor, Any]:
    """Random images and targets of the model's kind: label maps (semantic), or a few rectangular instances per
    image with a stuff map (panoptic) for the matched-mask losses."""
    images = torch.randn(batch_size, 3, *size, device=device)
    if not is_detector(model):
        labels = torch.randint(0, num_classes, (batch_size, *size), device=device)
        labels[torch.rand(labels.shape, device=device) < 0.1] = 255  # some ignored pixels, as real ADE20K crops have
        return images, labels
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch_size):
        count = 5
        masks = torch.zeros(count, *size, dtype=torch.bool)
        for mask in masks:
            top, left = (int(torch.randint(0, s // 2, (1,), generator=generator)) for s in size)
            mask[top:top + size[0] // 3, left:left + size[1] // 3] = True
        labels = torch.randint(0, model.num_thing_classes, (count,), generator=generator)
        sem_seg = None
        if model.num_stuff_classes:
            sem_seg = torch.randint(model.num_thing_classes, num_classes, size, generator=generator)
            for mask, label in zip(masks, labels):
                sem_seg[mask] = label
        targets.append({"masks": masks.to(device), "labels": labels.to(device),
                        "sem_seg": sem_seg.to(device) if sem_seg is not None else None})
    return images, targets


def _time_training(
    model: nn.Module,
    num_classes: int,
    batch_size: int,
    crop_size: tuple[int, int],
    steps: int,
    warmup: int,
    lr: float,
    weight_decay: float,
    max_grad_norm: float | None,
    device: torch.device,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> tuple[list[float], dict]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # fp16 trains with a loss scaler, as the training loop does; bf16 and float32 need none.
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    images, labels = _training_inputs(model, num_classes, batch_size, crop_size, device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    mem: dict = {}
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem["mem_baseline_gb"] = torch.cuda.memory_allocated(device) / GIB
    else:
        reset_ok = _reset_peak_rss()
        baseline = _rss_bytes()
        mem["mem_baseline_gb"] = baseline / GIB if baseline is not None else None

    times = []
    for i in range(warmup + steps):
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, amp_dtype):
            loss = _total_loss(model(images, labels))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
        del loss

    if device.type == "cuda":
        mem["bench/mem_gb"] = torch.cuda.max_memory_allocated(device) / GIB
        mem["mem_kind"] = (
            "torch.cuda.max_memory_allocated after reset_peak_memory_stats (weights, grads, AdamW state, activations)"
        )
    else:
        peak = _peak_rss_bytes() if reset_ok else None
        if peak is not None:
            mem["bench/mem_gb"] = peak / GIB
            mem["mem_kind"] = "peak RSS of the whole process during training (VmHWM, reset via /proc/self/clear_refs)"
        else:
            # ru_maxrss is KiB on Linux and cannot be reset: a lifetime peak, an upper bound of training's.
            mem["bench/mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
            mem["mem_kind"] = "peak RSS of the process over its lifetime (getrusage ru_maxrss; could not reset)"
    optimizer.zero_grad(set_to_none=True)
    del optimizer, images, labels
    model.eval()
    return times, mem


@no_cudnn_autotuning()
def benchmark(
    model: nn.Module,
    *,
    image_size: Sequence[int] = (512, 683),
    orig_size: Sequence[int] | None = None,
    warmup: int = 5,
    timed: int = 200,
    train_steps: int = 5,
    train_warmup: int = 1,
    batch_size: int = 2,
    crop_size: Sequence[int] = (512, 512),
    device: str | torch.device | None = None,
    lr: float = 1e-4,
    weight_decay: float = 5e-4,
    max_grad_norm: float | None = 1.0,
    restore_weights: bool = True,
    verbose: bool = True,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict:
    """Measure `bench/fps`, `bench/step_s` and `bench/mem_gb` of a segmentor.

    - fps: batch 1 at `image_size` (h, w) (default (512, 683): a typical ADE20K val image after the keep-ratio
      resize to (2048, 512)); forward + resize of the logits to `orig_size` (default `image_size`) + argmax + copy
      to host, synchronised, `warmup` untimed then `timed` timed images; no data loading.
    - step_s: mean seconds of a training step (forward with labels, backward, grad-norm clip, AdamW step) at
      `batch_size` x `crop_size`, over `train_steps` steps after `train_warmup` untimed ones (0 -> not measured).
    - mem_gb: GiB; on GPU the peak `torch.cuda.max_memory_allocated` over the training steps; on CPU the process's
      peak RSS over them (`mem_kind` says which). Both include the weights and optimizer state.
    - precision: float32 as the process has it (`precision` says 'tf32' where float32 matmuls use TF32), or under
      autocast to `amp_dtype` (bf16, or fp16 with a GradScaler for the training steps); `channels_last` converts
      the model and the inputs to that memory format. cudnn.benchmark is off while measuring.
    The training steps change the weights; with `restore_weights` they are saved to a temporary file first and
    loaded back afterwards. The result (JSON-serialisable) is returned; logging it is the caller's.
    """
    image_size = (int(image_size[0]), int(image_size[1]))
    orig_size = (int(orig_size[0]), int(orig_size[1])) if orig_size is not None else image_size
    crop_size = (int(crop_size[0]), int(crop_size[1]))
    for name, value in (("warmup", warmup), ("train_warmup", train_warmup), ("train_steps", train_steps)):
        if value < 0:
            raise ValueError(f"benchmark: {name} must be >= 0, got {value}")
    if timed < 1:
        raise ValueError(f"benchmark: timed must be >= 1 image, got {timed}")
    if batch_size < 1:
        raise ValueError(f"benchmark: batch_size must be >= 1, got {batch_size}")
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    infer_times, num_classes = _time_inference(model, image_size, orig_size, warmup, timed, device, amp_dtype,
                                               channels_last)
    result: dict = {
        "bench/fps": len(infer_times) / sum(infer_times),
        "bench/step_s": None,
        "bench/mem_gb": None,
        "infer_ms_median": statistics.median(infer_times) * 1000.0,
        "device": device_name(device),
        "device_type": device.type,
        "precision": precision_name(amp_dtype, device),
        "channels_last": channels_last,
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        # Other processes on the machine slow CPU timings down; the load says how busy it was.
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "image_size": list(image_size),
        "orig_size": list(orig_size),
        "warmup": warmup,
        "timed": timed,
        "num_classes": num_classes,
        "num_params": sum(p.numel() for p in model.parameters()),
    }

    if train_steps > 0:
        saved = None
        if restore_weights:
            saved = tempfile.NamedTemporaryFile(prefix="knetlab-bench-", suffix=".pt", delete=False)
            saved.close()
            torch.save(model.state_dict(), saved.name)
        try:
            step_times, mem = _time_training(
                model, num_classes, batch_size, crop_size, train_steps, train_warmup, lr, weight_decay,
                max_grad_norm, device, amp_dtype, channels_last,
            )  # fmt: skip
        finally:
            if saved is not None:
                model.load_state_dict(torch.load(saved.name, map_location="cpu", weights_only=True))
                os.unlink(saved.name)
        result.update(mem)
        result["bench/step_s"] = statistics.fmean(step_times)
        result.update(batch_size=batch_size, crop_size=list(crop_size), train_steps=train_steps)

    if verbose:
        print(format_benchmark(result), flush=True)
    return result


def format_benchmark(result: dict) -> str:
    """A readable summary of `benchmark`'s result."""

    def fmt(key: str, spec: str) -> str:
        v = result.get(key)
        return "not measured" if v is None else format(v, spec)

    lines = [
        f"device      : {result['device']} ({result['device_type']}, torch {result['torch']}, "
        f"{result['num_threads']} threads, load average {fmt('load_avg_1m', '.2f')})",
        f"precision   : {result.get('precision', 'fp32')}{', channels_last' if result.get('channels_last') else ''}",
        f"params      : {result['num_params']:,}",
        f"inference   : {fmt('bench/fps', '.2f')} fps, median {result['infer_ms_median']:.1f} ms/img "
        f"(batch 1, {result['image_size'][0]}x{result['image_size'][1]}, {result['timed']} timed after "
        f"{result['warmup']} warm-up)",
    ]
    if result.get("bench/step_s") is not None:
        lines += [
            f"train step  : {fmt('bench/step_s', '.3f')} s (batch {result['batch_size']}, crop "
            f"{result['crop_size'][0]}x{result['crop_size'][1]}, mean of {result['train_steps']})",
            f"train memory: {fmt('bench/mem_gb', '.2f')} GiB ({result['mem_kind']})",
        ]
    else:
        lines.append("train step  : not measured (train_steps=0)")
    return "\n".join(lines)
