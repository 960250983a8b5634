"""The training loop that runs on every Ray Train worker, in the shape of PyTorch's reference training scripts:
`setup_run`, `restore_run`, `train_one_iteration`, `validate_and_log`, `report` and `finish_run`, with the step on one
screen in `train_loop_per_worker`. What differs between task families (datasets, losses of a batch, validation) comes
from the family (`knetlab.platform.tasks`); the loop itself never branches on the task.

All state lives in checkpoints: a worker group restarted after a failure (or a `knetlab train --resume`) restores
model, optimizer, LR schedule, AMP scaler, RNG and the position in the data order from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from omegaconf import DictConfig, OmegaConf

from knetlab.evaluation.bench import no_cudnn_autotuning, peak_memory_gb, reset_peak_memory
from knetlab.models import build_segmentor
from knetlab.platform.checkpoint import bare_module, load_checkpoint, save_checkpoint, set_rng_state
from knetlab.platform.config import config_to_yaml
from knetlab.platform.optim import build_lr_scheduler, build_optimizer
from knetlab.platform.system_metrics import start_system_metrics
from knetlab.platform.task_family import TaskFamily, artifact_path
from knetlab.platform.tasks import task_family
from knetlab.platform.tracking import FIRST_ITERATION_METRIC
from knetlab.platform.train_data import ResumableSampler, train_loader
from knetlab.platform.train_progress import ProgressWindow, max_across_workers, window_means
from knetlab.precision import amp_dtype, precision_name, set_tf32


@dataclass
class WorkerRun:
    """Everything one worker's training holds; what must survive a restart is saved in `report`'s checkpoints."""

    cfg: DictConfig
    family: TaskFamily
    rank: int
    world_size: int
    device: torch.device
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    train_set: Any
    val_set: Any
    sampler: ResumableSampler
    iters_per_epoch: int
    mlflow_run_id: str | None
    logger: Any = None  # tracking.RunLogger on rank 0 when the run logs to MLflow
    stop_system_metrics: Any = None  # rank 0's system metrics sampler (system_metrics.py) while it runs
    artifact_root: Path | None = None
    loss_trace: Path | None = None  # this worker's exact losses per iteration (KNETLAB_WORKER_PID_DIR, tests)
    iteration: int = 0
    lr: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    train_peak_gb: float = 0.0  # the peak memory of training before the last validation (validation's excluded)

    @property
    def bare_model(self) -> torch.nn.Module:
        return bare_module(self.model)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_worker_model(cfg: DictConfig, device: torch.device, world_size: int) -> torch.nn.Module:
    """The experiment's model as this worker trains it: SyncBN across GPUs where the config asks for it, channels_last
    with trainer.channels_last."""
    model = build_segmentor(cfg.model)
    if cfg.model.sync_bn and device.type == "cuda" and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if cfg.trainer.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def set_gpu_switches(cfg: DictConfig, device: torch.device, family: TaskFamily) -> None:
    """TF32 (trainer.tf32) and cuDNN autotuning (trainer.cudnn_benchmark: for a family whose crop is fixed) on GPUs."""
    if device.type == "cuda":
        set_tf32(cfg.trainer.tf32)
        torch.backends.cudnn.benchmark = bool(cfg.trainer.cudnn_benchmark and family.fixed_crop)


def train_mode(model: torch.nn.Module, norm_eval: bool) -> None:
    """model.train(), with BatchNorm layers kept in eval mode (frozen statistics) when `norm_eval`."""
    model.train()
    if norm_eval:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def say(message: str) -> None:
    """One line to the driver's console. Not `print`: Ray Train patches it on workers to go both to stdout and to
    its logger, and the driver would show every line twice."""
    sys.stdout.write(f"[knetlab] {message}\n")
    sys.stdout.flush()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# ---------------------------------------------------------------------------------------------------------------
# The steps of a run


def setup_run(config: dict) -> WorkerRun:
    """Model, optimizer, schedule, data and (on rank 0) the MLflow logger of this worker. `config`: {"cfg": the
    resolved experiment config as a dict, "mlflow": {"tracking_uri", "run_id"} or None, "run_name": str}."""
    cfg = OmegaConf.create(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.trainer.cpus_per_worker)))
    seed_everything(cfg.trainer.seed + rank)
    loss_trace = None
    if pid_dir := os.environ.get("KNETLAB_WORKER_PID_DIR"):  # lets fault-injection tests find the workers
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))
        # ... and compare a restarted worker's losses with those of the one they killed, bit for bit
        loss_trace = Path(pid_dir) / f"losses_rank{rank}_pid{os.getpid()}.jsonl"

    family = task_family(cfg)
    set_gpu_switches(cfg, device, family)
    model = build_worker_model(cfg, device, world_size)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    if cfg.trainer.compile:
        model = torch.compile(model)  # of the DDP module, as PyTorch documents; validation runs the bare model
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule)
    dtype = amp_dtype(device) if cfg.trainer.amp else None
    train_set, val_set = family.train_dataset(cfg), family.val_dataset(cfg)
    iters_per_epoch = len(train_set) // (world_size * cfg.data.batch_size)
    if iters_per_epoch == 0:
        raise ValueError(f"data.root={cfg.data.root}: {len(train_set)} training images are fewer than one batch of "
                         f"{cfg.data.batch_size} per worker x {world_size} workers")
    mlflow = config.get("mlflow") or {}
    run = WorkerRun(
        cfg=cfg, family=family, rank=rank, world_size=world_size, device=device, model=model, optimizer=optimizer,
        scheduler=scheduler, scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None,
        amp_dtype=dtype, train_set=train_set, val_set=val_set,
        sampler=ResumableSampler(train_set, world_size, rank, cfg.trainer.seed),
        iters_per_epoch=iters_per_epoch, mlflow_run_id=mlflow.get("run_id"), loss_trace=loss_trace,
    )
    if rank == 0 and mlflow:
        from knetlab.platform.run_spool import run_spool_dir
        from knetlab.platform.tracking import RunLogger

        run.logger = RunLogger(mlflow["tracking_uri"], mlflow["run_id"],
                               spool_dir=run_spool_dir(cfg.storage.uri, config["run_name"]))
        run.artifact_root = Path(tempfile.mkdtemp(prefix="knetlab-artifacts-"))
        run.logger.set_tags({"bench/precision": precision_name(dtype, device)})  # of the training and its figures
        run.stop_system_metrics = start_system_metrics(run.logger.log_metrics, lambda: run.iteration,
                                                       cfg.tracking.system_metrics_interval)
    return run


def restore_run(run: WorkerRun) -> None:
    """Continue from the newest checkpoint Ray Train hands this worker group, if any."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(directory, run.rank)
    run.bare_model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["state"]["optimizer"])
    run.scheduler.load_state_dict(state["state"]["scheduler"])
    if run.scaler is not None and state["state"]["scaler"]:
        run.scaler.load_state_dict(state["state"]["scaler"])
    if state["rng"] is not None:
        set_rng_state(state["rng"], run.device)
    run.iteration, run.metrics = state["meta"]["iteration"], state["meta"]["metrics"]
    if run.rank == 0:
        say(f"resumed from the checkpoint at iteration {run.iteration}")


