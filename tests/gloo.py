"""Test support: run a function in every process of a 2-process gloo group on 127.0.0.1, as the evaluators'
all_reduce tests need (`torch.multiprocessing.spawn`; the function must be importable, i.e. module-level).

    run_in_gloo_group(worker, tmp_path)   # worker(rank, out_dir) in each process, inside the process group
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

Worker = Callable[[int, str], None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_group(rank: int, world_size: int, port: int, worker: Worker, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        worker(rank, out_dir)
    finally:
        dist.destroy_process_group()


def run_in_gloo_group(worker: Worker, out_dir: str | os.PathLike, world_size: int = 2) -> None:
    """`worker(rank, out_dir)` in `world_size` processes joined in one gloo process group; raises if any fails."""
    mp.spawn(_in_group, args=(world_size, free_port(), worker, str(Path(out_dir))), nprocs=world_size, join=True)
