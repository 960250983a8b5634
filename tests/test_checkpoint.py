"""The checkpoint directory format: every part round-trips through `torch.load(weights_only=True)`, RNG states
restore the exact random streams, and `load_model_from_checkpoint` rebuilds the trained model from a local
directory or an s3:// URI (moto server)."""

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from knetlab.models import create_model
from knetlab.platform.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model_from_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from knetlab.platform.config import config_to_yaml, load_config
from knetlab.platform.optim import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parent.parent
CPU_DEVICE = torch.device("cpu")
SMOKE = REPO / "experiments" / "smoke.yaml"


def trained_state(steps: int = 3):
    """A tiny K-Net after a few real AdamW steps (non-empty optimizer state), its scheduler, a CPU GradScaler."""
    cfg = load_config(SMOKE, ["data.synthesize=false", "schedule.warmup_iters=5"])
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes).train()
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 150, (2, 64, 64))
    for _ in range(steps):
        loss = sum(model(images, labels).values())
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
    return cfg, model, optimizer, scheduler, scaler


def write(directory: Path, cfg, model, optimizer, scheduler, scaler, *, ranks=(0, 1)) -> None:
    for rank in ranks:
        save_checkpoint(directory, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                        iteration=30, epoch=3, metrics={"val/mIoU": 12.5, "val/aAcc": 40.0},
                        config_yaml=config_to_yaml(cfg), mlflow_run_id="abc123")