def batches(run: WorkerRun) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) from the run's position in the data order until max_iters; a resumed run starts mid-epoch.
    Each item's augmentation is seeded by (seed, epoch, index), so the batches do not depend on which loader process
    made them, nor on whether the processes were started at this epoch or an earlier one."""
    loader = train_loader(run.train_set, run.sampler, run.cfg, collate=run.family.collate,
                          pin_memory=run.device.type == "cuda" and run.cfg.data.pin_memory, rank=run.rank)
    while run.iteration < run.cfg.trainer.max_iters:
        epoch, position = divmod(run.iteration, run.iters_per_epoch)
        run.sampler.set_epoch(epoch)
        run.sampler.start = position * run.cfg.data.batch_size
        run.train_set.set_epoch(epoch)
        for batch in loader:
            yield epoch, batch
            if run.iteration >= run.cfg.trainer.max_iters:
                return


def train_one_iteration(run: WorkerRun, batch: Any) -> dict[str, torch.Tensor]:
    """Forward, backward and optimizer step on one batch; the detached losses (`loss` and each part)."""
    with torch.autocast(run.device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        losses = run.family.batch_losses(run.model, batch, run.device)
    loss = sum(losses.values())  # checked for NaN/inf at the next log point (`window_means`), not here: no host sync
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.cfg.optim.clip_grad_norm:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.optim.clip_grad_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.lr = run.optimizer.param_groups[0]["lr"]
    run.scheduler.step()
    run.iteration += 1
    detached = {"loss": loss.detach(), **{k: v.detach() for k, v in losses.items()}}
    if run.loss_trace is not None:
        with open(run.loss_trace, "a") as f:  # json writes floats exactly (repr): a float32 loss survives as is
            f.write(json.dumps({"iteration": run.iteration, **{k: float(v) for k, v in detached.items()}}) + "\n")
    return detached


def log_progress(run: WorkerRun, window: ProgressWindow, means: dict[str, float]) -> None:
    """The window's mean losses across workers (`window_means`) to MLflow and, on rank 0, the progress line."""
    elapsed = time.perf_counter() - window.start
    logged = dict(means)
    logged["train/lr"] = run.lr
    logged["train/time_per_iter"] = elapsed / window.iterations
    if run.rank == 0:
        max_iters, its = run.cfg.trainer.max_iters, window.iterations / elapsed
        score = run.family.score_metric
        best = f" {score.split('/', 1)[1]} {run.metrics[score]:.2f}" if score in run.metrics else ""
        say(f"iter {run.iteration}/{max_iters} loss {logged['train/loss']:.4f} lr {run.lr:.3g} "
            f"{its:.2f} it/s ETA {format_eta((max_iters - run.iteration) / its)}{best}")
        if run.logger is not None:
            run.logger.log_metrics(logged, step=run.iteration)


