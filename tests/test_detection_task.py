"""The panoptic and instance task families as the training loop uses them, without Ray: datasets from a synthetic
COCO split, one batch's losses and a training step, and a validation that reports every metric and writes its
artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knetlab.data.synthetic_coco import generate_synthetic_coco
from knetlab.models import create_model
from knetlab.platform.config import load_config
from knetlab.platform.detection_task import INSTANCE_METRICS, PANOPTIC_METRICS
from knetlab.platform.tasks import task_family

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["panoptic", "instance"])
def setting(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, object]:
    task = request.param
    root = generate_synthetic_coco(tmp_path_factory.mktemp(task) / "data", task=task, num_train=4, num_val=3)
    cfg = load_config(REPO / "experiments" / "smoke-panoptic.yaml", [
        f"model.name=tiny-{task}", f"data.root={root}", "data.synthesize=false", "data.batch_size=2",
        "data.multiscale=[[256,128],[256,160]]",
    ])
    return task, cfg


def test_family_follows_the_models_task(setting) -> None:
    task, cfg = setting
    family = task_family(cfg)
    assert family.name == task
    assert family.score_metric == {"panoptic": "val/PQ", "instance": "val/segm_mAP"}[task]


def test_a_training_step_on_a_batch_lowers_nothing_to_nan(setting) -> None:
    task, cfg = setting
    family = task_family(cfg)
    train_set = family.train_dataset(cfg)
    torch.manual_seed(0)
    model = create_model(cfg.model.name).train()
    batch = family.collate([train_set[0], train_set[1]])
    losses = family.batch_losses(model, batch, torch.device("cpu"))
    expected = {"rpn_mask", "rpn_dice", "rpn_seg", "s0_cls", "s0_mask", "s0_dice", "s2_dice"}
    assert {f"loss_{part}" for part in expected} <= set(losses)  # logged as train/loss_<part>
    assert ("loss_rpn_rank" in losses) == (task == "panoptic")
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_validation_reports_every_metric_and_writes_artifacts(setting, tmp_path: Path) -> None:
    task, cfg = setting
    family = task_family(cfg)
    val_set = family.val_dataset(cfg)
    model = create_model(cfg.model.name)
    validation = family.validate(model, val_set, cfg, torch.device("cpu"), 0, 1, tmp_path / "eval")
    names = PANOPTIC_METRICS if task == "panoptic" else INSTANCE_METRICS
    assert set(validation.metrics) == {f"val/{name}" for name in names}
    assert all(isinstance(v, float) for v in validation.metrics.values())
    written = sorted(p.name for p in (tmp_path / "eval").iterdir())
    assert f"{task}_overlay_0.png" in written
    if task == "panoptic":
        assert "per_category_pq.csv" in written
        assert validation.summary.startswith("PQ ")
    else:
        assert validation.summary.startswith("mAP ")
