"""The exact losses each Ray Train worker process wrote per iteration (KNETLAB_WORKER_PID_DIR, train_loop.py): how
the fault-tolerance tests compare a killed or interrupted leg of a run with the leg that continued it, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path


def read_trace(path: Path) -> dict[int, dict[str, float]]:
    """iteration -> losses of one worker process (a last line cut short by a kill is left out)."""
    lines = path.read_text().split("\n")[:-1]  # only lines that end in a newline
    return {record.pop("iteration"): record for record in map(json.loads, lines)}


def traces(pid_dir: Path, rank: int) -> list[dict[int, dict[str, float]]]:
    """The loss traces of every worker process that had this rank, in the order they started."""
    found = [read_trace(path) for path in pid_dir.glob(f"losses_rank{rank}_pid*.jsonl")]
    return sorted((t for t in found if t), key=min)
