"""`knetlab bench EXP.yaml`: the experiment's model timed by `knetlab.evaluation.benchmark` at its crop, batch and
test scale, in its precision (trainer.amp, trainer.tf32) and memory format (trainer.channels_last), in this process
or in one Ray task that gets a GPU of its own (`--ray`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


def benchmark_experiment(cfg: Any, options: dict[str, Any]) -> dict[str, Any]:
    """knetlab.evaluation.benchmark of the experiment's model. `options`: warmup, timed, train_steps, device (None:
    cuda if trainer.use_gpu and a GPU is present), image_size (None: the family's), quiet, and precision ('fp32',
    'bf16', 'fp16'; None: the config's, i.e. trainer.amp's dtype for the device)."""
    import torch

    from knetlab.evaluation import benchmark
    from knetlab.evaluation.bench import is_detector
    from knetlab.models import build_segmentor
    from knetlab.platform.tasks import task_family
    from knetlab.precision import PRECISION_DTYPES, amp_dtype, set_tf32

    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    device = torch.device(options["device"] or ("cuda" if cfg.trainer.use_gpu and torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        set_tf32(cfg.trainer.tf32)
    precision = options.get("precision")
    dtype = PRECISION_DTYPES[precision] if precision else (amp_dtype(device) if cfg.trainer.amp else None)
    model = build_segmentor(cfg.model, load_weights=False)  # timing needs no trained or pretrained weights
    # A typical image of the family's dataset resized to eval.test_scale (ADE20K 512x683; COCO 800x1067).
    image_size = options["image_size"] or task_family(cfg).bench_image_size(cfg)
    # Panoptic/instance models train on whole images padded to 32 (no crop): time them at the benchmark image.
    crop = [-(-side // 32) * 32 for side in image_size] if is_detector(model) else [cfg.data.crop_size] * 2
    return benchmark(
        model,
        image_size=image_size,
        warmup=options["warmup"],
        timed=options["timed"],
        train_steps=options["train_steps"],
        batch_size=cfg.data.batch_size,
        crop_size=tuple(crop),
        device=device,
        lr=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        max_grad_norm=cfg.optim.clip_grad_norm,
        verbose=not options.get("quiet", False),
        restore_weights=options.get("restore_weights", True),
        amp_dtype=dtype,
        channels_last=cfg.trainer.channels_last,
    )


def ray_task_placement(device: str | None, use_gpu: bool) -> tuple[int, str]:
    """(GPUs the Ray task asks for, the device it measures on). A Ray task sees only the GPU Ray assigned it, as
    cuda:0 (CUDA_VISIBLE_DEVICES), so `--device cuda:N` asks for one GPU and runs on it: Ray, not N, picks which."""
    wants_gpu = device.split(":", 1)[0] == "cuda" if device else use_gpu
    return (1, "cuda") if wants_gpu else (0, "cpu")


def run_on_ray(measure: Callable[[Any, dict[str, Any]], dict[str, Any]], cfg: DictConfig,
               options: dict[str, Any]) -> dict[str, Any]:
    """`measure(cfg, options)` in one Ray task (the local Ray, or the cluster in RAY_ADDRESS)."""
    from knetlab.platform.trainer import init_ray

    init_ray()  # before importing Ray: it sets the local cluster's settings Ray reads at import
    import ray

    num_gpus, device = ray_task_placement(options["device"], cfg.trainer.use_gpu)
    if options["device"] and options["device"] != device:
        print(f"[knetlab] --ray: measuring on the GPU Ray assigns to the task ({device} inside it), not on "
              f"{options['device']} of this machine", flush=True)
    task = ray.remote(num_cpus=1, num_gpus=num_gpus)(measure)
    return ray.get(task.remote(OmegaConf.to_container(cfg, resolve=True),
                               {**options, "device": device, "quiet": True}))
