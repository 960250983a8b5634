"""Two `knetlab train` at once on one machine (issue 9): each starts its own local Ray instance, and both finish with
no traceback in either output.

Before each local run pinned its Ray instance, the helpers Ray starts for a run (Train's placement-group cleaner, its
state actor) looked the cluster up by scanning the machine's processes, found two GCS servers and failed with
`ConnectionError: Found multiple active Ray instances` (a full traceback in the output of a run that otherwise
succeeded, and its placement groups no longer watched).

The two runs must overlap for the test to mean anything: each run's training window (its "[knetlab] run" line to its
"[knetlab] finished" line, timed as the lines arrive) must overlap the other's. Run under the shared lock:
`flock /tmp/knetlab-ray.lock .venv/bin/pytest tests/test_concurrent_runs.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import tracking_db

pytestmark = [pytest.mark.slow, pytest.mark.ray]

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "experiments" / "smoke.yaml"
KNETLAB = Path(sys.executable).parent / "knetlab"
TIMEOUT_S = 420


@dataclass
class TimedRun:
    """A `knetlab train` subprocess whose output lines are read as they come, each with its arrival time."""

    name: str
    process: subprocess.Popen
    lines: list[tuple[float, str]] = field(default_factory=list)
    readers: list[threading.Thread] = field(default_factory=list)

    def read(self, stream) -> None:
        for line in stream:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first_time(self, prefix: str) -> float | None:
        return next((at for at, line in self.lines if line.startswith(prefix)), None)


def start_run(tmp_path: Path, data_root: Path, name: str) -> TimedRun:
    root = tmp_path / name
    root.mkdir()
    command = [
        str(KNETLAB), "train", str(SMOKE),
        f"data.root={data_root}", "data.synthesize=false", "data.crop_size=64", "data.batch_size=2",
        "data.val_max_images=2", "trainer.num_workers=1", "trainer.cpus_per_worker=1", "trainer.max_iters=6",
        "trainer.eval_interval=6", "trainer.checkpoint_interval=6", "trainer.log_interval=2", "trainer.bench_images=0",
        "schedule.warmup_iters=2", "schedule.milestones=[]",
        f"storage.uri={root / 'ckpt'}", f"tracking.uri={tracking_db(root)}",
        f"tracking.run_name={name}", f"tracking.experiment=concurrent-{name}",
    ]  # fmt: skip
    env = {**os.environ, "KNETLAB_RUNS_DIR": str(root / "runs"), "OMP_NUM_THREADS": "1"}
    for key in ("RAY_ADDRESS", "KNETLAB_DEBUG", "KNETLAB_WORKER_PID_DIR"):
        env.pop(key, None)
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    run = TimedRun(name, process)
    for stream in (process.stdout, process.stderr):
        reader = threading.Thread(target=run.read, args=(stream,), daemon=True)
        reader.start()
        run.readers.append(reader)
    return run


def wait(run: TimedRun, deadline: float) -> int:
    try:
        return run.process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        return -1
    finally:
        if run.process.poll() is None:  # timed out: the run's whole session, its local Ray instance included
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
        for reader in run.readers:
            reader.join(timeout=30)


def test_two_local_runs_at_once_both_finish_without_a_traceback(tmp_path: Path) -> None:
    from knetlab.data.synthetic import generate_synthetic_ade20k

    data_root = tmp_path / "data"
    generate_synthetic_ade20k(data_root, num_train=8, num_val=2)
    started = time.monotonic()
    runs = [start_run(tmp_path, data_root, name) for name in ("run-a", "run-b")]
    deadline = started + TIMEOUT_S
    codes = [wait(run, deadline) for run in runs]
    print(f"two concurrent runs: {time.monotonic() - started:.1f} s")

    for run, code in zip(runs, codes):
        output = run.output()
        assert code == 0, f"{run.name} exited {code}:\n{output[-6000:]}"
        assert f"[knetlab] finished {run.name}" in output, output[-4000:]
        assert "Traceback" not in output, f"{run.name}:\n{output}"
        assert "multiple active Ray instances" not in output, f"{run.name}:\n{output}"
        assert (tmp_path / run.name / "ckpt" / run.name / "checkpoint_0000006").is_dir(), run.name
    # Both runs trained at the same time (else the test proves nothing): their training windows overlap.
    windows = [(run.first_time("[knetlab] run "), run.first_time(f"[knetlab] finished {run.name}")) for run in runs]
    assert all(start is not None and end is not None for start, end in windows), windows
    (a_start, a_end), (b_start, b_end) = windows
    assert a_start < b_end and b_start < a_end, f"the runs did not overlap: {windows}"
