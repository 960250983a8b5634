"""The training loop's data: one DataLoader per run whose loader processes persist across epochs, yet every batch
is the one an in-process loader gives, each epoch draws new augmentations, and a run resumed mid-epoch continues
with exactly the batches of an uninterrupted one (no Ray: `batches` on a real dataset, sampler and loader)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from knetlab.data import ADE20KDataset, build_train_transform, generate_synthetic_ade20k
from knetlab.platform.config import load_config, loader_workers
from knetlab.platform.semantic_task import FAMILY
from knetlab.platform.train_data import ResumableSampler
from knetlab.platform.train_loop import batches

SMOKE = Path(__file__).resolve().parent.parent / "experiments" / "smoke.yaml"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("train-data")
    generate_synthetic_ade20k(root, num_train=6, num_val=1, num_classes=6, min_side=40, max_side=72, seed=3)
    return root


def collect(data_root: Path, num_workers: int, start: int, stop: int) -> list[tuple[int, dict]]:
    """(epoch, batch) of iterations start..stop-1 of a one-worker run, 6 images in batches of 2: 3 per epoch."""
    cfg = load_config(SMOKE, [f"data.root={data_root}", "data.synthesize=false", "data.batch_size=2",
                              f"data.num_workers={num_workers}", f"trainer.max_iters={stop}", "trainer.seed=7",
                              "schedule.milestones=[]", "schedule.warmup_iters=1"])
    dataset = ADE20KDataset(data_root, "training", build_train_transform(32, scale=(128, 32)), seed=7)
    run = SimpleNamespace(cfg=cfg, family=FAMILY, train_set=dataset, sampler=ResumableSampler(dataset, 1, 0, 7),
                          device=torch.device("cpu"), rank=0, iteration=start, iters_per_epoch=3)
    out = []
    for epoch, batch in batches(run):
        out.append((epoch, batch))
        run.iteration += 1
    return out


def same(a: list[tuple[int, dict]], b: list[tuple[int, dict]]) -> bool:
    return len(a) == len(b) and all(
        ea == eb and ba["path"] == bb["path"] and torch.equal(ba["label"], bb["label"])
        and all(torch.equal(x, y) for x, y in zip(ba["image"], bb["image"], strict=True))
        for (ea, ba), (eb, bb) in zip(a, b))


def test_persistent_loader_processes_resume_bit_exact_and_follow_the_epoch(data_root: Path):
    in_process = collect(data_root, 0, 0, 8)
    persistent = collect(data_root, 2, 0, 8)
    assert [epoch for epoch, _ in persistent] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert same(persistent, in_process)  # loader processes make the items the training process would
    resumed = collect(data_root, 2, 0, 4) + collect(data_root, 2, 4, 8)  # stopped mid-epoch 1, resumed
    assert same(resumed, persistent)
    # the processes started at epoch 0 still see each new epoch: an image's augmentation changes with it
    by_epoch = {}
    for epoch, batch in persistent[:6]:
        for path, image in zip(batch["path"], batch["image"]):
            by_epoch.setdefault(path, {})[epoch] = image
    assert len(by_epoch) == 6
    assert all(not (e[0].shape == e[1].shape and torch.equal(e[0], e[1])) for e in by_epoch.values())


def test_loader_workers_default_to_the_cpus_the_training_process_leaves():
    def workers(*overrides: str) -> int:
        return loader_workers(load_config(SMOKE, list(overrides)))

    assert workers("data.num_workers=null", "trainer.cpus_per_worker=3") == 2
    assert workers("data.num_workers=null", "trainer.cpus_per_worker=1") == 0
    assert workers("data.num_workers=5", "trainer.cpus_per_worker=1") == 5
    assert load_config(SMOKE.parent / "ade20k" / "_base.yaml").data.num_workers is None
