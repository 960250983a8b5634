"""Resume is exact: a run whose driver is interrupted (Ctrl-C) mid-epoch and continued with `knetlab train --resume
RUN` ends with the same weights, bit for bit, as the same run done in one go (model, optimizer, LR schedule, every
worker's RNG and the data order all continue from the checkpoint), in the same MLflow run, each step logged once with
the same values.

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

from knetlab.platform.config import load_config

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"

TINY = ["data.synthesize=false", "data.crop_size=64", "data.batch_size=2", "data.num_workers=0",
        "data.val_max_images=2", "storage.num_to_keep=10", "trainer.num_workers=2", "trainer.eval_interval=4",
        "trainer.checkpoint_interval=4", "trainer.log_interval=1", "schedule.warmup_iters=3",
        "schedule.milestones=[4]"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = tmp_path_factory.mktemp("resume") / "data"
    generate_synthetic_ade20k(root, num_train=12, num_val=2)
    return root


def steps_and_values(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from knetlab.platform.tracking import metric_history

    return sorted(metric_history(tracking_uri, run_id, key))


def straight_run(config_args: list[str], name: str) -> dict:
    """The same run in one go, in this process (its own local Ray, shut down after)."""
    import ray

    from knetlab.platform.trainer import run_training

    try:
        return run_training(load_config(SMOKE, [*config_args, f"tracking.run_name={name}"]))
    finally:
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_a_run_interrupted_and_resumed_ends_bit_identical_to_one_done_in_one_go(
        tmp_path: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = "interrupted"
    run_dir = tmp_path / "ckpt" / name
    tracking = tracking_db(tmp_path)
    # 12 images, 2 workers x batch 2: 3 iterations per epoch, so most checkpoints (every 5 iterations) are mid-epoch.
    args = [*TINY, f"data.root={data_root}", "trainer.max_iters=40", "trainer.checkpoint_interval=5",
            "trainer.eval_interval=20", f"storage.uri={tmp_path / 'ckpt'}", f"tracking.uri={tracking}"]
    env = {**os.environ, "KNETLAB_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)

    log = open(tmp_path / "first.log", "w")  # closed in the finally below
    first = subprocess.Popen([str(KNETLAB), "train", str(SMOKE), f"tracking.run_name={name}", *args], cwd=tmp_path,
                             env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        deadline = time.monotonic() + 240
        while not (snapshot.is_file() and "checkpoint_" in snapshot.read_text()):  # Ray has registered one
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.1)
        first.send_signal(signal.SIGINT)  # Ctrl-C on the driver
        first.wait(timeout=120)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, output[-3000:]
    assert f"--resume {name}" in output, output[-3000:]
    registered = [int(n) for n in re.findall(r"checkpoint_(\d{7})", snapshot.read_text())]
    assert registered and max(registered) < 40, snapshot.read_text()
    assert not (run_dir / "checkpoint_0000040").exists()

    second = subprocess.run([str(KNETLAB), "train", str(SMOKE), "--resume", name, *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"resumed from the checkpoint at iteration {max(registered)}" in second.stdout + second.stderr
    assert json.loads((run_dir / "checkpoint_0000040" / "meta.json").read_text())["iteration"] == 40

    from knetlab.platform.tracking import client

    mlflow = client(tracking)
    (experiment,) = [e for e in mlflow.search_experiments() if e.name == "knetlab-smoke"]
    (resumed,) = mlflow.search_runs([experiment.experiment_id])  # the resumed run did not open a second MLflow run
    assert [s for s, _ in steps_and_values(tracking, resumed.info.run_id, "train/loss")] == list(range(1, 41))
    assert [s for s, _ in steps_and_values(tracking, resumed.info.run_id, "val/mIoU")] == [20, 40]

    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))
    straight = straight_run([*args, "tracking.experiment=straight"], "straight")
    one_go = tmp_path / "ckpt" / "straight" / "checkpoint_0000040"
    two_legs = run_dir / "checkpoint_0000040"
    model_a = torch.load(one_go / "model.pt", weights_only=True)
    model_b = torch.load(two_legs / "model.pt", weights_only=True)
    restored = torch.load(run_dir / f"checkpoint_{max(registered):07d}" / "model.pt", weights_only=True)
    assert any(not torch.equal(restored[k], model_b[k]) for k in model_b), "the second leg did not train"
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), f"{key} differs after resume"
    state_a = torch.load(one_go / "train_state.pt", weights_only=True)
    state_b = torch.load(two_legs / "train_state.pt", weights_only=True)
    assert state_a["scheduler"]["last_epoch"] == state_b["scheduler"]["last_epoch"] == 40
    for a, b in zip(state_a["optimizer"]["state"].values(), state_b["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    for rank in (0, 1):  # each worker's RNG continued where it stopped
        rng_a = torch.load(one_go / f"rng_rank{rank}.pt", weights_only=True)
        rng_b = torch.load(two_legs / f"rng_rank{rank}.pt", weights_only=True)
        assert torch.equal(rng_a["torch"], rng_b["torch"]) and torch.equal(rng_a["numpy"]["keys"],
                                                                             rng_b["numpy"]["keys"])

    # the same losses and LRs at every step across the resume, and the LRs are the schedule's
    for key in ("train/loss", "train/loss_s3", "train/lr"):
        a = steps_and_values(tracking, straight["mlflow_run_id"], key)
        b = steps_and_values(tracking, resumed.info.run_id, key)
        assert a == b, key
    from knetlab.platform.optim import lr_factor

    cfg = load_config(SMOKE, args)
    for step, lr in steps_and_values(tracking, resumed.info.run_id, "train/lr"):
        # the LR used at iteration `step` is the schedule's value at step - 1
        expected = cfg.optim.lr * lr_factor(step - 1, cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio,
                                            cfg.schedule.milestones, cfg.schedule.gamma)
        assert lr == pytest.approx(expected, rel=1e-6), step
