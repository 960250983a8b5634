"""The exit codes of `knetlab` are a contract (knetlab/platform/cli.py, README): 0 success, 1 runtime failure
(storage, tracking, training), 2 bad input (config, data, model/weights, arguments), 130 interrupted. Each is pinned
here through the console script, as a user or a scheduler sees it; none of these starts Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAKE_AWS_ENV, REPO_ROOT, TEST_BUCKET, free_port, tracking_db

KNETLAB = Path(sys.executable).parent / "knetlab"
SMOKE = str(REPO_ROOT / "experiments" / "smoke.yaml")


def knetlab(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "KNETLAB_RUNS_DIR": str(cwd / "runs"), **(env or {})}
    for key in ("KNETLAB_DEBUG", "RAY_ADDRESS"):
        environment.pop(key, None)
    return subprocess.run([str(KNETLAB), *args], cwd=cwd, env=environment, capture_output=True, text=True,
                          timeout=300)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one `knetlab: error:` line, last on stderr (MLflow may log before it), of a run that exited with `code`."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("knetlab: error: ")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    return errors[0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    return generate_synthetic_ade20k(tmp_path_factory.mktemp("data"), num_train=2, num_val=1, min_side=48,
                                     max_side=64).parent


def test_0_success(tmp_path: Path) -> None:
    """(Every successful command of the other CLI tests pins 0 too; this one costs no torch import.)"""
    result = knetlab("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("knetlab "), result


def test_2_bad_config_arguments_and_data(tmp_path: Path) -> None:
    """(Bad model and weights files exit 2 too: tests/test_cli.py, `knetlab convert`.)"""
    assert "unknown key optim.lr_rate" in error_line(knetlab("config", SMOKE, "optim.lr_rate=1", cwd=tmp_path), 2)
    assert "invalid choice" in error_line(knetlab("bogus", cwd=tmp_path), 2)
    line = error_line(knetlab("train", SMOKE, "data.root=/nonexistent/ade", "data.synthesize=false", cwd=tmp_path), 2)
    assert "/nonexistent/ade: dataset root does not exist" in line


def test_1_storage_failure(tmp_path: Path, dataset: Path) -> None:
    """Storage that cannot be reached is a runtime failure, not bad input (StorageError was once a ConfigError)."""
    closed = free_port()
    line = error_line(knetlab("train", SMOKE, f"data.root={dataset}", "data.synthesize=false",
                              f"storage.uri=s3://{TEST_BUCKET}/x", cwd=tmp_path,
                              env={**FAKE_AWS_ENV, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}"}), 1)
    assert f"storage.uri=s3://{TEST_BUCKET}/x" in line and "not reachable" in line


def test_1_tracking_failure(tmp_path: Path) -> None:
    line = error_line(knetlab("bench", SMOKE, f"tracking.uri={tracking_db(tmp_path)}", "--mlflow-run",
                              "0123456789abcdef", cwd=tmp_path), 1)
    assert "0123456789abcdef" in line


def test_130_interrupted(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) while a command works: `knetlab data synth` of many images, interrupted once it writes."""
    out = tmp_path / "synth"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("KNETLAB_DEBUG", None)
    process = subprocess.Popen([str(KNETLAB), "data", "synth", "--out", str(out), "--train", "100000", "--val", "1"],
                               cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 120
        while not any(out.glob("*/images/training/*.jpg")):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no image written within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=180)  # generous: a loaded 2-core machine is slow to clean up
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, (process.returncode, stdout, stderr)
    assert stderr.strip().splitlines()[-1] == "knetlab: interrupted" and "Traceback" not in stderr, stderr
    assert not (out / "ADEChallengeData2016").exists() and list(out.glob(".*partial*")) == []
