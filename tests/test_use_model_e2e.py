"""Using a trained model, end to end: train the tiny model for a few iterations on a synthetic dataset (one worker,
a local Ray, a real `mlflow server`); the run's end logs its best checkpoint as an MLflow model; `knetlab register`
gives it a name and the alias champion (and `compare --register-best` another); `knetlab predict models:/...@champion`
on a folder with one corrupt image writes every good image's label PNG and overlay at the image's size, names the
corrupt one and exits 2; `mlflow.pyfunc.load_model` in a fresh process predicts the same labels.

Run under the shared lock: `flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_use_model_e2e.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT, MlflowServer

SMOKE = REPO_ROOT / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"

# The fresh process: the registered model from the server, each image decoded as knetlab decodes it (OpenCV, RGB).
LOAD_AND_PREDICT = """
import json, sys, cv2, mlflow
model = mlflow.pyfunc.load_model(sys.argv[1])
import knetlab
labels = {}
for path in sys.argv[3:]:
    image = cv2.imread(path, cv2.IMREAD_COLOR_RGB)
    labels[path] = model.predict(image[None])["labels"][0].tolist()
json.dump({"labels": labels, "knetlab": knetlab.__file__}, open(sys.argv[2], "w"))
"""


@pytest.mark.slow
@pytest.mark.ray
def test_train_register_predict_and_load_the_mlflow_model(mlflow_server: MlflowServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capfd: pytest.CaptureFixture) -> None:
    import ray

    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.platform import cli
    from knetlab.platform.compare import run_compare
    from knetlab.platform.config import load_config
    from knetlab.platform.mlflow_model import logged_model_id
    from knetlab.platform.trainer import run_training

    if ray.is_initialized():
        pytest.skip("needs its own local Ray (another test left one connected)")
    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = generate_synthetic_ade20k(tmp_path / "data", num_train=4, num_val=3, num_classes=5)
    name, experiment = "use-model", "use-model-e2e"
    cfg = load_config(SMOKE, [
        f"data.root={tmp_path / 'data'}", "data.synthesize=false", "data.batch_size=2", "trainer.num_workers=1",
        "trainer.max_iters=4", "trainer.eval_interval=4", "trainer.checkpoint_interval=4", "trainer.log_interval=2",
        "trainer.bench_images=0", "schedule.warmup_iters=2", "schedule.milestones=[]",
        f"storage.uri={tmp_path / 'ckpt'}", f"tracking.uri={mlflow_server.uri}", f"tracking.run_name={name}",
        f"tracking.experiment={experiment}", "tracking.log_model=true"])
    try:
        summary = run_training(cfg)
    finally:
        ray.shutdown()
    run_id = summary["mlflow_run_id"]
    assert "logged the best checkpoint as MLflow model" in capfd.readouterr().out
    # The model is the run's output: what the MLflow UI lists under the run.
    assert logged_model_id(mlflow_server.uri, run_id) is not None

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    assert cli.main(["register", name, "--name", "use-model-tiny", "--alias", "champion"]) == 0
    run_compare(experiment=experiment, register_best="use-model-best", alias="champion")
    client = mlflow_server.client()
    for registered in ("use-model-tiny", "use-model-best"):
        version = client.get_model_version_by_alias(registered, "champion")
        assert version.run_id == run_id, (registered, version)

    photos = tmp_path / "photos"
    validation = sorted((data / "images" / "validation").glob("*.jpg"))
    (photos / "street").mkdir(parents=True)
    shutil.copy(validation[0], photos / "a.jpg")
    shutil.copy(validation[1], photos / "street" / "b.jpg")
    shutil.copy(validation[2], photos / "c.jpg")
    (photos / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    good = {"a": photos / "a.jpg", "street/b": photos / "street" / "b.jpg", "c": photos / "c.jpg"}
    out = tmp_path / "predictions"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server.uri}
    result = subprocess.run([str(KNETLAB), "predict", "models:/use-model-tiny@champion", str(photos), "--out",
                             str(out), "--batch-size", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("knetlab: error: ")]
    assert len(errors) == 1 and "corrupt.jpg" in errors[0] and "1 of 4" in errors[0], result.stderr
    assert "images/s" in result.stderr and "Traceback" not in result.stderr
    labels = {}
    for key, path in good.items():
        height, width = cv2.imread(str(path)).shape[:2]
        labels[key] = cv2.imread(str(out / f"{key}.png"), cv2.IMREAD_UNCHANGED)
        assert labels[key].shape == (height, width)
        assert cv2.imread(str(out / f"{key}.overlay.jpg")).shape == (height, width, 3)
        assert json.loads((out / f"{key}.json").read_text())["classes"]
    assert not list(out.glob("corrupt*"))

    fresh = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, "models:/use-model-tiny@champion",
                            str(tmp_path / "pyfunc.json"), *map(str, good.values())],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    loaded = json.loads((tmp_path / "pyfunc.json").read_text())
    assert not loaded["knetlab"].startswith(str(REPO_ROOT)), "the model should bring its own knetlab code"
    for key, path in good.items():
        assert np.array_equal(np.asarray(loaded["labels"][str(path)]), labels[key]), key
