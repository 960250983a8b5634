"""Test support for the checkpoint conversion tests: a released checkpoint's key/shape list (one `key<TAB>[shape]`
row per tensor, `#` comments) and plausible random values for its keys."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def read_key_list(path: Path) -> list[tuple[str, list[int]]]:
    rows = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            rows.append((key, json.loads(shape)))
    return rows


def random_tensor(key: str, shape: list[int], generator: torch.Generator) -> torch.Tensor:
    """A plausible value for a released key: BN statistics valid, weights scaled by 1/sqrt(fan_in)."""
    if key.endswith("num_batches_tracked"):
        return torch.tensor(80000, dtype=torch.long)
    if key.endswith("relative_position_index"):
        return torch.randint(0, 169, shape, generator=generator)
    if key.endswith("running_var"):
        return torch.rand(shape, generator=generator) + 0.5
    if key.endswith(("running_mean", "bias")):
        return 0.1 * torch.randn(shape, generator=generator)
    if len(shape) == 1:  # norm weights
        return 1 + 0.1 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state_dict(keys: list[tuple[str, list[int]]], seed: int = 0) -> dict[str, torch.Tensor]:
    """`random_tensor` for every (key, shape), drawn in order from one generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return {key: random_tensor(key, shape, generator) for key, shape in keys}
