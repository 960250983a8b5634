"""The platform's overhead per iteration: the same model step (tiny K-Net, the smoke experiment's data pipeline,
one process, one CPU thread) timed in a bare PyTorch loop and inside knetlab's Ray Train loop (1 worker), side by
side. Prints the figures and logs them to MLflow (experiment `knetlab-bench`).

    .venv/bin/python scripts/bench_overhead.py [--iters 60]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from knetlab.data.ade20k import ADE20KDataset
from knetlab.data.synthetic import generate_synthetic_ade20k
from knetlab.data.transforms import build_train_transform, collate_segmentation
from knetlab.models import create_model
from knetlab.platform import semantic_task, tracking
from knetlab.platform.config import load_config
from knetlab.platform.optim import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parent.parent


def bare_loop(cfg, iters: int, warmup: int) -> float:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule)
    data = ADE20KDataset(cfg.data.root, "training",
                         build_train_transform(cfg.data.crop_size, scale=tuple(cfg.data.scale)), seed=0)
    loader = DataLoader(data, batch_size=cfg.data.batch_size, sampler=RandomSampler(data, num_samples=10**6),
                        drop_last=True, num_workers=0, collate_fn=collate_segmentation)
    start = 0.0
    for step, batch in enumerate(loader):
        if step == warmup:
            start = time.perf_counter()
        if step == warmup + iters:
            break
        loss = sum(semantic_task.batch_losses(model, batch, torch.device("cpu")).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
        optimizer.step()
        scheduler.step()
    return (time.perf_counter() - start) / iters


def ray_loop(cfg_overrides: list[str], iters: int, warmup: int, work: Path) -> float:
    from knetlab.platform.trainer import run_training

    total = warmup + iters
    cfg = load_config(REPO / "experiments" / "smoke.yaml", [
        *cfg_overrides, "trainer.num_workers=1", f"trainer.max_iters={total}", f"trainer.log_interval={warmup}",
        f"trainer.eval_interval={total}", f"trainer.checkpoint_interval={total}", "schedule.milestones=[]",
        f"storage.uri={work / 'ckpt'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "data.val_max_images=1",
    ])
    summary = run_training(cfg)
    history = tracking.metric_history(f"sqlite:///{work / 'mlflow.db'}", summary["mlflow_run_id"],
                                      "train/time_per_iter")
    # the first window (the warm-up) includes start-up; the later windows are the steady state
    steady = [value for step, value in history if step > warmup]
    return sum(steady) / len(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="knetlab-overhead-"))
    data_root = work / "data"
    generate_synthetic_ade20k(data_root)
    overrides = [f"data.root={data_root}", "data.synthesize=false", "data.num_workers=0", "trainer.cpus_per_worker=1"]
    cfg = load_config(REPO / "experiments" / "smoke.yaml", overrides)
    bare = bare_loop(cfg, args.iters, args.warmup)
    in_ray = ray_loop(overrides, args.iters, args.warmup, work)
    figures = {"bench/bare_step_s": bare, "bench/ray_step_s": in_ray,
               "bench/overhead_pct": 100 * (in_ray - bare) / bare}
    print(f"bare loop {bare * 1000:.1f} ms/iter | knetlab Ray Train loop (1 worker) {in_ray * 1000:.1f} ms/iter | "
          f"overhead {figures['bench/overhead_pct']:+.1f}%  (tiny K-Net, batch {cfg.data.batch_size}, "
          f"crop {cfg.data.crop_size}, {args.iters} timed iterations after {args.warmup})")
    uri = tracking.resolve_tracking_uri(None)
    experiment = tracking.ensure_experiment("knetlab-bench", uri)
    run_id = tracking.create_run(uri, experiment, "platform-overhead", {"kind": "overhead"})
    client = tracking.client(uri)
    for key, value in figures.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id)


if __name__ == "__main__":
    main()
