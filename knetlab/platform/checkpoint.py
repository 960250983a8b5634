"""The checkpoint directory format: model, optimizer, LR scheduler, AMP scaler, iteration, RNG states, resolved
config and metrics — everything loadable with `torch.load(weights_only=True)`.

Layout of one checkpoint directory:
    model.pt          the model's state dict (no DDP `module.` prefix)
    train_state.pt    optimizer, scheduler, scaler state dicts
    rng_rank{r}.pt    each worker's RNG states (python, numpy, torch, and its own GPU's)
    meta.json         iteration, epoch, metrics, MLflow run id
    config.yaml       the resolved experiment config
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

META_FILE = "meta.json"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"


class CheckpointError(ValueError):
    """A checkpoint that is missing or not in knetlab's format; the message names it."""


def bare_module(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself inside a torch.compile wrapper (`_orig_mod`) and/or DDP (`module`): the module whose state
    dict has the zoo's parameter names."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states, as tensors and plain containers (weights_only-loadable): python, numpy, torch's
    CPU generator and, on a GPU `device`, that GPU's generator only (the worker's own: a resume may run on a node with
    fewer GPUs, or on another local GPU)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore `rng_state`'s states; the saved GPU generator goes to this worker's GPU `device`."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, list):  # checkpoints before knetlab 0.1: every visible GPU's state; this device's index
        index = device.index if device.index is not None else torch.cuda.current_device()
        cuda = cuda[index] if index < len(cuda) else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def save_checkpoint(
    directory: str | Path,
    *,
    rank: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler | None,
    iteration: int,
    epoch: int,
    metrics: dict[str, float],
    config_yaml: str,
    mlflow_run_id: str | None,
    device: torch.device | None = None,
) -> Path:
    """Write this worker's part of a checkpoint into `directory`: rank 0 writes the model and training state,
    every rank writes its RNG states, with its GPU's (`device`) (Ray Train merges the workers' files into one
    checkpoint)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(device), directory / f"rng_rank{rank}.pt")
    if rank == 0:
        torch.save(bare_module(model).state_dict(), directory / MODEL_FILE)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
            },
            directory / STATE_FILE,
        )
        (directory / CONFIG_FILE).write_text(config_yaml)
        meta = {"iteration": iteration, "epoch": epoch, "metrics": metrics, "mlflow_run_id": mlflow_run_id}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, default=float))
    return directory


def load_meta(directory: str | Path) -> dict[str, Any]:
    """meta.json of a checkpoint directory, local or s3:// (read alone, without downloading the weights)."""
    from knetlab.object_store import is_s3

    if is_s3(str(directory)):
        from knetlab.platform.storage import storage_target

        filesystem, path = storage_target(str(directory))
        try:
            with filesystem.open_input_stream(f"{path}/{META_FILE}") as stream:
                return json.loads(stream.read())
        except (OSError, ValueError):
            raise CheckpointError(f"checkpoint {directory}: no readable {META_FILE} (not a knetlab checkpoint)"
                                  ) from None
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: not a knetlab checkpoint (no {META_FILE})")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | Path, rank: int = 0) -> dict[str, Any]:
    """Everything a worker needs to continue: model and training state, its RNG states (falls back to rank 0's
    when the checkpoint came from fewer workers), meta."""
    directory = Path(directory)
    meta = load_meta(directory)
    rng_file = directory / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        rng_file = directory / "rng_rank0.pt"
    return {
        "model": torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True),
        "state": torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True),
        "rng": torch.load(rng_file, weights_only=True) if rng_file.is_file() else None,
        "meta": meta,
        "config_yaml": (directory / CONFIG_FILE).read_text(),
    }


def local_checkpoint_dir(uri: str, work_dir: str | Path | None = None) -> Path:
    """A local directory holding the checkpoint at `uri` (a local path, or s3:// downloaded to a temp dir)."""
    from knetlab.object_store import is_s3

    if not is_s3(uri):
        path = Path(uri)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint {uri}: no such directory")
        return path
    from knetlab.platform.storage import download_dir

    target = Path(work_dir or tempfile.mkdtemp(prefix="knetlab-ckpt-"))
    download_dir(uri, target)
    return target


def load_model_from_checkpoint(uri: str) -> tuple[torch.nn.Module, Any]:
    """The trained model (eval mode, on CPU) and its resolved config from a checkpoint directory or s3:// URI."""
    import yaml

    from knetlab.models import build_segmentor
    from knetlab.platform.config import config_from_container

    directory = local_checkpoint_dir(uri)
    for name in (CONFIG_FILE, MODEL_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"checkpoint {uri}: no {name} (not a knetlab checkpoint directory)")
    cfg = config_from_container(yaml.safe_load((directory / CONFIG_FILE).read_text()), source=f"{uri}/{CONFIG_FILE}")
    model = build_segmentor(cfg.model, load_weights=False)  # the trained weights replace every initial one
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    return model.eval(), cfg
