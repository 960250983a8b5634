"""Acceptance of `knetlab sweep` (issue 5) on a real local Ray cluster and a real `mlflow server`: a 2 x 2 sweep
interrupted and resumed, its MLflow parent/children, `knetlab compare` against MLflow, ASHA stopping a trial with an
absurd learning rate, and the refusal of a sweep too big for the cluster.

Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_sweep_e2e.py`.
"""

from __future__ import annotations

import csv
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from mlflow_dashboard import assert_dashboard_ready

from knetlab.platform.trainer import LOCAL_RAY_ENV

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"

TINY = {"trainer.num_workers": 1, "trainer.cpus_per_worker": 1, "trainer.max_iters": 20,
        "trainer.eval_interval": 10, "trainer.checkpoint_interval": 10, "trainer.log_interval": 5,
        "schedule.warmup_iters": 5, "schedule.milestones": [15], "data.synthesize": False,
        "data.val_max_images": 4, "storage.num_to_keep": 5, "trainer.bench_images": 2}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = tmp_path_factory.mktemp("sweep") / "data"
    generate_synthetic_ade20k(root, num_train=16, num_val=4)
    return root


def write_sweep(path: Path, data_root: Path, experiment: str, **data) -> Path:
    content = {"name": "e2e", "experiment": str(SMOKE),
               "overrides": {**TINY, "data.root": str(data_root), "tracking.experiment": experiment},
               **data}
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


def environment(tmp_path: Path, tracking_uri: str) -> dict[str, str]:
    """A user's environment: no Ray settings of the test session's (knetlab sets its local cluster's own)."""
    env = {**os.environ, "KNETLAB_RUNS_DIR": str(tmp_path / "runs"), "PYTHONUNBUFFERED": "1",
           "MLFLOW_TRACKING_URI": tracking_uri}
    for key in ("RAY_ADDRESS", *LOCAL_RAY_ENV):
        env.pop(key, None)
    return env


