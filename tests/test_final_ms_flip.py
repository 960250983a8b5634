"""`eval.final_ms_flip`: the evaluation the training loop runs after training for the table's mIoU(ms+flip) column
is `knetlab eval --ms-flip`'s, and a family without one refuses the switch before anything starts."""

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from knetlab.data.synthetic import generate_synthetic_ade20k
from knetlab.models import create_model
from knetlab.platform.checkpoint import save_checkpoint
from knetlab.platform.config import ConfigError, load_config
from knetlab.platform.eval_checkpoint import evaluate_checkpoint
from knetlab.platform.optim import build_lr_scheduler, build_optimizer
from knetlab.platform.semantic_task import validate_ms_flip
from knetlab.platform.tasks import task_family
from knetlab.platform.trainer import check_before_start

REPO = Path(__file__).resolve().parent.parent


def test_final_ms_flip_equals_knetlab_eval_ms_flip(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_synthetic_ade20k(data, num_train=1, num_val=1, min_side=64, max_side=96)
    cfg = load_config(REPO / "experiments" / "smoke.yaml", [f"data.root={data}", "data.synthesize=false",
                                                            "eval.ms_ratios=[1.0,1.5]", "eval.final_ms_flip=true"])
    torch.manual_seed(3)  # an untrained model whose predictions overlap the labels: an mIoU above 0
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
    optimizer = build_optimizer(model, cfg.optim)
    save_checkpoint(tmp_path / "ckpt", rank=0, model=model, optimizer=optimizer,
                    scheduler=build_lr_scheduler(optimizer, cfg.schedule), scaler=None, iteration=0, epoch=0,
                    metrics={}, config_yaml=OmegaConf.to_yaml(cfg), mlflow_run_id=None)
    expected = evaluate_checkpoint(cfg, str(tmp_path / "ckpt"), ms_flip=True)["metrics"]
    assert task_family(cfg).validate_ms_flip is validate_ms_flip
    final = validate_ms_flip(model, cfg, torch.device("cpu"), rank=0, world_size=1)
    assert final == {"val/mIoU_msflip": expected["val/mIoU_msflip"]}
    assert 0 < expected["val/mIoU"] != final["val/mIoU_msflip"]  # not the single-scale figure under another name


def test_final_ms_flip_is_refused_for_a_panoptic_model_before_anything_starts(tmp_path: Path) -> None:
    cfg = load_config(REPO / "experiments" / "smoke-panoptic.yaml",
                      [f"data.root={tmp_path / 'absent'}", "eval.final_ms_flip=true"])
    message = "eval.final_ms_flip=true: multi-scale + flip testing is for semantic models; tiny-panoptic is a panoptic"
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_before_start(cfg)
    assert not (tmp_path / "absent").exists()  # refused before the demo dataset was generated
