"""The training loop's data order and loader: `ResumableSampler` (a distributed shuffle that can start mid-epoch),
`EpochItems` (the epoch travels with each index to persistent loader processes) and `train_loader`, the one
DataLoader of a run."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, DistributedSampler

from knetlab.data.transforms import init_loader_worker
from knetlab.platform.config import loader_workers


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start part-way through an epoch, so a resumed run continues the same data order
    without loading the batches it already trained on. It yields (epoch, index) pairs for `EpochItems`."""

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        return iter([(self.epoch, index) for index in indices[self.start:]])

    def __len__(self) -> int:
        return self.num_samples - self.start


class EpochItems(torch.utils.data.Dataset):
    """The training set indexed by (epoch, index). Persistent loader processes hold their own copy of the dataset,
    so the epoch that its seeded augmentation depends on travels with every index instead of through `set_epoch` in
    the training process."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        return self.dataset[index]


def train_loader(dataset, sampler: ResumableSampler, cfg: DictConfig, *, collate: Callable[[list], Any] | None,
                 pin_memory: bool, rank: int) -> DataLoader:
    """A run's one DataLoader: `loader_workers(cfg)` processes that persist across epochs (no start-up per epoch),
    each preparing data.prefetch_factor batches ahead; batches in pinned memory when `pin_memory` (GPU training).
    Iterate it once per epoch after `sampler.set_epoch` (and `sampler.start` to resume mid-epoch)."""
    workers = loader_workers(cfg)
    init_loader_worker()  # with 0 workers the loading happens in this process: cv2 keeps to one thread here too
    # Its own generator: creating the loader's iterator draws a seed from it, and drawing from the global RNG would
    # make a run resumed mid-epoch draw once more than an uninterrupted one (different dropout from then on).
    return DataLoader(EpochItems(dataset), batch_size=cfg.data.batch_size, sampler=sampler, drop_last=True,
                      num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                      prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
                      worker_init_fn=init_loader_worker, collate_fn=collate,
                      generator=torch.Generator().manual_seed(cfg.trainer.seed * 100_003 + rank))
