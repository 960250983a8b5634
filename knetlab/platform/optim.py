"""The reference optimiser and LR schedule: AdamW with substring no-decay rules, linear warm-up, step decay."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from omegaconf import DictConfig


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_keys: Sequence[str],
                 lr_mult_keys: Mapping[str, float] | None = None, lr: float | None = None) -> list[dict]:
    """Parameter groups as mmcv's optimizer constructor makes them, by substring of the parameter name: parameters
    whose name contains any of `no_decay_keys` get no weight decay (mmcv's `custom_keys` with decay_mult=0, as the
    Swin configs use; every other one decays, biases and BN included, as in the R-50 configs), and those containing a
    key of `lr_mult_keys` get `lr` times its value (the longest matching key wins; the COCO configs'
    `custom_keys={'backbone': dict(lr_mult=0.25)}`). The first group has the base lr and decays (the LR the train
    loop logs); a group with a multiplier carries its own `lr`."""
    if lr_mult_keys and lr is None:
        raise ValueError("param_groups: lr_mult_keys needs the base lr")
    keys_by_length = sorted(lr_mult_keys or {}, key=len, reverse=True)
    grouped: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, True): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((float(lr_mult_keys[key]) for key in keys_by_length if key in name), 1.0)  # type: ignore[index]
        decays = not any(key in name for key in no_decay_keys)
        grouped.setdefault((mult, decays), []).append(param)
    groups = []
    for mult, decays in sorted(grouped, key=lambda group: (group[0] != 1.0, not group[1], group[0])):
        params = grouped[(mult, decays)]
        if params or (mult, decays) == (1.0, True):
            groups.append({"params": params, "weight_decay": weight_decay if decays else 0.0,
                           **({"lr": lr * mult} if mult != 1.0 else {})})
    return groups


def build_optimizer(model: torch.nn.Module, optim: DictConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay, list(optim.no_decay_keys),
                     dict(optim.get("lr_mult_keys") or {}), optim.lr),
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