def validate_and_log(run: WorkerRun) -> None:
    """The family's validation on every worker; rank 0 prints it and logs metrics, details and artifacts."""
    eval_dir = artifact_path(run.artifact_root, run.iteration)
    run.train_peak_gb = max(run.train_peak_gb, peak_memory_gb(run.device) or 0.0)
    # The bare module: DDP's forward broadcasts buffers (a collective), and workers may hold different numbers of
    # validation images (of varying sizes: no cuDNN autotuning for each).
    with no_cudnn_autotuning():
        validation = run.family.validate(run.bare_model, run.val_set, run.cfg, run.device, run.rank, run.world_size,
                                         eval_dir)
    reset_peak_memory(run.device)  # bench/mem_gb is training's peak, not validation's
    train_mode(run.model, run.cfg.model.norm_eval)
    run.metrics = validation.metrics
    if run.rank != 0:
        return
    say(f"iter {run.iteration} val {validation.summary}")
    if run.logger is not None:
        run.logger.log_metrics({**validation.metrics, **validation.details}, step=run.iteration)
        for path in sorted(eval_dir.iterdir()) if eval_dir.is_dir() else ():
            run.logger.log_artifact(path, artifact_path=f"eval/iter_{run.iteration:07d}")
        shutil.rmtree(eval_dir, ignore_errors=True)  # the logger keeps its own copy until delivered


