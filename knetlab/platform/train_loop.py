"""The training loop that runs on every Ray Train worker: data -> K-Net -> losses -> AdamW -> periodic evaluation
and checkpoints -> `ray.train.report`; rank 0 logs to MLflow and prints the progress line.

All state lives in checkpoints: a worker group restarted after a failure (or a `knetlab train --resume`) restores
model, optimizer, LR schedule, AMP scaler, RNG and the position in the data order from `ray.train.get_checkpoint()`.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from knetlab.data.ade20k import ADE20KDataset
from knetlab.data.transforms import build_test_transform, build_train_transform
from knetlab.evaluation.inference import predict, predict_settings
from knetlab.evaluation.metrics import SegEvaluator
from knetlab.models import create_model
from knetlab.platform.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from knetlab.platform.config import config_to_yaml
from knetlab.platform.optim import build_optimizer, build_scheduler
from knetlab.platform.tracking import FIRST_ITERATION_METRIC


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch, so a resumed run continues the same data order
    without loading the batches it already trained on."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a GradScaler); None on CPU (FP32 as published)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def build_model(cfg: DictConfig, device: torch.device, world_size: int) -> torch.nn.Module:
    model = create_model(
        cfg.model.name,
        **{
            **dict(cfg.model.overrides),
            "num_classes": cfg.model.num_classes,
            "pretrained": cfg.model.pretrained,
            "drop_path_rate": cfg.model.drop_path_rate,
        },
    )
    if cfg.model.init_checkpoint:
        state = torch.load(cfg.model.init_checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    if cfg.model.sync_bn and device.type == "cuda" and world_size > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def train_mode(model: torch.nn.Module, norm_eval: bool) -> None:
    """model.train(), with BatchNorm layers kept in eval mode (frozen statistics) when `norm_eval`."""
    model.train()
    if norm_eval:
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()


def mean_across_workers(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist()))


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: ADE20KDataset, cfg: DictConfig, device: torch.device,
             rank: int, world_size: int, artifact_dir: Path | None) -> dict[str, Any]:
    """mIoU/mAcc/aAcc on the validation split, each worker taking every world_size-th image, counts summed over
    workers. Rank 0 also writes the per-class CSV, confusion-matrix PNG and prediction overlays into artifact_dir."""
    from knetlab.evaluation import visualize

    model.eval()
    evaluator = SegEvaluator(cfg.model.num_classes)
    settings = predict_settings(cfg.eval)
    settings["test_scale"] = None  # the test transform already resized the image to eval.test_scale
    overlays: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for index in range(rank, len(dataset), world_size):
        item = dataset[index]
        image = item["image"][None].to(device)
        label = item["label"][None].to(device)
        pred = predict(model, image, label.shape[-2:], **settings)
        evaluator.update(pred, label)
        if artifact_dir is not None and len(overlays) < 4:
            size = image.shape[-2:]
            resize = torch.nn.functional.interpolate
            overlays.append((
                image[0].cpu(),
                resize(pred[None].float(), size=size, mode="nearest")[0, 0].long().cpu(),
                resize(label[None].float(), size=size, mode="nearest")[0, 0].long().cpu(),
            ))
    evaluator.all_reduce()
    result = evaluator.compute()
    if artifact_dir is not None:
        names = dataset.classes
        visualize.per_class_csv(result, names, artifact_dir / "per_class_iou.csv")
        visualize.confusion_matrix_png(evaluator.confusion_matrix.cpu(), names, artifact_dir / "confusion_matrix.png")
        if overlays:
            # images of different sizes: one PNG per image
            palette = dataset.palette if dataset.palette is not None else _palette(cfg.model.num_classes)
            for i, (img, pred, label) in enumerate(overlays):
                visualize.overlay_png(img[None], pred[None], label[None], palette, artifact_dir / f"overlay_{i}.png")
    return result


def _palette(num_classes: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def say(message: str) -> None:
    """One line to the driver's console. Not `print`: Ray Train patches it on workers to go both to stdout and to
    its logger, and the driver would show every line twice."""
    sys.stdout.write(f"[knetlab] {message}\n")
    sys.stdout.flush()


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. `config`: {"cfg": resolved experiment config as a dict, "mlflow": {"tracking_uri",
    "run_id"} or None, "run_name": str}."""
    cfg = OmegaConf.create(config["cfg"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    trainer_cfg, data_cfg = cfg.trainer, cfg.data
    torch.set_num_threads(max(1, int(trainer_cfg.cpus_per_worker)))
    seed_everything(trainer_cfg.seed + rank)
    if pid_dir := os.environ.get("KNETLAB_WORKER_PID_DIR"):  # lets fault-injection tests find the workers
        Path(pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))

    model = build_model(cfg, device, world_size)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.schedule)
    dtype = amp_dtype(device) if trainer_cfg.amp else None
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    train_set = ADE20KDataset(
        data_cfg.root, "training",
        build_train_transform(data_cfg.crop_size, scale=tuple(data_cfg.scale), ratio_range=tuple(data_cfg.ratio_range),
                              cat_max_ratio=data_cfg.cat_max_ratio),
        num_classes=cfg.model.num_classes, seed=trainer_cfg.seed, cache_dir=data_cfg.cache_dir,
    )
    val_set = ADE20KDataset(data_cfg.root, "validation", build_test_transform(tuple(cfg.eval.test_scale)),
                            num_classes=cfg.model.num_classes, max_images=data_cfg.val_max_images,
                            cache_dir=data_cfg.cache_dir)
    sampler = ResumableSampler(train_set, world_size, rank, trainer_cfg.seed)
    iters_per_epoch = len(train_set) // (world_size * data_cfg.batch_size)
    if iters_per_epoch == 0:
        raise ValueError(f"data.root={data_cfg.root}: {len(train_set)} training images are fewer than one batch of "
                         f"{data_cfg.batch_size} per worker x {world_size} workers")

    iteration, metrics = 0, {}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, rank)
        (model.module if hasattr(model, "module") else model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["state"]["optimizer"])
        scheduler.load_state_dict(state["state"]["scheduler"])
        if scaler is not None and state["state"]["scaler"]:
            scaler.load_state_dict(state["state"]["scaler"])
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        iteration, metrics = state["meta"]["iteration"], state["meta"]["metrics"]
        if rank == 0:
            say(f"resumed from the checkpoint at iteration {iteration}")

    logger, artifact_root = None, None
    if rank == 0 and config.get("mlflow"):
        from knetlab.platform.tracking import RunLogger

        # beside local checkpoints; for s3:// storage in the temp dir (not the temp dir's parent, i.e. "/")
        s3 = cfg.storage.uri.startswith("s3://")
        spool_root = Path(tempfile.gettempdir()) if s3 else Path(cfg.storage.uri).parent
        logger = RunLogger(config["mlflow"]["tracking_uri"], config["mlflow"]["run_id"],
                           spool_dir=spool_root / "mlflow-spool" / config["run_name"])
        artifact_root = Path(tempfile.mkdtemp(prefix="knetlab-artifacts-"))

    config_yaml = config_to_yaml(cfg)  # secrets redacted
    max_iters = trainer_cfg.max_iters
    trained_here = iteration < max_iters
    train_mode(model, cfg.model.norm_eval)
    window_start, window_iters, window_loss = time.perf_counter(), 0, {}
    while iteration < max_iters:
        epoch, position = divmod(iteration, iters_per_epoch)
        sampler.set_epoch(epoch)
        sampler.start = position * data_cfg.batch_size
        train_set.set_epoch(epoch)
        # Its own generator: creating a loader draws a seed from it, and drawing from the global RNG would make a
        # run resumed mid-epoch draw once more than an uninterrupted one (different dropout from then on).
        loader = DataLoader(train_set, batch_size=data_cfg.batch_size, sampler=sampler, drop_last=True,
                            num_workers=data_cfg.num_workers, pin_memory=device.type == "cuda",
                            persistent_workers=False,
                            generator=torch.Generator().manual_seed(trainer_cfg.seed * 100_003 + epoch * 1_009 + rank))
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            labels = batch["label"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                losses = model(images, labels)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"iteration {iteration + 1}: loss is {loss.item()} (lr too high?)")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.optim.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            iteration += 1
            window_iters += 1
            if iteration == 1 and logger is not None:
                logger.log_metrics({FIRST_ITERATION_METRIC: time.time()}, step=1)
            for key, value in {"train/loss": loss, **{f"train/{k}": v for k, v in losses.items()}}.items():
                window_loss[key] = window_loss.get(key, 0.0) + float(value.detach())

            last = iteration == max_iters
            if iteration % trainer_cfg.log_interval == 0 or last:
                elapsed = time.perf_counter() - window_start
                logged = mean_across_workers({k: v / window_iters for k, v in window_loss.items()}, device)
                logged["train/lr"] = lr
                logged["train/time_per_iter"] = elapsed / window_iters
                if rank == 0:
                    its = window_iters / elapsed
                    miou = f" mIoU {metrics['val/mIoU']:.2f}" if "val/mIoU" in metrics else ""
                    say(f"iter {iteration}/{max_iters} loss {logged['train/loss']:.4f} lr {lr:.3g} "
                        f"{its:.2f} it/s ETA {format_eta((max_iters - iteration) / its)}{miou}")
                    if logger is not None:
                        logger.log_metrics(logged, step=iteration)
                window_start, window_iters, window_loss = time.perf_counter(), 0, {}

            evaluate_now = iteration % trainer_cfg.eval_interval == 0 or last
            checkpoint_now = iteration % trainer_cfg.checkpoint_interval == 0 or last
            pause_start = time.perf_counter()
            if evaluate_now:
                eval_dir = artifact_root / f"eval_{iteration}" if artifact_root is not None else None
                # The bare module: DDP's forward broadcasts buffers (a collective), and workers may hold different
                # numbers of validation images.
                bare = model.module if hasattr(model, "module") else model
                result = evaluate(bare, val_set, cfg, device, rank, world_size, eval_dir)
                train_mode(model, cfg.model.norm_eval)
                metrics = {"val/mIoU": result["mIoU"], "val/mAcc": result["mAcc"], "val/aAcc": result["aAcc"]}
                if rank == 0:
                    say(f"iter {iteration} val mIoU {result['mIoU']:.2f} mAcc {result['mAcc']:.2f} "
                        f"aAcc {result['aAcc']:.2f}")
                    if logger is not None:
                        names = val_set.classes or [f"class_{i}" for i in range(cfg.model.num_classes)]
                        per_class = {f"val/IoU/{n}": v for n, v in zip(names, result["IoU"]) if not math.isnan(v)}
                        logger.log_metrics({**metrics, **per_class}, step=iteration)
                        for path in sorted(eval_dir.iterdir()):
                            logger.log_artifact(path, artifact_path=f"eval/iter_{iteration:07d}")
                        shutil.rmtree(eval_dir)  # the logger keeps its own copy until delivered
            if evaluate_now or checkpoint_now:
                report = {**metrics, "iteration": iteration, "epoch": epoch}
                if checkpoint_now:
                    with tempfile.TemporaryDirectory(prefix="knetlab-ckpt-") as tmp:
                        save_checkpoint(tmp, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler,
                                        scaler=scaler, iteration=iteration, epoch=epoch, metrics=metrics,
                                        config_yaml=config_yaml,
                                        mlflow_run_id=(config.get("mlflow") or {}).get("run_id"))
                        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                         checkpoint_dir_name=f"checkpoint_{iteration:07d}")
                else:
                    ray.train.report(report)
                window_start += time.perf_counter() - pause_start  # train/time_per_iter counts training only
            if last:
                break
        else:
            continue
        break
    if rank == 0:
        # A run restored at its end (interrupted after its last checkpoint) trained nothing here: no memory figure.
        figures = table_figures(model.module if hasattr(model, "module") else model, cfg, device,
                                with_memory=trained_here)
        if figures:
            say("after training: " + ", ".join(f"{k} {v:.3g}" for k, v in figures.items()))
        if logger is not None and figures:
            logger.log_metrics(figures, step=max_iters)
    if logger is not None:
        logger.close()
        shutil.rmtree(artifact_root, ignore_errors=True)


def table_figures(model: torch.nn.Module, cfg: DictConfig, device: torch.device,
                  with_memory: bool = True) -> dict[str, float]:
    """The table's Mem (peak memory of this training process) and, with trainer.bench_images, its inference fps
    (batch 1 at the test scale, as `knetlab bench`)."""
    from knetlab.evaluation.bench import TYPICAL_ADE20K_IMAGE, benchmark, peak_memory_gb
    from knetlab.evaluation.inference import rescale_size

    figures = {}
    memory = peak_memory_gb(device) if with_memory else None
    if memory is not None:
        figures["bench/mem_gb"] = memory
    images = cfg.trainer.bench_images
    if images > 0:
        result = benchmark(model, image_size=rescale_size(TYPICAL_ADE20K_IMAGE, tuple(cfg.eval.test_scale)),
                           warmup=min(5, images), timed=images, train_steps=0, device=device,
                           restore_weights=False, log_to_mlflow=False, verbose=False)
        figures["bench/fps"] = result["bench/fps"]
    return figures
