"""Resume is exact: a run whose driver is interrupted (Ctrl-C) mid-epoch and continued with `knetlab train --resume
RUN` trains again, on every worker and bit for bit, what the interrupted leg had trained after the checkpoint (model,
optimizer, LR schedule, every worker's RNG and the data order all continue from it), and ends in the same MLflow run
with each step logged once.

Each worker appends its exact losses per iteration to a file of its own (KNETLAB_WORKER_PID_DIR, as in
test_train_det_e2e.py). The interrupted leg's workers are frozen (SIGSTOP) once they have trained at least two
iterations past their last checkpoint, into the next epoch, and before the next checkpoint; then the driver gets its
Ctrl-C. The iterations both legs trained cover the restored model and data position (the first loss), the optimizer
state and the LR schedule (every loss after a step) and the next epoch's shuffle, so one interrupted run proves the
resume exact without a second, uninterrupted run.

Real Ray (2 CPU workers), tiny K-Net, tiny synthetic data. Run under the shared lock:
`flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_train_resume.py`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tracking_db
from loss_traces import traces

from knetlab.platform.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"

TINY = ["data.synthesize=false", "data.crop_size=64", "data.batch_size=2", "data.num_workers=0",
        "data.val_max_images=2", "storage.num_to_keep=10", "trainer.num_workers=2", "trainer.eval_interval=4",
        "trainer.checkpoint_interval=4", "trainer.log_interval=1", "schedule.warmup_iters=3",
        "schedule.milestones=[4]"]
# 12 images, 2 workers x batch 2: 3 iterations per epoch, so most checkpoints (every 5 iterations) are mid-epoch.
ITERS_PER_EPOCH, CHECKPOINT_INTERVAL, MAX_ITERS = 3, 5, 40


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = tmp_path_factory.mktemp("resume") / "data"
    generate_synthetic_ade20k(root, num_train=12, num_val=2)
    return root


def steps_and_values(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from knetlab.platform.tracking import metric_history

    return sorted(metric_history(tracking_uri, run_id, key))


def starts_an_epoch(iteration: int) -> bool:
    return (iteration - 1) % ITERS_PER_EPOCH == 0


def far_enough_past(checkpoint: int) -> int:
    """The iteration the interrupted leg must have trained for the re-trained ones to hold two iterations after
    `checkpoint` and the first of an epoch."""
    next_epoch = next(i for i in range(checkpoint + 1, checkpoint + 1 + ITERS_PER_EPOCH) if starts_an_epoch(i))
    return max(checkpoint + 2, next_epoch)


def freeze_when_past_a_checkpoint(pid_dir: Path, snapshot: Path, first: subprocess.Popen,
                                  log: Path) -> tuple[int, list[int]]:
    """Wait until Ray has registered a mid-epoch checkpoint and both workers have trained far enough past it (and not
    up to the next one), then stop them (SIGSTOP) where they are; returns the checkpoint's iteration and their PIDs."""
    deadline = time.monotonic() + 240
    while True:
        assert first.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the workers never stopped between two checkpoints within 240 s"
        legs = [traces(pid_dir, rank) for rank in (0, 1)]
        if all(legs) and snapshot.is_file():
            trained = [max(leg[0]) for leg in legs]
            checkpoint = min(trained) // CHECKPOINT_INTERVAL * CHECKPOINT_INTERVAL
            # at most one more iteration is under way when the signal lands, never the next checkpoint's
            if (checkpoint % ITERS_PER_EPOCH and f"checkpoint_{checkpoint:07d}" in snapshot.read_text()
                    and min(trained) >= far_enough_past(checkpoint)
                    and max(trained) + 1 < checkpoint + CHECKPOINT_INTERVAL):
                pids = [int((pid_dir / f"rank{rank}.pid").read_text()) for rank in (0, 1)]
                for pid in pids:
                    os.kill(pid, signal.SIGSTOP)
                return checkpoint, pids
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_interrupted_and_resumed_trains_again_bit_identical_and_logs_each_step_once(
        tmp_path: Path, data_root: Path) -> None:
    name = "interrupted"
    run_dir = tmp_path / "ckpt" / name
    pid_dir = tmp_path / "pids"
    tracking = tracking_db(tmp_path)
    args = [*TINY, f"data.root={data_root}", f"trainer.max_iters={MAX_ITERS}",
            f"trainer.checkpoint_interval={CHECKPOINT_INTERVAL}", "trainer.eval_interval=20",
            f"storage.uri={tmp_path / 'ckpt'}", f"tracking.uri={tracking}"]
    env = {**os.environ, "KNETLAB_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1",
           "KNETLAB_WORKER_PID_DIR": str(pid_dir)}
    env.pop("RAY_ADDRESS", None)

    first_log = tmp_path / "first.log"
    log = open(first_log, "w")  # closed in the finally below
    first = subprocess.Popen([str(KNETLAB), "train", str(SMOKE), f"tracking.run_name={name}", *args], cwd=tmp_path,
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    frozen: list[int] = []
    try:
        checkpoint, frozen = freeze_when_past_a_checkpoint(pid_dir, snapshot, first, first_log)
        first.send_signal(signal.SIGINT)  # Ctrl-C on the driver
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        for pid in frozen:  # Ray has killed them with the run; never leave a stopped process behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()
    output = first_log.read_text()
    assert first.returncode == 130, output[-3000:]
    assert f"--resume {name}" in output, output[-3000:]
    registered = [int(n) for n in re.findall(r"checkpoint_(\d{7})", snapshot.read_text())]
    restart_at = max(registered)
    assert restart_at == checkpoint, registered  # mid-epoch, and no later one
    assert not (run_dir / f"checkpoint_{MAX_ITERS:07d}").exists()

    second = subprocess.run([str(KNETLAB), "train", str(SMOKE), "--resume", name, *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from the checkpoint at iteration {restart_at}" in second.stdout + second.stderr
    assert json.loads((run_dir / f"checkpoint_{MAX_ITERS:07d}" / "meta.json").read_text())["iteration"] == MAX_ITERS

    # -- bit-identical: each rank's resumed worker trained again exactly what the interrupted one had
    merged = []  # per rank: iteration -> losses over both legs
    for rank in (0, 1):
        legs = traces(pid_dir, rank)
        assert len(legs) == 2, f"rank {rank}: {len(legs)} worker processes, expected one per leg"
        before, after = legs
        assert min(before) == 1 and min(after) == restart_at + 1 and max(after) == MAX_ITERS
        again = sorted(set(before) & set(after))
        assert len(again) >= 2 and any(starts_an_epoch(i) for i in again), (restart_at, again)
        for iteration in again:
            assert before[iteration] == after[iteration], f"rank {rank}, iteration {iteration}: losses differ"
        merged.append({**before, **after})
    restored = torch.load(run_dir / f"checkpoint_{restart_at:07d}" / "model.pt", weights_only=True)
    final = torch.load(run_dir / f"checkpoint_{MAX_ITERS:07d}" / "model.pt", weights_only=True)
    assert any(not torch.equal(restored[k], final[k]) for k in final), "the second leg did not train"
    state = torch.load(run_dir / f"checkpoint_{MAX_ITERS:07d}" / "train_state.pt", weights_only=True)
    assert state["scheduler"]["last_epoch"] == MAX_ITERS

    # -- MLflow: the resumed run did not open a second run; every step once, the logged loss the workers' mean
    from knetlab.platform.tracking import client

    mlflow = client(tracking)
    (experiment,) = [e for e in mlflow.search_experiments() if e.name == "knetlab-smoke"]
    (resumed,) = mlflow.search_runs([experiment.experiment_id])
    run_id = resumed.info.run_id
    losses = steps_and_values(tracking, run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(1, MAX_ITERS + 1))
    assert [s for s, _ in steps_and_values(tracking, run_id, "val/mIoU")] == [20, 40]
    for step, value in losses:
        assert value == (merged[0][step]["loss"] + merged[1][step]["loss"]) / 2, step
    # the LR used at iteration `step` is the schedule's value at step - 1, across the resume
    from knetlab.platform.optim import lr_factor

    cfg = load_config(SMOKE, args)
    lrs = steps_and_values(tracking, run_id, "train/lr")
    assert [s for s, _ in lrs] == list(range(1, MAX_ITERS + 1))
    for step, lr in lrs:
        expected = cfg.optim.lr * lr_factor(step - 1, cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio,
                                            cfg.schedule.milestones, cfg.schedule.gamma)
        assert lr == pytest.approx(expected, rel=1e-6), step
