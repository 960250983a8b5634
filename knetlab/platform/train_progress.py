"""The training loop's running figures without a host sync per step: the losses of a progress window summed on the
device, read (and reduced across workers) only at log, validation and checkpoint points; a non-finite loss found
there on any worker stops every worker at the same point, so no worker raises while the others wait in a collective;
and the peak memory of training as the largest of the workers'."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

NO_BAD_ITERATION = 2**62  # "no non-finite loss yet" in the MIN all-reduce of the first bad iteration


@dataclass
class ProgressWindow:
    """Loss sums and training time since the last progress line (train/time_per_iter counts training only). The sums
    stay on the device: reading them every step would stop the next batch's copy overlapping the step's compute."""

    start: float = field(default_factory=time.perf_counter)
    iterations: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    first_bad: torch.Tensor | None = None  # the first iteration whose loss was not finite (NO_BAD_ITERATION: none)

    def add(self, losses: dict[str, torch.Tensor], iteration: int) -> None:
        self.iterations += 1
        for key, value in losses.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        loss = losses["loss"].detach()
        if self.first_bad is None:
            self.first_bad = torch.full((), NO_BAD_ITERATION, dtype=torch.int64, device=loss.device)
        self.first_bad = torch.where(torch.isfinite(loss), self.first_bad,
                                     torch.clamp(self.first_bad, max=iteration))

    def pause(self, seconds: float) -> None:
        self.start += seconds


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def window_means(window: ProgressWindow, device: torch.device) -> dict[str, float]:
    """The window's mean losses over its iterations and over every worker ({"train/loss": ..., ...}), read in one
    host sync. Raises FloatingPointError on every worker alike when any worker's loss was not finite in the window
    (the all-reduced sums carry the NaN/inf to every worker), naming the first such iteration."""
    keys = sorted(window.sums)
    values = torch.stack([window.sums[key].to(device, torch.float64) for key in keys]) / max(window.iterations, 1)
    if distributed():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    if not bool(torch.isfinite(values).all()):
        first_bad = window.first_bad.clone() if window.first_bad is not None else torch.tensor(NO_BAD_ITERATION)
        first_bad = first_bad.to(device)
        if distributed():
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
        where = f"iteration {int(first_bad)}" if int(first_bad) < NO_BAD_ITERATION else "an earlier iteration"
        losses = ", ".join(f"{key} {value:.4g}" for key, value in zip(keys, values.tolist()))
        raise FloatingPointError(f"{where}: the loss is not finite on at least one worker ({losses}; lr too high? "
                                 f"with trainer.amp on a GPU without bf16, try trainer.amp=false)")
    return {f"train/{key}": value for key, value in zip(keys, values.tolist())}


def max_across_workers(value: float, device: torch.device) -> float:
    """The largest of every worker's `value` (every worker must call it)."""
    if not distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