def test_every_file_loads_with_weights_only_and_round_trips(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, scaler = trained_state()
    write(tmp_path, cfg, model, optimizer, scheduler, scaler)

    assert {p.name for p in tmp_path.iterdir()} == {"model.pt", "train_state.pt", "rng_rank0.pt", "rng_rank1.pt",
                                                    "meta.json", "config.yaml"}
    for path in tmp_path.glob("*.pt"):
        torch.load(path, weights_only=True)  # raises on anything but tensors and plain containers

    state = load_checkpoint(tmp_path, rank=1)
    assert state["meta"] == {"iteration": 30, "epoch": 3, "metrics": {"val/mIoU": 12.5, "val/aAcc": 40.0},
                             "mlflow_run_id": "abc123"}
    assert yaml.safe_load(state["config_yaml"]) == yaml.safe_load(config_to_yaml(cfg))
    for key, value in model.state_dict().items():
        assert torch.equal(state["model"][key], value), key

    # restore into fresh objects as the train loop does, and compare everything that matters for continuing
    _, fresh_model, fresh_optimizer, fresh_scheduler, fresh_scaler = trained_state(steps=0)
    fresh_model.load_state_dict(state["model"])
    fresh_optimizer.load_state_dict(state["state"]["optimizer"])
    fresh_scheduler.load_state_dict(state["state"]["scheduler"])
    fresh_scaler.load_state_dict(state["state"]["scaler"])
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 3
    assert fresh_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert fresh_scaler.get_scale() == scaler.get_scale()
    for (a, b) in zip(fresh_optimizer.state.values(), optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert a["step"] == b["step"]


def test_rng_states_restore_the_same_random_streams(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == expected


class FakeCudaGenerators:
    """torch.cuda's RNG functions on a machine without a GPU: one generator state per device index (4 GPUs), every
    call recorded. The all-device functions fail: a worker must save and restore its own GPU's generator only."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(4)}
        self.restored: list[tuple[int, list[int]]] = []
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: self.states[torch.device(device).index])
        monkeypatch.setattr(torch.cuda, "set_rng_state",
                            lambda state, device: self.restored.append((torch.device(device).index, state.tolist())))
        for name in ("get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, n=name: pytest.fail(f"{n}: every GPU's generator"))


def test_a_worker_saves_and_restores_its_own_gpus_generator_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    fake = FakeCudaGenerators(monkeypatch)
    saved = rng_state(torch.device("cuda", 3))  # rank r on local GPU 3 of a 4-GPU node
    assert saved["cuda"].tolist() == [3] * 8
    torch.save(saved, tmp_path / "rng.pt")
    # resumed on a 1-GPU node: its only GPU gets the saved generator (set_rng_state_all would raise IndexError)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cuda", 0))
    assert fake.restored == [(0, [3] * 8)]
    set_rng_state(saved, CPU_DEVICE)  # a CPU worker leaves the GPUs alone
    assert "cuda" not in rng_state(CPU_DEVICE) and fake.restored == [(0, [3] * 8)]
    # a checkpoint of the old format (every visible GPU's state): this device's entry, or none if it has no entry
    old = {**saved, "cuda": [torch.full((8,), 10 + i, dtype=torch.uint8) for i in range(2)]}
    set_rng_state(old, torch.device("cuda", 1))
    set_rng_state(old, torch.device("cuda", 3))
    assert fake.restored[1:] == [(1, [11] * 8)]


def test_each_rank_gets_its_own_rng_and_a_missing_rank_falls_back_to_rank0(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, _ = trained_state(steps=1)
    torch.manual_seed(10)
    save_checkpoint(tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    iteration=1, epoch=0, metrics={}, config_yaml=config_to_yaml(cfg), mlflow_run_id=None)
    torch.manual_seed(11)
    save_checkpoint(tmp_path, rank=1, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                    iteration=1, epoch=0, metrics={}, config_yaml=config_to_yaml(cfg), mlflow_run_id=None)
    rank0, rank1, rank5 = (load_checkpoint(tmp_path, rank=r)["rng"]["torch"] for r in (0, 1, 5))
    assert not torch.equal(rank0, rank1)
    assert torch.equal(rank5, rank0)  # a checkpoint from 2 workers resumed on more workers
    assert load_checkpoint(tmp_path)["state"]["scaler"] == {}


def test_load_model_from_local_checkpoint(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, scaler = trained_state()
    write(tmp_path / "ckpt", cfg, model, optimizer, scheduler, scaler, ranks=(0,))
    loaded, loaded_cfg = load_model_from_checkpoint(str(tmp_path / "ckpt"))
    assert not loaded.training
    assert loaded_cfg.model.name == cfg.model.name and loaded_cfg.trainer.max_iters == cfg.trainer.max_iters
    model.eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


def test_load_model_from_s3_checkpoint(tmp_path: Path, s3_server) -> None:
    import pyarrow.fs as pafs

    from knetlab.platform.storage import storage_target

    cfg, model, optimizer, scheduler, scaler = trained_state(steps=1)
    write(tmp_path / "ckpt", cfg, model, optimizer, scheduler, scaler, ranks=(0,))
    uri = f"s3://{s3_server.bucket}/runs/r1/checkpoint_0000030"
    filesystem, path = storage_target(uri)
    pafs.copy_files(str(tmp_path / "ckpt"), path, destination_filesystem=filesystem)
    assert "runs/r1/checkpoint_0000030/model.pt" in s3_server.list_keys("runs/")
    loaded, _ = load_model_from_checkpoint(uri)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_not_a_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path}/nothing: no such directory")):
        load_model_from_checkpoint(str(tmp_path / "nothing"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a knetlab checkpoint"):
        load_model_from_checkpoint(str(tmp_path / "other"))
    with pytest.raises(CheckpointError, match=r"no meta\.json"):
        load_checkpoint(tmp_path / "other")


def test_meta_is_plain_json(tmp_path: Path) -> None:
    cfg, model, optimizer, scheduler, scaler = trained_state(steps=1)
    save_checkpoint(tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    iteration=7, epoch=1, metrics={"val/mIoU": torch.tensor(3.5).item()},
                    config_yaml=config_to_yaml(cfg), mlflow_run_id=None)
    assert json.loads((tmp_path / "meta.json").read_text())["metrics"] == {"val/mIoU": 3.5}
