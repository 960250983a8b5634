"""`ray job submit --working-dir . -- knetlab train ...` against a real local Ray head (`ray start --head` on
loopback): the job trains the smoke experiment from the uploaded copy of the repository, and the upload leaves out
the virtual environment, data and run folders (Ray honours .gitignore)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from conftest import REPO_ROOT, free_port, processes_naming, stop_processes, tracking_db, wait_for_http
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = [pytest.mark.slow, pytest.mark.ray]

BIN = Path(sys.executable).parent
RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "OMP_NUM_THREADS": "1",
}
# Ignored by git, hence by Ray's upload; none may reach the cluster.
NOT_UPLOADED = (".venv", "runs", "data", ".pytest_cache", ".ruff_cache")


@dataclass
class RayHead:
    dashboard_url: str
    temp_dir: Path
    env: dict[str, str]


def _stop_tree(process: subprocess.Popen, temp_dir: Path) -> None:
    """Stop the `ray start --block` process and everything it started, and nothing else (never `ray stop`)."""
    try:
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    # Ray processes of this head that may have been re-parented: their command lines name its temp dir.
    tree += [proc for proc in processes_naming([temp_dir]) if proc.pid not in {p.pid for p in tree}]
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # `ray start --block` shuts its processes down on SIGTERM
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    stop_processes(tree, timeout=5)  # a test cluster: no state worth a longer graceful shutdown


@pytest.fixture
def ray_head() -> Iterator[RayHead]:
    # Short temp dir: Ray's unix socket paths under it must stay below 108 bytes.
    temp_dir = Path(tempfile.mkdtemp(prefix="kray", dir="/tmp"))
    env = {**os.environ, **RAY_ENV, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard_port = free_port()
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(free_port()),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--num-cpus", "4",
        "--object-store-memory", str(200 * 1024 * 1024),
        "--temp-dir", str(temp_dir),
        "--disable-usage-stats",
    ]  # fmt: skip
    log_path = temp_dir / "ray-start.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard_port}"
        wait_for_http(f"{url}/api/version", timeout=120, process=process)
        yield RayHead(dashboard_url=url, temp_dir=temp_dir, env=env)
    except Exception:
        print(log_path.read_text(errors="replace")[-5000:])
        raise
    finally:
        _stop_tree(process, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _uploaded_working_dirs(temp_dir: Path) -> list[Path]:
    return sorted(p for p in temp_dir.glob("session_latest/runtime_resources/working_dir_files/_ray_pkg_*")
                  if p.is_dir())


def test_ray_job_submit_trains_the_smoke_experiment(ray_head: RayHead, tmp_path: Path):
    out = tmp_path / "out"
    overrides = [
        f"data.root={out / 'data'}",
        f"storage.uri={out / 'checkpoints'}",
        f"tracking.uri={tracking_db(out)}",
        "tracking.experiment=job-submit-test",
        "trainer.num_workers=2",
        "trainer.max_iters=4",
        "trainer.eval_interval=2",
        "trainer.checkpoint_interval=2",
        "trainer.log_interval=1",
        "schedule.warmup_iters=2",
        "schedule.milestones=[]",
        "data.val_max_images=2",
        "data.num_workers=0",
    ]
    # The first command reports what was uploaded (before the job writes anything) and proves that the job imports
    # the uploaded copy of knetlab, not the local checkout; KNETLAB_RUNS_DIR keeps MLflow's local artifacts out of
    # the job's temporary working dir.
    report = ("import json, os, knetlab; files = [os.path.join(d, f) for d, _, fs in os.walk('.') for f in fs]; "
              "print('UPLOADED ' + json.dumps({'knetlab': knetlab.__file__, 'cwd': os.getcwd(), "
              "'top': sorted(os.listdir('.')), 'bytes': sum(os.path.getsize(f) for f in files)}))")
    entrypoint = ["sh", "-c", f'python -c "{report}" && KNETLAB_RUNS_DIR={out / "runs"} '
                              f"knetlab train experiments/smoke.yaml {' '.join(overrides)}"]
    submission_id = f"knetlab-test-{os.getpid()}-{int(time.time())}"
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head.dashboard_url, "--working-dir", ".",
         "--submission-id", submission_id, "--", *entrypoint],
        cwd=REPO_ROOT, env=ray_head.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    output = submit.stdout + submit.stderr
    status = JobSubmissionClient(ray_head.dashboard_url).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, output[-6000:]
    assert submit.returncode == 0, output[-6000:]

    # The job ran the uploaded copy, which holds the code and experiments but not the environment, data or outputs.
    reports = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("UPLOADED ")]
    assert len(reports) == 1, output[-6000:]
    uploaded = reports[0]
    working_dirs = _uploaded_working_dirs(ray_head.temp_dir)
    assert len(working_dirs) == 1, working_dirs
    package = working_dirs[0].resolve()
    assert Path(uploaded["cwd"]).resolve() == package
    assert Path(uploaded["knetlab"]).resolve().is_relative_to(package), (uploaded, package)
    for needed in ("pyproject.toml", "knetlab/platform/cli.py", "experiments/smoke.yaml"):
        assert (package / needed).is_file(), needed
    for left_out in NOT_UPLOADED:
        assert left_out not in uploaded["top"], f"{left_out} was uploaded with the working dir: {uploaded['top']}"
    assert uploaded["bytes"] < 20 * 1024**2, f"uploaded working dir is {uploaded['bytes'] / 1024**2:.1f} MiB"
    # With every output path pointed outside, the job wrote nothing into its (temporary) working dir.
    assert sorted(os.listdir(package)) == uploaded["top"]

    # The training really happened: a checkpoint in storage and one MLflow run with the last iteration's metrics.
    assert any((out / "checkpoints").rglob("checkpoint_*")), list((out / "checkpoints").rglob("*"))[:20]
    with sqlite3.connect(out / "mlflow.db") as db:
        runs = db.execute("SELECT run_uuid FROM runs").fetchall()
        last_steps = dict(db.execute("SELECT key, MAX(step) FROM metrics GROUP BY key").fetchall())
    assert len(runs) == 1, runs
    assert last_steps.get("val/mIoU") == 4 and last_steps.get("train/loss") == 4, last_steps
