"""The reference LR schedule and weight-decay grouping, against hand-computed values."""

import pytest
import torch
from omegaconf import OmegaConf

from knetlab.models import create_model
from knetlab.platform.optim import build_lr_scheduler, build_optimizer, lr_factor, param_groups

REFERENCE = dict(warmup_iters=1000, warmup_ratio=0.001, milestones=[60000, 72000], gamma=0.1)


@pytest.mark.parametrize(
    ("iteration", "lr"),
    [
        (0, 1e-7),  # warm-up starts at 0.001 x 1e-4
        (500, 1e-4 * (1 - 0.5 * 0.999)),
        (999, 1e-4 * (1 - (1 / 1000) * 0.999)),
        (1000, 1e-4),
        (59999, 1e-4),
        (60000, 1e-5),  # mmseg 0.x decays at 60k/72k (1.x drifts to 61k/73k)
        (71999, 1e-5),
        (72000, 1e-6),
        (79999, 1e-6),
    ],
)
def test_reference_schedule(iteration: int, lr: float) -> None:
    assert 1e-4 * lr_factor(iteration, **REFERENCE) == pytest.approx(lr, rel=1e-9)


def test_scheduler_steps_per_iteration_and_restores() -> None:
    model = torch.nn.Linear(2, 2)
    optim_cfg = OmegaConf.create(dict(lr=1e-4, weight_decay=5e-4, betas=[0.9, 0.999], eps=1e-8, no_decay_keys=[]))
    schedule = OmegaConf.create(dict(warmup_iters=10, warmup_ratio=0.001, milestones=[20], gamma=0.1))
    optimizer = build_optimizer(model, optim_cfg)
    scheduler = build_lr_scheduler(optimizer, schedule)
    seen = []
    for _ in range(25):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(1e-7)
    assert seen[10] == pytest.approx(1e-4) and seen[20] == pytest.approx(1e-5)
    # restored as the train loop restores a checkpoint (optimizer, then scheduler), the schedule continues
    fresh_optimizer = build_optimizer(model, optim_cfg)
    restored = build_lr_scheduler(fresh_optimizer, schedule)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    restored.load_state_dict(scheduler.state_dict())
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    restored.step()
    assert restored.last_epoch == 26 and fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_swin_no_decay_rule_matches_reference_count() -> None:
    """The Swin configs' substring rule exempts exactly 63,258 parameters of KNet+UperNet Swin-T (reference §3)."""
    model = create_model("knet-s3_swin-t_upernet_8xb2-adamw-80k_ade20k-512x512")
    groups = param_groups(model, 5e-4, ["absolute_pos_embed", "relative_position_bias_table", "norm"])
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert sum(p.numel() for p in groups[1]["params"]) == 63_258
    assert sum(p.numel() for g in groups for p in g["params"]) == 73_153_766


def test_r50_rows_decay_everything() -> None:
    model = create_model("tiny")
    groups = param_groups(model, 5e-4, [])
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))


def test_lr_multipliers_by_key_longest_match_wins_and_combine_with_no_decay() -> None:
    model = create_model("tiny")
    groups = param_groups(model, 0.05, ["bias"], {"backbone": 0.25, "backbone.layer4": 0.5}, lr=1e-4)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        mult = 0.5 if "backbone.layer4" in name else 0.25 if "backbone" in name else 1.0
        assert group.get("lr", 1e-4) == pytest.approx(1e-4 * mult), name
        assert group["weight_decay"] == (0.0 if "bias" in name else 0.05), name
    assert "lr" not in groups[0] and groups[0]["weight_decay"] == 0.05  # the base group first: train/lr logs it
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
