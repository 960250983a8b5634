"""The COCO panoptic and instance rows (experiments/coco/): one per released K-Net config, each resolving as `knetlab
config` does and building its model, with the reference recipe item by item; the schedule, computed (not trained),
steps the LR where the reference's epoch-based policy does on COCO train2017's 118,287 images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knetlab.models import DET_MODELS, build_segmentor
from knetlab.models.weights import REFERENCE_WEIGHTS
from knetlab.models.zoo import count_parameters
from knetlab.platform.config import load_config
from knetlab.platform.optim import build_lr_scheduler, build_optimizer

REPO = Path(__file__).resolve().parent.parent
COCO_DIR = REPO / "experiments" / "coco"
ROWS = sorted(name for name in DET_MODELS if not name.startswith("tiny"))
TRAIN2017_IMAGES = 118_287
# Parameter counts measured on the reference (tests/data/param_counts_det.json) and of the zoo for the other rows.
PARAMS = {"knet-s3_r50_fpn_1x_coco-panoptic": 37_536_852, "knet-s3_r50_fpn_1x_coco": 37_482_368,
          "knet-s3_swin-l_fpn_ms-3x_16x2_coco-panoptic": 208_781_224}


def reference_lr(iteration: int, iters_per_epoch: int, steps: tuple[int, int], base_lr: float) -> float:
    """mmcv's `lr_config=dict(policy='step', warmup='linear', warmup_iters=1000, warmup_ratio=0.001, step=steps)`
    under an EpochBasedRunner, written out independently of knetlab: x0.1 from the start of epoch `step` (0-based
    epoch index >= step), the linear warm-up applied per iteration on top."""
    epoch = iteration // iters_per_epoch
    lr = base_lr * 0.1 ** sum(epoch >= step for step in steps)
    if iteration < 1000:
        lr *= 1 - (1 - iteration / 1000) * (1 - 0.001)
    return lr


def test_every_released_coco_config_has_its_row() -> None:
    assert len(ROWS) == 9
    assert sorted(p.stem for p in COCO_DIR.glob("knet-*.yaml")) == ROWS


@pytest.mark.parametrize("name", ROWS)
def test_row_follows_the_reference_recipe_and_steps_the_lr_where_the_reference_does(name: str) -> None:
    cfg = load_config(COCO_DIR / f"{name}.yaml")
    spec = DET_MODELS[name]
    assert cfg.model.name == name and cfg.model.sync_bn is False and cfg.trainer.amp is False
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_grad_norm) == (1e-4, 0.05, 1.0)
    assert dict(cfg.optim.lr_mult_keys) == {"backbone": 0.25} and list(cfg.optim.no_decay_keys) == []
    assert (cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio, cfg.schedule.gamma) == (1000, 0.001, 0.1)
    swin = "swin-l" in name
    assert (cfg.trainer.num_workers, cfg.data.batch_size) == ((16, 2) if swin else (8, 2))
    assert list(cfg.data.scale) == [1333, 800] and list(cfg.eval.test_scale) == [1333, 800]
    ms3x = spec.schedule == "ms-3x"
    assert [list(s) for s in cfg.data.multiscale] == ([[1333, 640], [1333, 800]] if ms3x else [])
    assert cfg.model.drop_path_rate == (0.2 if swin else None)
    experiment = "knet-coco-panoptic" if spec.task == "panoptic" else "knet-coco-instance"
    assert cfg.tracking.experiment == experiment

    # 12 epochs (ms-3x: of the dataset repeated 3 times), steps after epochs 8 and 11 (ms-3x: 9 and 11), evaluation
    # and a checkpoint every epoch; an epoch is the images over the global batch, the last partial batch dropped.
    global_batch = cfg.data.batch_size * cfg.trainer.num_workers
    iters_per_epoch = (3 if ms3x else 1) * TRAIN2017_IMAGES // global_batch
    steps = (9, 11) if ms3x else (8, 11)
    assert cfg.trainer.max_iters == 12 * iters_per_epoch
    assert list(cfg.schedule.milestones) == [step * iters_per_epoch for step in steps]
    assert cfg.trainer.eval_interval == cfg.trainer.checkpoint_interval == iters_per_epoch

    # the LR of both parameter groups (heads 1e-4, backbone x 0.25) at every epoch boundary and around each milestone
    model = build_segmentor({**cfg.model, "name": "tiny-panoptic"}, load_weights=False)  # same groups, small
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_lr_scheduler(optimizer, cfg.schedule)
    base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    assert base_lrs == [1e-4, 0.25e-4]
    backbone = {id(p) for p in model.backbone.parameters()}
    assert all(id(p) in backbone for p in optimizer.param_groups[1]["params"])
    assert not any(id(p) in backbone for p in optimizer.param_groups[0]["params"])
    boundaries = [e * iters_per_epoch + d for e in range(13) for d in (-1, 0, 1) if 0 <= e * iters_per_epoch + d]
    for iteration in sorted({0, 1, 500, 999, 1000, *boundaries}):
        if iteration >= cfg.trainer.max_iters:
            continue
        factor = scheduler.lr_lambdas[0](iteration)
        for base_lr in base_lrs:
            assert base_lr * factor == pytest.approx(reference_lr(iteration, iters_per_epoch, steps, base_lr),
                                                     rel=1e-9), (iteration, base_lr)
    last = cfg.trainer.max_iters - 1  # epoch 12 at 1e-6 (and 0.25e-6 for the backbone)
    assert base_lrs[0] * scheduler.lr_lambdas[0](last) == pytest.approx(1e-6, rel=1e-9)


@pytest.mark.parametrize("name", ROWS)
def test_row_builds_its_model_and_names_its_reference_weights(name: str) -> None:
    cfg = load_config(COCO_DIR / f"{name}.yaml")
    with torch.device("meta"):  # every parameter and module, nothing allocated (Swin-L: 209 M parameters)
        model = build_segmentor(cfg.model, load_weights=False)
    total = count_parameters(model)["total"]
    assert total == PARAMS.get(name, total) and total > 30_000_000
    assert model.num_stuff_classes == (53 if DET_MODELS[name].task == "panoptic" else 0)
    reference = REFERENCE_WEIGHTS[DET_MODELS[name].reference_pretrained]
    assert cfg.model.pretrained == reference.url and cfg.model.pretrained_sha256 == reference.sha256
