"""Acceptance: a secret written into the config never appears in anything a run leaves behind.

- `s3://KEY:SECRET@bucket` in `storage.uri`, `data.root` or `model.pretrained` is refused in one line that says
  where credentials belong, repeating neither the key id nor the secret (exit code 2, nothing started).
- `tracking.uri=http://user:SECRET@127.0.0.1:PORT` of a real `mlflow server` (which ignores the basic auth) is used
  for a short `knetlab train experiments/smoke.yaml`: the secret must not be in its stdout/stderr, in the MLflow run
  (params, tags, metric names, every artifact; read through the REST API), in the server's own store, in the
  checkpoints, in the MLflow spool, in the temp files of the run, or in the logs of the Ray session it started.

Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_secrets.py`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO_ROOT, MlflowServer

KNETLAB = Path(sys.executable).parent / "knetlab"
SMOKE = str(REPO_ROOT / "experiments" / "smoke.yaml")
KEY_ID = "AKIAIOSFODNN7EXAMPLE"


@pytest.fixture
def secret() -> str:
    return f"S3cr3t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir for TMPDIR and Ray's session (its unix socket paths must stay below 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ksec", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def knetlab(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for key in ("KNETLAB_DEBUG", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        environment.pop(key, None)
    return subprocess.run([str(KNETLAB), *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def files_holding(root: Path, secret: str) -> list[str]:
    """Every file under `root` whose bytes hold `secret` (text and binary: checkpoints, sqlite, logs)."""
    needle = secret.encode()
    return [str(path) for path in sorted(root.rglob("*"))
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes()]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["storage.uri", "data.root", "model.pretrained"])
def test_credentials_in_an_s3_uri_are_refused_without_echo(key: str, secret: str, tmp_path: Path) -> None:
    result = knetlab("train", SMOKE, f"{key}=s3://{KEY_ID}:{secret}@bucket/x", cwd=tmp_path,
                     env={"KNETLAB_RUNS_DIR": str(tmp_path / "runs")})
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert secret not in output and KEY_ID not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knetlab: error: "), result.stderr
    assert f"{key}: credentials in the URI are refused" in lines[0] and "IAM role" in lines[0], lines[0]
    assert not (tmp_path / "runs").exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.ray
def test_a_tracking_uri_password_appears_nowhere(mlflow_server: MlflowServer, secret: str, tmp_path: Path,
                                                 short_tmp: Path) -> None:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    data = generate_synthetic_ade20k(tmp_path / "data", num_train=4, num_val=1, min_side=64, max_side=96).parent
    port = urllib.parse.urlsplit(mlflow_server.uri).port
    tracking_uri = f"http://knetlab:{secret}@127.0.0.1:{port}"
    experiment = f"secrets-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    result = knetlab(
        "train", SMOKE, f"data.root={data}", "data.synthesize=false", f"storage.uri={work / 'ckpt'}",
        f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}", "tracking.run_name=secret-run",
        "trainer.num_workers=1", "trainer.max_iters=4", "trainer.eval_interval=2", "trainer.checkpoint_interval=2",
        "trainer.log_interval=2", "trainer.bench_images=1", "schedule.warmup_iters=1", "schedule.milestones=[]",
        "data.val_max_images=1", cwd=work, timeout=600,
        env={"KNETLAB_RUNS_DIR": str(work / "runs"), "TMPDIR": str(short_tmp), "RAY_TMPDIR": str(short_tmp)})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "finished secret-run" in result.stdout, output[-3000:]

    # what the user saw
    assert secret not in output, [line for line in output.splitlines() if secret in line]

    # the MLflow run, read through the REST API: the run (params, tags, metric names) and every artifact
    def rest(endpoint: str, **query: str) -> bytes:
        url = f"{mlflow_server.uri}{endpoint}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read()

    found = json.loads(rest("/api/2.0/mlflow/experiments/get-by-name", experiment_name=experiment))
    runs = json.loads(urllib.request.urlopen(urllib.request.Request(
        f"{mlflow_server.uri}/api/2.0/mlflow/runs/search", method="POST",
        data=json.dumps({"experiment_ids": [found["experiment"]["experiment_id"]]}).encode(),
        headers={"Content-Type": "application/json"}), timeout=30).read())["runs"]
    assert len(runs) == 1
    run_id = runs[0]["info"]["run_id"]
    run_json = rest("/api/2.0/mlflow/runs/get", run_id=run_id)
    params = {p["key"]: p["value"] for p in json.loads(run_json)["run"]["data"]["params"]}
    assert params["tracking.uri"] == f"http://***@127.0.0.1:{port}", params["tracking.uri"]
    assert secret.encode() not in run_json
    artifacts, folders = [], [""]
    while folders:
        listing = json.loads(rest("/api/2.0/mlflow/artifacts/list", run_id=run_id, path=folders.pop()))
        for entry in listing.get("files", []):
            (folders if entry["is_dir"] else artifacts).append(entry["path"])
    assert any(path.startswith("config/") for path in artifacts), artifacts
    assert any(path.startswith("eval/") for path in artifacts), artifacts
    leaking = [path for path in artifacts if secret.encode() in rest("/get-artifact", path=path, run_uuid=run_id)]
    assert leaking == []

    # everything on disk: the server's store, the checkpoints and spool, the run's temp files and Ray session logs
    checkpoints = sorted(path for path in (work / "ckpt").rglob("checkpoint_*") if path.is_dir())
    assert checkpoints and all((c / "config.yaml").is_file() for c in checkpoints), checkpoints
    assert any(path.name.endswith(".log") or path.name.endswith(".out") for path in short_tmp.rglob("*")), \
        "no Ray session logs to search"
    assert files_holding(mlflow_server.root, secret) == []
    assert files_holding(work, secret) == []
    assert files_holding(short_tmp, secret) == []
