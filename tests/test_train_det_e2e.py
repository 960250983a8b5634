"""End-to-end acceptance of panoptic and instance training (issue 13): `tiny-panoptic` and `tiny-instance` trained by
the one training loop with 2 Ray workers on synthetic COCO data, checkpoints in a moto S3 server, a real `mlflow
server`; a worker killed after the first checkpoint, the restarted workers' losses bit-identical to those the killed
group computed for the same iterations, every metric step logged once, PQ/SQ/RQ (or mask AP) at every evaluation.

Each worker appends its exact losses per iteration to a file of its own (KNETLAB_WORKER_PID_DIR): the group killed
after iteration CHECKPOINT + 1 and the group restarted from the checkpoint both train that iteration, so one run
proves the resume exact without a second, uninterrupted run. MLflow keeps one value per step (the first), so the
files are where the re-run values are seen.

Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_train_det_e2e.py`.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FAKE_AWS_ENV, TEST_BUCKET, MlflowServer, S3Server, free_port
from loss_traces import traces

from knetlab.platform.config import load_config
from knetlab.platform.detection_task import INSTANCE_METRICS, PANOPTIC_METRICS

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke-panoptic.yaml"
CHECKPOINT_FILES = {"model.pt", "train_state.pt", "meta.json", "config.yaml", "rng_rank0.pt", "rng_rank1.pt"}
# 12 training images, 2 workers x 2 images: 3 iterations per epoch, so the checkpoint at 4 is mid-epoch. The kill
# comes once both workers have trained iteration 5; the next checkpoint (8) is 3 iterations and an evaluation away.
CHECKPOINT, KILL_AFTER, MAX_ITERS = 4, 5, 8


@dataclass
class Setup:
    s3: S3Server
    data: dict[str, Path]  # task -> COCO root
    pid_dir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    import ray
    from moto.server import ThreadedMotoServer

    from knetlab.data.synthetic_coco import generate_synthetic_coco
    from knetlab.platform.trainer import init_ray

    root = tmp_path_factory.mktemp("det-e2e")
    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    s3 = S3Server(endpoint_url=f"http://127.0.0.1:{port}", bucket=TEST_BUCKET, port=port, _server=moto)
    env = {**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": s3.endpoint_url, "KNETLAB_WORKER_PID_DIR": str(root / "pids"),
           "KNETLAB_RUNS_DIR": str(root / "runs")}
    s3.client().create_bucket(Bucket=TEST_BUCKET)
    data = {task: generate_synthetic_coco(root / task, task=task, num_train=12, num_val=2, max_side=96)
            for task in ("panoptic", "instance")}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)  # before ray.init: the workers inherit it
        try:
            init_ray()
            yield Setup(s3=s3, data=data, pid_dir=root / "pids")
        finally:
            ray.shutdown()
            moto.stop()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_killed_worker_resumes_bit_identical_and_logs_every_step_once(
        task: str, setup: Setup, mlflow_server: MlflowServer) -> None:
    from knetlab.platform.tracking import metric_history
    from knetlab.platform.trainer import run_training

    name = f"{task}-kill"
    for old in setup.pid_dir.glob("*"):
        old.unlink()
    cfg = load_config(SMOKE, [
        f"model.name=tiny-{task}", f"data.root={setup.data[task]}", "data.synthesize=false", "data.scale=[128,96]",
        "eval.test_scale=[128,96]", f"trainer.max_iters={MAX_ITERS}", f"trainer.eval_interval={CHECKPOINT}",
        f"trainer.checkpoint_interval={CHECKPOINT}", "trainer.log_interval=1", "trainer.max_failures=1",
        "trainer.bench_images=1", "schedule.warmup_iters=2", "schedule.milestones=[6]",
        f"storage.uri=s3://{TEST_BUCKET}/ckpt", f"tracking.uri={mlflow_server.uri}", f"tracking.run_name={name}",
        f"tracking.experiment=det-e2e-{task}", f"tracking.tags.dataset=synthetic-coco-{task}",
    ])
    killed: dict[str, int] = {}

    def kill_rank1_after_the_checkpoint() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            trained = [max((max(t) for t in traces(setup.pid_dir, rank)), default=0) for rank in (0, 1)]
            if min(trained) >= KILL_AFTER:
                killed["pid"] = int((setup.pid_dir / "rank1.pid").read_text())
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_rank1_after_the_checkpoint, daemon=True)
    killer.start()
    summary = run_training(cfg)
    killer.join(timeout=5)
    assert "pid" in killed, "rank 1 was never killed"

    # -- bit-identical losses: the restarted workers re-ran iterations CHECKPOINT+1.. as the killed group had
    merged = []
    for rank in (0, 1):
        legs = traces(setup.pid_dir, rank)
        assert len(legs) == 2, f"rank {rank}: {len(legs)} worker processes, expected the killed one and its successor"
        before, after = legs
        assert min(before) == 1 and min(after) == CHECKPOINT + 1, (sorted(before), sorted(after))
        assert max(after) == MAX_ITERS
        rerun = sorted(set(before) & set(after))
        assert KILL_AFTER in rerun, rerun
        for iteration in rerun:
            assert before[iteration] == after[iteration], f"rank {rank}, iteration {iteration}: losses differ"
        merged.append({**before, **after})

    # -- MLflow: each step once, the logged losses are the workers' mean, the metric names of the issue
    uri, run_id = mlflow_server.uri, summary["mlflow_run_id"]
    run = mlflow_server.client().get_run(run_id)
    history = {key: metric_history(uri, run_id, key) for key in run.data.metrics}
    for key, points in history.items():
        steps = [step for step, _ in points]
        assert len(steps) == len(set(steps)), f"{key}: a step logged twice: {sorted(steps)}"
    parts = {"rpn_mask", "rpn_dice", "rpn_seg", *(f"s{i}_{p}" for i in range(3) for p in ("cls", "mask", "dice"))}
    if task == "panoptic":
        parts |= {"rpn_rank", "s0_rank", "s1_rank", "s2_rank"}
    assert {k for k in history if k.startswith("train/loss")} == {"train/loss", *(f"train/loss_{p}" for p in parts)}
    for key in merged[0][1]:
        logged = dict(history[f"train/{key}"])
        assert sorted(logged) == list(range(1, MAX_ITERS + 1)), key
        for step, value in logged.items():
            assert value == (merged[0][step][key] + merged[1][step][key]) / 2, (key, step)
    names = PANOPTIC_METRICS if task == "panoptic" else INSTANCE_METRICS
    for metric in names:
        assert [step for step, _ in history[f"val/{metric}"]] == [CHECKPOINT, MAX_ITERS], metric
    assert [step for step, _ in history["bench/fps"]] == [MAX_ITERS]
    assert [step for step, _ in history["bench/mem_gb"]] == [MAX_ITERS]
    artifacts = {f"{task}_overlay_0.png", *(["per_category_pq.csv"] if task == "panoptic" else [])}
    for iteration in (CHECKPOINT, MAX_ITERS):
        folder = f"eval/iter_{iteration:07d}"
        files = {Path(a.path).name for a in mlflow_server.client().list_artifacts(run_id, folder)}
        assert artifacts <= files, (folder, files)

    # -- checkpoints in S3
    keys = setup.s3.list_keys(f"ckpt/{name}/")
    for iteration in (CHECKPOINT, MAX_ITERS):
        files = {key.rsplit("/", 1)[1] for key in keys if f"/checkpoint_{iteration:07d}/" in key}
        assert CHECKPOINT_FILES <= files, (iteration, files)
    assert summary["metrics"]["iteration"] == MAX_ITERS
    assert summary["checkpoint"].endswith(f"{TEST_BUCKET}/ckpt/{name}/checkpoint_{MAX_ITERS:07d}")
