"""The reference optimiser and LR schedule: AdamW with substring no-decay rules, linear warm-up, step decay."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from omegaconf import DictConfig


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_keys: Sequence[str]) -> list[dict]:
    """Two groups: parameters whose name contains any of `no_decay_keys` get no weight decay (mmcv's `custom_keys`
    with decay_mult=0, substring match, as the Swin configs use); every other one (biases and BN included, as in the
    R-50 configs) decays."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if any(key in name for key in no_decay_keys) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, optim: DictConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay, list(optim.no_decay_keys)),
        lr=optim.lr,
        betas=tuple(optim.betas),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
    )


def lr_factor(iteration: int, warmup_iters: int, warmup_ratio: float, milestones: Sequence[int], gamma: float) -> float:
    """The LR multiplier at `iteration` (0-based), as mmcv 0.x's `lr_config=dict(policy='step', warmup='linear')`
    computes it: the step decay counts milestones already reached, and during warm-up the LR rises linearly from
    `warmup_ratio` of it."""
    factor = gamma ** sum(1 for m in milestones if iteration >= m)
    if iteration < warmup_iters:
        factor *= 1 - (1 - iteration / warmup_iters) * (1 - warmup_ratio)
    return factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule: DictConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The LR schedule of `schedule` (warm-up, step decay); stepped once per iteration, its state (the iteration
    count) is saved with every checkpoint."""
    warmup_iters, warmup_ratio = schedule.warmup_iters, schedule.warmup_ratio
    milestones, gamma = list(schedule.milestones), schedule.gamma

    def factor(iteration: int) -> float:
        return lr_factor(iteration, warmup_iters, warmup_ratio, milestones, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

