"""`knetlab bench --data`: the training pipeline's samples/s in one loader process and through the run's DataLoader,
the training step's samples/s and the verdict, on the smoke experiment's real pipeline, model and data layout; printed,
and logged to an MLflow run like the other bench figures. Timings are printed, never asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tracking_db

from knetlab.platform.config import load_config
from knetlab.platform.data_bench import benchmark_data, format_data_benchmark, verdict

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    root = tmp_path_factory.mktemp("data-bench")
    generate_synthetic_ade20k(root, num_train=8, num_val=1, num_classes=6, min_side=64, max_side=128)
    return root


@pytest.mark.forks
def test_benchmark_data_measures_the_loader_the_step_and_gives_a_verdict(data_root: Path):
    cfg = load_config(SMOKE, [f"data.root={data_root}", "data.synthesize=false", "data.num_workers=2",
                              "data.batch_size=2", "data.crop_size=32"])
    result = benchmark_data(cfg, images=12, warmup=1, train_steps=1, device="cpu")
    for key in ("bench/data_samples_per_s_per_process", "bench/data_samples_per_s", "bench/train_samples_per_s"):
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["num_workers"] == 2 and result["batch_size"] == 2 and result["device_type"] == "cpu"
    assert result["bench/loader_bound"] == float(result["bench/data_samples_per_s"]
                                                 < result["bench/train_samples_per_s"])
    assert result["verdict"].startswith("loader-bound" if result["bench/loader_bound"] else "not loader-bound")
    json.dumps(result)  # the data_bench.json artifact
    printed = format_data_benchmark(result)
    assert "data.num_workers=2" in printed and "training step" in printed and "verdict" in printed
    untimed = benchmark_data(cfg, images=4, warmup=0, train_steps=0)
    assert "bench/train_samples_per_s" not in untimed and "not measured" in untimed["verdict"]


def test_verdict_compares_what_the_loaders_make_with_what_the_step_takes():
    bound = verdict(10.0, 40.0, workers=2, device_type="cuda")
    assert bound["bench/loader_bound"] == 1.0 and "waits 75% of the time" in bound["verdict"]
    free = verdict(100.0, 40.0, workers=2, device_type="cuda")
    assert free["bench/loader_bound"] == 0.0 and "2.5x" in free["verdict"]
    inline = verdict(30.0, 10.0, workers=0, device_type="cpu")  # 1/30 s loading + 1/10 s step per sample
    assert inline["bench/loader_bound"] == 0.0 and "25% of each iteration" in inline["verdict"]
    assert "share the cores" in inline["verdict"]


def test_bench_data_on_the_smoke_experiment_prints_and_logs_to_mlflow(data_root: Path, tmp_path: Path):
    from knetlab.platform import tracking

    tracking_uri = tracking_db(tmp_path)
    run_id = tracking.create_run(tracking_uri, tracking.ensure_experiment("data-bench-test", tracking_uri), "r", {})
    result = subprocess.run(
        [str(KNETLAB), "bench", "--data", str(SMOKE), f"data.root={data_root}", "data.synthesize=false",
         f"tracking.uri={tracking_uri}", "--warmup", "1", "--images", "8", "--train-steps", "1",
         "--mlflow-run", run_id], capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1", "KNETLAB_DEBUG": "",  # this checkout's knetlab, from any cwd
             "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    for line in ("data pipeline :", "data loader   :", "training step :", "verdict       :"):
        assert line in result.stdout, result.stdout
    run = tracking.client(tracking_uri).get_run(run_id)
    logged = {"bench/data_samples_per_s_per_process", "bench/data_samples_per_s", "bench/train_samples_per_s",
              "bench/loader_bound"}
    assert logged <= set(run.data.metrics), run.data.metrics
    assert [a.path for a in tracking.client(tracking_uri).list_artifacts(run_id, "bench")] == ["bench/data_bench.json"]
