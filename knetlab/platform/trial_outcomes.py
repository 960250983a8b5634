"""Which trials a sweep driver started and which of them really ended, recorded by a Tune callback.

Needed because of how Ray Tune 2.60 ends an interrupted sweep: on Ctrl-C it saves the experiment's state, then stops
every running trial and marks it TERMINATED, the status of a finished trial or of one the scheduler stopped
(`TuneController._cleanup_trials`). Statuses alone would call a trial cut short by the interrupt done, and a sweep
whose trials had all started would end as if finished (exit 0, its running trials marked as stopped by the
scheduler). Tune calls `on_trial_complete` (an end, or a stop by the scheduler) and `on_trial_error` (failed for
good), but not for the trials its clean-up stops: started minus ended are the trials the interrupt cut short.

Imported only after `trainer.init_ray` (it imports Ray). The records are kept here, by sweep id, not in the callback:
a resumed sweep runs the callback Tune unpickles from the sweep's saved state, not the one this driver made.
"""

from __future__ import annotations

from typing import Any

from ray import tune

_STARTED: dict[str, set[str]] = {}
_ENDED: dict[str, set[str]] = {}


class TrialOutcomes(tune.Callback):
    """Records, for the sweep `sweep_id`, the trials started and ended in this driver. Kept trivial on purpose: a
    slow Tune callback triggers a Ray 2.60 race (sweep.py's docstring)."""

    def __init__(self, sweep_id: str) -> None:
        self.sweep_id = sweep_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _STARTED.setdefault(self.sweep_id, set()).add(trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _ENDED.setdefault(self.sweep_id, set()).add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _ENDED.setdefault(self.sweep_id, set()).add(trial.trial_id)


def cut_short(sweep_id: str) -> set[str]:
    """The trials of `sweep_id` this driver started that neither ended nor failed for good: those an interrupt
    stopped."""
    return _STARTED.get(sweep_id, set()) - _ENDED.get(sweep_id, set())