def report(run: WorkerRun, epoch: int, with_checkpoint: bool) -> None:
    """`ray.train.report` of the latest metrics, with this worker's part of a checkpoint when asked."""
    metrics = {**run.metrics, "iteration": run.iteration, "epoch": epoch}
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="knetlab-ckpt-") as tmp:
        save_checkpoint(tmp, rank=run.rank, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
                        scaler=run.scaler, iteration=run.iteration, epoch=epoch, metrics=run.metrics,
                        config_yaml=config_to_yaml(run.cfg), mlflow_run_id=run.mlflow_run_id, device=run.device)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint_{run.iteration:07d}")


def finish_run(run: WorkerRun, trained_here: bool) -> None:
    """The largest worker's training peak memory and, on rank 0, the table's figures; with eval.final_ms_flip every
    worker then evaluates once more with multi-scale + flip (after the memory figure, which is training's); then the
    MLflow logger is closed (delivering what it still holds)."""
    # A run restored at its end (interrupted after its last checkpoint) trained nothing here: no memory figure.
    memory = None
    if trained_here:
        memory = max_across_workers(max(run.train_peak_gb, peak_memory_gb(run.device) or 0.0), run.device)
    figures = table_figures(run, memory) if run.rank == 0 else {}
    if run.cfg.eval.final_ms_flip:
        figures.update(run.family.validate_ms_flip(run.bare_model, run.cfg, run.device, run.rank, run.world_size))
    if run.rank == 0 and figures:
        say("after training: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        if run.logger is not None:
            run.logger.log_metrics(figures, step=run.cfg.trainer.max_iters)
    if run.logger is not None:
        run.stop_system_metrics()  # its last point goes into the spool before the logger's last delivery
        run.logger.close(timeout_s=run.cfg.tracking.delivery_timeout_s)
        shutil.rmtree(run.artifact_root, ignore_errors=True)


def table_figures(run: WorkerRun, memory: float | None) -> dict[str, float]:
    """The table's Mem (`memory`: the training peak, GiB; 0 where unknown) and, with trainer.bench_images, its
    inference fps (batch 1 at the family's benchmark image size, as `knetlab bench`, in the run's precision)."""
    from knetlab.evaluation.bench import benchmark

    figures = {}
    if memory:
        figures["bench/mem_gb"] = memory
    images = run.cfg.trainer.bench_images
    if images > 0:
        result = benchmark(run.bare_model, image_size=run.family.bench_image_size(run.cfg),
                           warmup=min(5, images), timed=images, train_steps=0, device=run.device,
                           restore_weights=False, verbose=False, amp_dtype=run.amp_dtype,
                           channels_last=run.cfg.trainer.channels_last)
        figures["bench/fps"] = result["bench/fps"]
    return figures


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (see `setup_run` for `config`)."""
    run = setup_run(config)
    restore_run(run)
    trainer_cfg = run.cfg.trainer
    trained_here = run.iteration < trainer_cfg.max_iters
    train_mode(run.model, run.cfg.model.norm_eval)
    window = ProgressWindow()
    for epoch, batch in batches(run):
        window.add(train_one_iteration(run, batch), run.iteration)
        if run.iteration == 1 and run.logger is not None:
            run.logger.log_metrics({FIRST_ITERATION_METRIC: time.time()}, step=1)
        last = run.iteration == trainer_cfg.max_iters
        log_now = run.iteration % trainer_cfg.log_interval == 0 or last
        validate_now = run.iteration % trainer_cfg.eval_interval == 0 or last
        checkpoint_now = run.iteration % trainer_cfg.checkpoint_interval == 0 or last
        if log_now or validate_now or checkpoint_now:
            means = window_means(window, run.device)  # on every worker: a NaN anywhere stops them all here
        if log_now:
            log_progress(run, window, means)
            window = ProgressWindow()
        if validate_now or checkpoint_now:
            pause_start = time.perf_counter()
            if validate_now:
                validate_and_log(run)
            report(run, epoch, with_checkpoint=checkpoint_now)
            window.pause(time.perf_counter() - pause_start)
    finish_run(run, trained_here)
