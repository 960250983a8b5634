"""`knetlab bench --data`: does training wait for its data? The experiment's training pipeline in samples/s in one
loader process and through the run's own DataLoader (data.num_workers processes, persistent, prefetching), beside
the training step's samples/s on the device, and the verdict: loader-bound or not."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from knetlab.data.transforms import init_loader_worker
from knetlab.platform.config import loader_workers
from knetlab.platform.tasks import task_family
from knetlab.platform.train_data import ResumableSampler, train_loader


def pipeline_samples_per_s(dataset: Any, count: int, warmup: int) -> float:
    """Items per second made by one process with one thread (what one loader process does), after `warmup`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    init_loader_worker()
    try:
        for index in range(warmup):
            dataset[index % len(dataset)]
        start = time.perf_counter()
        for index in range(warmup, warmup + count):
            dataset[index % len(dataset)]
        return count / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def loader_samples_per_s(dataset: Any, cfg: DictConfig, collate: Any, count: int, pin_memory: bool) -> float:
    """Samples per second delivered by the training loop's DataLoader (`train_loader`, over as many epochs as
    `count` needs), timed from its first batch on, so the processes' start-up is left out."""
    if len(dataset) < cfg.data.batch_size:
        raise ValueError(f"data.root={cfg.data.root}: {len(dataset)} training images are fewer than one batch of "
                         f"{cfg.data.batch_size}")
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=cfg.trainer.seed)
    loader = train_loader(dataset, sampler, cfg, collate=collate, pin_memory=pin_memory, rank=0)
    batch_size = cfg.data.batch_size
    delivered, start, epoch = 0, None, 0
    while delivered < count:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for _ in loader:
            if start is None:  # the first batch pays for starting the processes
                start = time.perf_counter()
                continue
            delivered += batch_size
            if delivered >= count:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    del loader  # stops the persistent processes
    return delivered / seconds


def train_step_seconds(cfg: DictConfig, device: torch.device, steps: int) -> float:
    """Mean seconds of a training step (forward, backward, AdamW) at data.batch_size x data.crop_size on `device`,
    as `knetlab bench` measures it (after one untimed step)."""
    from knetlab.evaluation.bench import benchmark
    from knetlab.models import create_model

    overrides = {**dict(cfg.model.overrides), "num_classes": cfg.model.num_classes}
    if cfg.model.drop_path_rate is not None:
        overrides["drop_path_rate"] = cfg.model.drop_path_rate
    model = create_model(cfg.model.name, **overrides)
    crop = (cfg.data.crop_size, cfg.data.crop_size)
    result = benchmark(model, image_size=crop, warmup=0, timed=1, train_steps=steps, batch_size=cfg.data.batch_size,
                       crop_size=crop, device=device, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                       max_grad_norm=cfg.optim.clip_grad_norm, restore_weights=False,
                       verbose=False)
    return result["bench/step_s"]


def benchmark_data(cfg: DictConfig, *, images: int = 200, warmup: int = 5, train_steps: int = 5,
                   device: str | torch.device | None = None) -> dict[str, Any]:
    """The figures of `knetlab bench --data` (keys `bench/data_*`, `bench/train_samples_per_s`, `bench/loader_bound`
    and a `verdict` line); the training step is measured for semantic models (0 `train_steps`: not measured)."""
    family = task_family(cfg)
    if family.name == "semantic" and cfg.data.synthesize and not Path(cfg.data.root).exists():
        from knetlab.data.synthetic import generate_synthetic_ade20k

        generate_synthetic_ade20k(cfg.data.root)
    device = torch.device(device or ("cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu"))
    train_set = family.train_dataset(cfg)
    workers = loader_workers(cfg)
    per_process = pipeline_samples_per_s(train_set, images, warmup)
    result: dict[str, Any] = {
        "bench/data_samples_per_s_per_process": per_process,
        "bench/data_samples_per_s": (loader_samples_per_s(train_set, cfg, family.collate, images,
                                                          device.type == "cuda") if workers else per_process),
        "num_workers": workers, "batch_size": cfg.data.batch_size, "crop_size": cfg.data.crop_size,
        "images": images, "device_type": device.type, "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if train_steps > 0 and family.name == "semantic":
        from knetlab.evaluation.bench import device_name

        result["device"] = device_name(device)
        result["train_step_s"] = train_step_seconds(cfg, device, train_steps)
        result["bench/train_samples_per_s"] = cfg.data.batch_size / result["train_step_s"]
        result.update(verdict(result["bench/data_samples_per_s"], result["bench/train_samples_per_s"], workers,
                              device.type))
    else:
        result["verdict"] = ("training step not measured" + ("" if train_steps > 0 else " (--train-steps 0)")
                             + ("" if family.name == "semantic" else f" ({family.name} models: loader figures only)"))
    return result


def verdict(load_rate: float, step_rate: float, workers: int, device_type: str) -> dict[str, Any]:
    """Loader-bound when the loaders make fewer samples per second than the step consumes."""
    bound = load_rate < step_rate
    if workers == 0:
        loading = (1 / load_rate) / (1 / load_rate + 1 / step_rate)
        line = (f"{'loader-bound' if bound else 'not loader-bound'}: loading in the training process takes "
                f"{100 * loading:.0f}% of each iteration (data.num_workers=0)")
    elif bound:
        line = (f"loader-bound: {workers} loader process(es) make {rate(load_rate)} samples/s, the step takes "
                f"{rate(step_rate)}; the device waits {100 * (1 - load_rate / step_rate):.0f}% of the time "
                "(raise trainer.cpus_per_worker or data.num_workers)")
    else:
        line = (f"not loader-bound: {workers} loader process(es) make {rate(load_rate / step_rate)}x the samples the "
                "step takes")
    if device_type == "cpu":
        line += "; on a CPU the step and the loaders share the cores, so both run slower together"
    return {"bench/loader_bound": float(bound), "verdict": line}


def rate(value: float) -> str:
    """A figure with one decimal, or three significant digits below 10 (a CPU's training step: 0.0213)."""
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def format_data_benchmark(result: dict[str, Any]) -> str:
    """The figures of `benchmark_data`, one per line."""
    lines = [
        f"data pipeline : {rate(result['bench/data_samples_per_s_per_process'])} samples/s in one loader process "
        f"(one thread, {result['images']} items, crop {result['crop_size']})",
        f"data loader   : {rate(result['bench/data_samples_per_s'])} samples/s with data.num_workers="
        f"{result['num_workers']} (batch {result['batch_size']}; {result['cpu_count']} CPUs here, load average "
        f"{result['load_avg_1m']:.2f})",
    ]
    if "bench/train_samples_per_s" in result:
        lines.append(f"training step : {rate(result['bench/train_samples_per_s'])} samples/s "
                     f"({result['train_step_s']:.3g} s per step of {result['batch_size']}) on {result['device']} "
                     f"({result['device_type']})")
    lines.append(f"verdict       : {result['verdict']}")
    return "\n".join(lines)


def benchmark_data_experiment(cfg: DictConfig | dict, options: dict[str, Any]) -> dict[str, Any]:
    """`knetlab bench --data EXP.yaml` (options as the CLI's: warmup, timed = --images, train_steps, device, quiet)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    result = benchmark_data(cfg, images=options["timed"], warmup=options["warmup"],
                            train_steps=options["train_steps"], device=options["device"])
    if not options.get("quiet", False):
        print(format_data_benchmark(result), flush=True)
    return result
