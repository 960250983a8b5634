"""`knetlab eval` on a checkpoint in knetlab's format (written here, local and on the S3 server) and synthetic data."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tracking_db
from omegaconf import OmegaConf

from knetlab.data.synthetic import generate_synthetic_ade20k
from knetlab.models import create_model
from knetlab.platform.checkpoint import save_checkpoint
from knetlab.platform.config import load_config
from knetlab.platform.optim import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parent.parent


def _write_checkpoint(directory: Path, overrides: list[str]) -> None:
    cfg = load_config(REPO / "experiments" / "smoke.yaml", overrides)
    torch.manual_seed(0)
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    save_checkpoint(directory, rank=0, model=model, optimizer=optimizer,
                    scheduler=build_lr_scheduler(optimizer, cfg.schedule), scaler=None, iteration=0, epoch=0,
                    metrics={}, config_yaml=OmegaConf.to_yaml(cfg), mlflow_run_id=None)


def _eval(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "knetlab", "eval", "experiments/smoke.yaml", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def test_eval_local_checkpoint_single_and_ms_flip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_synthetic_ade20k(data, num_train=2, num_val=3)
    overrides = [f"data.root={data}", "data.synthesize=false"]
    _write_checkpoint(tmp_path / "ckpt", overrides)
    done = _eval(["--checkpoint", str(tmp_path / "ckpt"), "--ms-flip", *overrides])
    assert done.returncode == 0, done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("val/mIoU ") and "val/mIoU_msflip" in last
    assert "evaluated 3/3 images" in done.stderr


def test_eval_checkpoint_from_s3(tmp_path: Path, s3_server) -> None:
    import pyarrow.fs as pafs

    from knetlab.platform.storage import storage_target

    data = tmp_path / "data"
    generate_synthetic_ade20k(data, num_train=2, num_val=2)
    overrides = [f"data.root={data}", "data.synthesize=false"]
    _write_checkpoint(tmp_path / "ckpt", overrides)
    filesystem, path = storage_target(f"s3://{s3_server.bucket}/runs/r1/checkpoint_0000000")
    pafs.copy_files(str(tmp_path / "ckpt"), path, destination_filesystem=filesystem)
    done = _eval(["--checkpoint", f"s3://{s3_server.bucket}/runs/r1/checkpoint_0000000", *overrides])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("val/mIoU ")


@pytest.mark.parametrize("checkpoint", ["/nonexistent/ckpt"])
def test_eval_missing_checkpoint_is_one_line_error(tmp_path: Path, checkpoint: str) -> None:
    data = tmp_path / "data"
    generate_synthetic_ade20k(data, num_train=2, num_val=1)
    done = _eval(["--checkpoint", checkpoint, f"data.root={data}", "data.synthesize=false"])
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and checkpoint in done.stderr


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_eval_prints_and_logs_panoptic_or_instance_metrics(tmp_path: Path, task: str) -> None:
    from knetlab.data.synthetic_coco import generate_synthetic_coco
    from knetlab.platform import tracking

    data = generate_synthetic_coco(tmp_path / "data", task=task, num_train=2, num_val=3)
    db = tracking_db(tmp_path)
    overrides = [f"model.name=tiny-{task}", f"data.root={data}", "data.synthesize=false", f"tracking.uri={db}"]
    cfg = load_config(REPO / "experiments" / "smoke-panoptic.yaml", overrides)
    experiment = tracking.ensure_experiment(cfg.tracking.experiment, db)
    run_id = tracking.create_run(db, experiment, "eval-target", {})
    torch.manual_seed(0)
    model = create_model(cfg.model.name)
    optimizer = build_optimizer(model, cfg.optim)
    save_checkpoint(tmp_path / "ckpt", rank=0, model=model, optimizer=optimizer,
                    scheduler=build_lr_scheduler(optimizer, cfg.schedule), scaler=None, iteration=7, epoch=0,
                    metrics={}, config_yaml=OmegaConf.to_yaml(cfg), mlflow_run_id=run_id)
    done = subprocess.run([sys.executable, "-m", "knetlab", "eval", "experiments/smoke-panoptic.yaml", "--checkpoint",
                           str(tmp_path / "ckpt"), "--log", *overrides],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (last,) = [line for line in done.stdout.splitlines() if line.startswith("val/")]
    names = (["val/PQ", "val/SQ", "val/RQ", "val/PQ_th", "val/SQ_th", "val/RQ_th", "val/PQ_st", "val/SQ_st",
              "val/RQ_st"] if task == "panoptic" else ["val/segm_mAP", "val/segm_mAP_50", "val/segm_mAP_75"])
    assert all(f"{name} " in last for name in names), last
    assert "evaluated 3 images" in done.stderr
    logged = tracking.client(db).get_run(run_id).data.metrics
    assert set(names) <= set(logged)
    artifacts = [a.path for a in tracking.client(db).list_artifacts(run_id, "eval/iter_0000007")]
    assert f"eval/iter_0000007/{task}_overlay_0.png" in artifacts
    if task == "panoptic":
        assert "category\tPQ\tSQ\tRQ" in done.stdout


def test_eval_names_a_bad_coco_file_in_one_line(tmp_path: Path) -> None:
    from knetlab.data.synthetic_coco import generate_synthetic_coco

    data = generate_synthetic_coco(tmp_path / "data", task="panoptic", num_train=2, num_val=2)
    missing = sorted((data / "annotations" / "panoptic_val2017").glob("*.png"))[0]
    missing.unlink()
    done = subprocess.run([sys.executable, "-m", "knetlab", "eval", "experiments/smoke-panoptic.yaml", "--checkpoint",
                           str(tmp_path / "no-ckpt"), f"data.root={data}", "data.synthesize=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knetlab: error:") and missing.name in lines[0], lines