def sweep_runs(client, experiment: str) -> tuple[list, list]:
    (found,) = [e for e in client.search_experiments() if e.name == experiment]
    runs = client.search_runs([found.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("knetlab.kind") == "sweep"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
@pytest.mark.ray
def test_sweep_interrupted_resumed_and_compared(tmp_path: Path, data_root: Path, mlflow_server) -> None:
    experiment = f"sweep-e2e-{uuid.uuid4().hex[:8]}"
    sweep_file = write_sweep(
        tmp_path / "sweep.yaml", data_root, experiment,
        rows=[{"model.name": "tiny-fcn"}, {"model.name": "tiny-psp", "data.crop_size": 96}],
        repeats=2, scheduler={"type": "fifo"})
    storage = tmp_path / "ckpt"
    args = [f"storage.uri={storage}", "eval.final_ms_flip=true"]  # as the shipped sweeps: the ms+flip column
    env = environment(tmp_path, mlflow_server.uri)
    client = mlflow_server.client()

    log = open(tmp_path / "first.log", "w")  # closed in the finally below
    started = time.monotonic()
    first = subprocess.Popen([str(KNETLAB), "sweep", str(sweep_file), *args], cwd=tmp_path, env=env, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Interrupt once a trial has finished and another is part-way through its training.
        deadline = time.monotonic() + 420
        while True:
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no finished and running trial within 420 s"
            if any(e.name == experiment for e in client.search_experiments()):
                _, children = sweep_runs(client, experiment)
                finished = [c for c in children if c.info.status == "FINISHED"]
                training = [c for c in children if c.info.status == "RUNNING" and "train/loss" in c.data.metrics]
                if finished and training:
                    break
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)  # Ctrl-C on the sweep driver
        first.wait(timeout=180)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        log.close()
    output = (tmp_path / "first.log").read_text()
    assert first.returncode == 130, output[-4000:]
    assert "--resume e2e-" in output, output[-4000:]
    (parent,), children = sweep_runs(client, experiment)
    assert parent.info.status == "KILLED"
    done_before = {c.data.tags["knetlab.trial_id"]: c.info.run_id for c in children if c.info.status == "FINISHED"}
    assert 1 <= len(done_before) < 4
    # The trial that was training is cut short, not "stopped by the scheduler" (FIFO stops none), even when every
    # trial had started: Tune marks the trials it stops on Ctrl-C TERMINATED like finished ones (trial_outcomes.py).
    (cut,) = [c for c in children if c.info.run_id == training[0].info.run_id]
    cut_status = cut.data.tags.get("knetlab.trial_status", "")
    assert cut.info.status == "FINISHED" or (cut.info.status == "KILLED" and cut_status.startswith("INTERRUPTED at")), \
        (cut.info.status, cut_status)
    assert not any(c.data.tags.get("knetlab.trial_status", "").startswith("STOPPED") for c in children)
    before = {run_id: history(client, run_id, "train/loss") for run_id in done_before.values()}

    second = subprocess.run([str(KNETLAB), "sweep", str(sweep_file), "--resume", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    wall_time = time.monotonic() - started
    resumed_output = second.stdout + second.stderr
    assert second.returncode == 0, resumed_output[-4000:]
    assert "resuming sweep e2e-" in resumed_output

    (parent,), children = sweep_runs(client, experiment)
    assert parent.info.status == "FINISHED"
    assert len(children) == 4, [c.info.run_name for c in children]  # resumed trials continued their child runs
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert len({c.data.tags["knetlab.trial_id"] for c in children}) == 4
    for child in children:
        assert child.info.status == "FINISHED", (child.info.run_name, child.info.status)
        assert child.data.tags["knetlab.trial_status"] == "FINISHED"
        assert [s for s, _, _ in history(client, child.info.run_id, "train/loss")] == [5, 10, 15, 20]
        assert [s for s, _, _ in history(client, child.info.run_id, "val/mIoU")] == [10, 20]
        assert child.data.params["trainer.max_iters"] == "20"
    for trial_id, run_id in done_before.items():  # finished trials were not run again
        assert f"trial {trial_id}:" not in resumed_output
        assert history(client, run_id, "train/loss") == before[run_id]
    assert {(c.data.tags["head"], c.data.tags["crop"], c.data.params["trainer.seed"]) for c in children} == {
        (head, crop, seed) for head, crop in (("fcn", "64"), ("psp", "96")) for seed in ("0", "1")}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/sweep_summary.csv", "sweep/sweep_summary.md", "sweep/sweep.yaml"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} == {
        "comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}
    assert parent.data.params["sweep.repeats"] == "2" and parent.data.tags["knetlab.sweep_id"].startswith("e2e-")

    # knetlab compare: the seed's table with mean ± std over the 2 repeats, equal to what MLflow holds
    out = tmp_path / "compare"
    compared = subprocess.run([str(KNETLAB), "compare", "--experiment", experiment, "--parent", parent.info.run_id,
                               "--out", str(out), "--sort", "mIoU"], env=env, capture_output=True, text=True,
                              timeout=120)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert "| Method | Backbone | Crop Size | Lr schd | Mem (GB) | Inf time (fps) | mIoU | mIoU(ms+flip) | runs |" \
        in compared.stdout
    assert {p.name for p in out.iterdir()} == {"comparison.csv", "comparison.md", "comparison.png"}
    with (out / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 2
    expected: dict[tuple, dict[str, list[float]]] = {}
    for child in children:
        key = ("KNet + FCN" if child.data.tags["head"] == "fcn" else "KNet + PSPNet", child.data.tags["crop"])
        assert {"val/mIoU", "bench/fps", "val/mIoU_msflip"} <= set(child.data.metrics), child.data.metrics
        for column, metric in (("mIoU", "val/mIoU"), ("Mem (GB)", "bench/mem_gb"), ("Inf time (fps)", "bench/fps"),
                               ("mIoU(ms+flip)", "val/mIoU_msflip")):
            if metric in child.data.metrics:  # no memory figure from a trial restored at its end (nothing trained)
                expected.setdefault(key, {}).setdefault(column, []).append(child.data.metrics[metric])
    for row in table:
        for column, values in expected[(row["Method"], row["Crop Size"].split("x")[0])].items():
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            assert row[column] == f"{statistics.fmean(values):.2f} ± {std:.2f}", column
        assert row["runs"] == "2" and row["Lr schd"] == "20" and row["mIoU(ms+flip)"] != "-"
    means = [float(row["mIoU"].split(" ± ")[0]) for row in table]
    assert means == sorted(means, reverse=True)  # --sort mIoU: best first
    summary = [line for line in resumed_output.splitlines() if "trial runs" in line]
    print(f"sweep wall time (interrupted + resumed): {wall_time:.0f} s; {summary}")


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_a_trial_with_an_absurd_learning_rate(tmp_path: Path, data_root: Path, mlflow_server) -> None:
    experiment = f"sweep-asha-{uuid.uuid4().hex[:8]}"
    # One trial at a time, so the rung at 10 iterations holds the good trial's result when the absurd one reaches it.
    sweep_file = write_sweep(
        tmp_path / "sweep.yaml", data_root, experiment,
        overrides={**TINY, "data.root": str(data_root), "tracking.experiment": experiment,
                   "trainer.eval_interval": 10, "trainer.max_iters": 20},
        rows=[{"trainer.seed": 0}, {"optim.lr": 1.0e-12}],
        scheduler={"type": "asha", "grace_period": 10, "reduction_factor": 2},
        limits={"max_concurrent_trials": 1})
    env = environment(tmp_path, mlflow_server.uri)
    result = subprocess.run([str(KNETLAB), "sweep", str(sweep_file), f"storage.uri={tmp_path / 'ckpt'}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    client = mlflow_server.client()
    (parent,), children = sweep_runs(client, experiment)
    by_lr = {float(c.data.params["optim.lr"]): c for c in children}
    absurd = by_lr.pop(1.0e-12)
    assert absurd.data.tags["knetlab.trial_status"] == "STOPPED at 10", absurd.data.tags
    assert absurd.info.status == "KILLED"
    assert [s for s, _, _ in history(client, absurd.info.run_id, "val/mIoU")] == [10]
    for child in by_lr.values():
        assert child.data.tags["knetlab.trial_status"] == "FINISHED"
        assert [s for s, _, _ in history(client, child.info.run_id, "val/mIoU")] == [10, 20]
        assert child.data.metrics["val/mIoU"] > absurd.data.metrics["val/mIoU"]
    assert parent.info.status == "FINISHED"
    assert_dashboard_ready(mlflow_server.uri, experiment)
    print("val/mIoU at 10 iterations: absurd lr", absurd.data.metrics["val/mIoU"], "others",
          [history(client, c.info.run_id, "val/mIoU")[0][1] for c in by_lr.values()])


@pytest.mark.ray
def test_a_sweep_too_big_for_the_cluster_is_refused(tmp_path: Path, data_root: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep_file = write_sweep(tmp_path / "sweep.yaml", data_root, "sweep-too-big")
    result = subprocess.run([str(KNETLAB), "sweep", str(sweep_file), "trainer.num_workers=64",
                             f"storage.uri={tmp_path / 'ckpt'}", f"tracking.uri={tracking}"],
                            cwd=tmp_path, env=environment(tmp_path, tracking), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("knetlab: error: ") and "a trial needs 64 CPU (64 workers x 1 CPU" in last, last
    assert "the Ray cluster has" in last and "lower trainer.num_workers" in last
    # refused before anything started: no Tune experiment, no MLflow run (the tracking store was never opened)
    assert not list((tmp_path / "ckpt").glob("e2e-*"))
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
@pytest.mark.ray
def test_panoptic_sweep_fills_every_column_of_the_panoptic_table(tmp_path: Path, mlflow_server) -> None:
    from knetlab.data.synthetic_coco import generate_synthetic_coco

    experiment = f"sweep-panoptic-{uuid.uuid4().hex[:8]}"
    data = generate_synthetic_coco(tmp_path / "data", task="panoptic", num_train=8, num_val=2)
    # experiments/sweeps/smoke-panoptic.yaml (2 learning rates x 2 seeds, 1 worker per trial), made short
    short = ["trainer.max_iters=10", "trainer.eval_interval=10", "trainer.checkpoint_interval=10",
             "trainer.log_interval=5", "schedule.warmup_iters=2", "schedule.milestones=[]", "data.val_max_images=2",
             "trainer.bench_images=1", f"data.root={data}", "data.synthesize=false", f"storage.uri={tmp_path / 'ckpt'}",
             f"tracking.experiment={experiment}"]
    env = environment(tmp_path, mlflow_server.uri)
    result = subprocess.run([str(KNETLAB), "sweep", str(REPO / "experiments" / "sweeps" / "smoke-panoptic.yaml"),
                             *short], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (parent,), children = sweep_runs(mlflow_server.client(), experiment)
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {(c.data.params["optim.lr"], c.data.params["trainer.seed"]) for c in children} == {
        (lr, seed) for lr in ("0.001", "0.0005") for seed in ("0", "1")}
    assert all(c.info.status == "FINISHED" and c.data.tags["task"] == "panoptic" for c in children)
    assert parent.data.params["sweep.scheduler.metric"] == "val/PQ"  # the panoptic rows' own, reported to Tune

    env.pop("MLFLOW_TRACKING_URI")  # compare reaches the server through --tracking-uri
    compared = subprocess.run([str(KNETLAB), "compare", "--experiment", experiment, "--tracking-uri",
                               mlflow_server.uri, "--out", str(tmp_path / "compare")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert ("| Backbone | Method | Lr Schd | Mem (GB) | Inf time (fps) | PQ | SQ | RQ | PQ_th | PQ_st | runs |"
            in compared.stdout)
    with (tmp_path / "compare" / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert sorted(row["Method"] for row in table) == ["K-Net (optim.lr=0.0005)", "K-Net (optim.lr=0.001)"]
    for row in table:
        assert row["runs"] == "2" and row["Lr Schd"] == "1x (10 it)", row
        assert all(" ± " in row[column] for column in ("Mem (GB)", "Inf time (fps)", "PQ", "SQ", "RQ", "PQ_th",
                                                       "PQ_st")), row
    print(compared.stdout)
