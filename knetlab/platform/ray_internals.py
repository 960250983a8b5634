"""Every use knetlab makes of Ray's private (underscored) API, in one place, checked against Ray 2.60.0 (the version
pyproject.toml pins). After a Ray upgrade, read the two places named below in Ray's source again; nothing else in
knetlab touches Ray internals.

- `tune_trials(results)`: `ResultGrid._experiment_analysis.trials` (ray/tune/result_grid.py). The public `ResultGrid`
  lists only trials that produced a result and has no trial status; the sweep summary needs every trial with its
  status (TERMINATED / ERROR, or PENDING / RUNNING / PAUSED after an interrupt) and its last result, and the driver
  counts the unfinished ones to decide whether the sweep was interrupted.
- `drain_tune_queue()`: `ray.train._internal.session.get_session()._inter_actor_queue` (ray/train/_internal/
  session.py; filled by ray/tune/integration/ray_train.py's `TuneReportCallback`). A Tune function trial whose Train
  fit returns while its last forwarded result is still in that queue can stay RUNNING for good (a Ray 2.60 race);
  waiting until the queue is empty before the trial returns avoids it.
"""

from __future__ import annotations

import time
from typing import Any

CHECKED_RAY_VERSION = "2.60.0"


def tune_trials(results: Any) -> list[Any]:
    """Every `ray.tune.experiment.Trial` of a `ResultGrid` (each with `trial_id`, `status`, `last_result`); [] for
    None (a sweep interrupted before `Tuner.fit` returned)."""
    if results is None:
        return []
    return list(results._experiment_analysis.trials)


def drain_tune_queue(timeout_s: float = 60.0) -> None:
    """Inside a Tune function trial: wait (at most `timeout_s`) until the results Ray Train forwarded are taken by
    Tune."""
    from ray.train._internal.session import get_session

    session = get_session()
    queue = getattr(session, "_inter_actor_queue", None) if session is not None else None
    deadline = time.monotonic() + timeout_s
    while queue is not None and time.monotonic() < deadline:
        try:
            if queue.empty():
                return
        except Exception:  # the queue actor is gone: nothing left to drain
            return
        time.sleep(0.2)
