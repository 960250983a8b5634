"""The `knetlab` command line, run as a user runs it (a subprocess of the console script / `python -m knetlab`):
resolved config, model zoo listing, synthetic data, benchmark, and one-line errors with the right exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tracking_db
from omegaconf import OmegaConf

from knetlab.platform.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
KNETLAB = Path(sys.executable).parent / "knetlab"
# mmsegmentation 1.2.2's parameter counts of the released configs (tests/test_convert_mmseg_keys/param_counts.json,
# "total").
MMSEG_PARAMS = {
    "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512": 62_810_508,
    "knet-s3_r50-d8_pspnet_8xb2-adamw-80k_ade20k-512x512": 62_288_268,
    "knet-s3_r50-d8_deeplabv3_8xb2-adamw-80k_ade20k-512x512": 81_425_804,
    "knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k-512x512": 79_728_012,
    "knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512": 73_153_766,
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-512x512": 246_971_840,
    "knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640": 246_971_840,
}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KNETLAB_DEBUG": ""}


def knetlab(*args: str, cwd: Path = REPO_ROOT, timeout: float = 300, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    return subprocess.run([str(KNETLAB), *args], cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knetlab: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text("base: " + str(REPO_ROOT / "experiments" / "smoke.yaml") + "\ntrainer:\n  max_iters: 50\n"
                    "schedule:\n  milestones: [40]\n")
    return path


def test_config_prints_the_resolved_yaml(experiment: Path, tmp_path: Path):
    result = knetlab("config", str(experiment), "optim.lr=0.02", "tracking.tags.who=test")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.to_container(OmegaConf.create(result.stdout))
    assert printed["optim"]["lr"] == 0.02 and printed["trainer"]["max_iters"] == 50
    assert printed["tracking"]["tags"]["who"] == "test" and "base" not in printed
    # what it prints is a config file again
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    assert OmegaConf.to_container(load_config(again)) == OmegaConf.to_container(
        load_config(experiment, ["optim.lr=0.02", "tracking.tags.who=test"]))


def test_python_dash_m_and_version():
    result = subprocess.run([sys.executable, "-m", "knetlab", "--version"], cwd=REPO_ROOT, env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("knetlab "), result


def test_config_errors_are_one_line_with_exit_code_2(experiment: Path, tmp_path: Path):
    assert_one_line_error(knetlab("config", str(experiment), "optim.lr_rate=1"), 2,
                          "unknown key optim.lr_rate", "did you mean optim.lr?")
    assert_one_line_error(knetlab("config", str(experiment), "model.name=resnet-9000"), 2,
                          "model.name", "'resnet-9000'", "valid: ", "tiny")
    assert_one_line_error(knetlab("config", str(tmp_path / "missing.yaml")), 2, "missing.yaml", "does not exist")
    assert_one_line_error(knetlab("train", str(experiment), "trainer.max_iters=abc"), 2,
                          "trainer.max_iters must be an integer")


def test_usage_errors_exit_2():
    assert_one_line_error(knetlab("bogus"), 2, "invalid choice: 'bogus'")
    assert_one_line_error(knetlab("config"), 2, "EXPERIMENT.yaml")
    assert_one_line_error(knetlab("config", "experiments/smoke.yaml", "--frobnicate"), 2, "--frobnicate")
    assert_one_line_error(knetlab("sweep", "no-such-sweep.yaml"), 2, "no-such-sweep.yaml", "does not exist")
    assert_one_line_error(knetlab("data", "synth"), 2, "--out")


def test_overrides_after_options(experiment: Path):
    result = knetlab("bench", str(experiment), "--warmup", "0", "data.crop_size=32", "--images", "1",
                     "--train-steps", "0", "--image-size", "32", "40", "model.num_classes=5")
    assert result.returncode == 0, result.stderr
    assert "inference" in result.stdout and "32x40" in result.stdout and "not measured" in result.stdout


def test_models_lists_the_zoo():
    from knetlab.models import list_models

    result = knetlab("models")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].split() == ["name", "backbone", "head", "crop", "parameters"]
    listed = {line.split()[0]: line for line in lines[1:]}
    assert list(listed) == list_models()
    # the parameter counts are the real models' (mmseg's counts for the table's rows)
    for name, total in MMSEG_PARAMS.items():
        assert listed[name].endswith(f"{total / 1e6:.2f} M"), (name, listed[name], total)
    assert listed["knet-s3_swin-l_upernet_8xb2-adamw-80k_ade20k-640x640"].split()[1:4] == ["swin-l", "upernet",
                                                                                          "640x640"]


def test_data_synth_writes_an_ade20k_layout(tmp_path: Path):
    from knetlab.data import check_split

    out = tmp_path / "synthetic"
    result = knetlab("data", "synth", "--out", str(out), "--train", "3", "--val", "2", "--classes", "5",
                     "--seed", "1", "--image-size", "48", "64")
    assert result.returncode == 0, result.stderr
    images = sorted(out.rglob("*.jpg"))
    labels = sorted(out.rglob("*.png"))
    assert len(images) == 5 and len(labels) == 5, (images, labels)
    check_split(str(out), "training")
    check_split(str(out), "validation")


def test_bench_prints_the_figures(experiment: Path):
    result = knetlab("bench", str(experiment), "--warmup", "1", "--images", "2", "--train-steps", "1")
    assert result.returncode == 0, result.stderr
    for fragment in ("fps", "train step", "train memory", "params"):
        assert fragment in result.stdout, result.stdout


def test_convert_mmseg_checkpoint(tmp_path: Path):
    import torch

    from knetlab.models import create_model
    from knetlab.models.convert import RESNET_STEM_RENAMES

    torch.manual_seed(0)
    model = create_model("tiny", num_classes=150)
    # the same weights in mmsegmentation's layout: mmcv's ResNetV1c stem names
    to_mmseg = {f"backbone.{new}": f"backbone.{old}" for old, new in RESNET_STEM_RENAMES.items()}
    released = {}
    for key, value in model.state_dict().items():
        prefix = next((p for p in to_mmseg if key.startswith(p)), None)
        released[to_mmseg[prefix] + key[len(prefix):] if prefix else key] = value
    assert any(k.startswith("backbone.stem.") for k in released)
    torch.save({"state_dict": released, "meta": {"mmseg_version": "0.30.0"}}, tmp_path / "released.pth")

    result = knetlab("convert", "mmseg", str(tmp_path / "released.pth"), str(tmp_path / "out.pt"), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    converted = torch.load(tmp_path / "out.pt", weights_only=True)["state_dict"]
    fresh = create_model("tiny", num_classes=150)
    fresh.load_state_dict(converted)  # strict: every key present
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # the weights of another head do not fit: one line naming the keys, exit code 2 (bad input)
    assert_one_line_error(knetlab("convert", "mmseg", str(tmp_path / "released.pth"), str(tmp_path / "x.pt"),
                                  "--model", "tiny-psp"), 2, "tiny-psp", "missing")
    assert_one_line_error(knetlab("convert", "mmseg", str(tmp_path / "none.pth"), str(tmp_path / "x.pt"),
                                  "--model", "tiny"), 2, "none.pth", "does not exist")
    assert_one_line_error(knetlab("convert", "timm", "a", "b", "--model", "tiny"), 2, "invalid choice: 'timm'")


def test_eval_logs_ms_flip_to_the_checkpoints_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.models import create_model
    from knetlab.platform import tracking
    from knetlab.platform.checkpoint import save_checkpoint
    from knetlab.platform.config import config_to_yaml
    from knetlab.platform.optim import build_lr_scheduler, build_optimizer

    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))  # MLflow's local artifact root
    generate_synthetic_ade20k(tmp_path / "data", num_train=1, num_val=2, min_side=48, max_side=64)
    tracking_uri = tracking_db(tmp_path)
    overrides = [f"data.root={tmp_path / 'data'}", "data.synthesize=false", f"tracking.uri={tracking_uri}",
                 "eval.test_scale=[128,48]", "eval.ms_ratios=[0.75,1.0]"]
    cfg = load_config(REPO_ROOT / "experiments" / "smoke.yaml", overrides)
    run_id = tracking.create_run(tracking_uri, tracking.ensure_experiment("eval-log-test", tracking_uri), "trained",
                                 {})
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    save_checkpoint(tmp_path / "ckpt", rank=0, model=model, optimizer=optimizer,
                    scheduler=build_lr_scheduler(optimizer, cfg.schedule), scaler=None, iteration=120, epoch=3,
                    metrics={}, config_yaml=config_to_yaml(cfg), mlflow_run_id=run_id)

    env = {"KNETLAB_RUNS_DIR": str(tmp_path / "runs")}
    result = knetlab("eval", "experiments/smoke.yaml", "--checkpoint", str(tmp_path / "ckpt"), "--ms-flip", "--log",
                     *overrides, env=env)
    assert result.returncode == 0, result.stderr
    printed = dict(zip(*[iter(result.stdout.strip().splitlines()[-2].split())] * 2))
    assert set(printed) == {"val/mIoU", "val/mAcc", "val/aAcc", "val/mIoU_msflip"}, result.stdout
    assert f"to MLflow run {run_id} at step 120" in result.stdout
    for key, value in printed.items():
        assert tracking.metric_history(tracking_uri, run_id, key) == [(120, pytest.approx(float(value), abs=0.01))]
    artifacts = {a.path for a in tracking.client(tracking_uri).list_artifacts(run_id, "eval")}
    assert artifacts == {"eval/per_class_iou_iter120.csv", "eval/per_class_iou_msflip_iter120.csv"}

    # evaluating the same checkpoint again adds no second value at that step
    again = knetlab("eval", "experiments/smoke.yaml", "--checkpoint", str(tmp_path / "ckpt"), "--log", *overrides,
                    env=env)
    assert again.returncode == 0, again.stderr
    assert "no new metrics" in again.stdout and len(tracking.metric_history(tracking_uri, run_id, "val/mIoU")) == 1

    assert_one_line_error(knetlab("eval", "experiments/smoke.yaml", "--checkpoint", str(tmp_path / "ckpt"),
                                  "--mlflow-run", "0123456789abcdef", *overrides, env=env), 1, "0123456789abcdef")


def test_bench_logs_the_figures_to_an_mlflow_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from knetlab.platform import tracking

    monkeypatch.setenv("KNETLAB_RUNS_DIR", str(tmp_path / "runs"))
    tracking_uri = tracking_db(tmp_path)
    run_id = tracking.create_run(tracking_uri, tracking.ensure_experiment("bench-log-test", tracking_uri), "r", {})
    result = knetlab("bench", "experiments/smoke.yaml", f"tracking.uri={tracking_uri}", "--warmup", "0",
                     "--images", "2", "--train-steps", "1", "--mlflow-run", run_id,
                     env={"KNETLAB_RUNS_DIR": str(tmp_path / "runs")})
    assert result.returncode == 0, result.stderr
    run = tracking.client(tracking_uri).get_run(run_id)
    assert {"bench/fps", "bench/mem_gb", "bench/step_s"} <= set(run.data.metrics), run.data.metrics
    assert run.data.metrics["bench/fps"] > 0 and run.data.tags["bench/precision"] == "fp32"
    assert [a.path for a in tracking.client(tracking_uri).list_artifacts(run_id, "bench")] == ["bench/bench.json"]
    assert_one_line_error(knetlab("bench", "experiments/smoke.yaml", "--log", env={"MLFLOW_RUN_ID": ""}), 2,
                          "--log needs the run to log to")


@pytest.mark.ray
@pytest.mark.slow
def test_bench_on_a_ray_worker():
    result = knetlab("bench", "experiments/smoke.yaml", "--ray", "--warmup", "0", "--images", "2", "--train-steps",
                     "1", env={"RAY_ADDRESS": ""})
    assert result.returncode == 0, result.stderr
    assert "inference" in result.stdout and "train step" in result.stdout, result.stdout
