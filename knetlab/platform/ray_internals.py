"""Every use knetlab makes of Ray's private (underscored) API, in one place, checked against Ray 2.60.0 (the version
pyproject.toml pins). After a Ray upgrade, read the places named below in Ray's source again; nothing else in
knetlab touches Ray internals.

- `tune_trials(results)`: `ResultGrid._experiment_analysis.trials` (ray/tune/result_grid.py). The public `ResultGrid`
  lists only trials that produced a result and has no trial status; the sweep summary needs every trial with its
  status (TERMINATED / ERROR, or PENDING / PAUSED after an interrupt; the trials running at a Ctrl-C end TERMINATED
  too, which trial_outcomes.py tells apart) and its last result, and the driver counts the unfinished ones to decide
  whether the sweep was interrupted.
- `drain_tune_queue()`: `ray.train._internal.session.get_session()._inter_actor_queue` (ray/train/_internal/
  session.py; filled by ray/tune/integration/ray_train.py's `TuneReportCallback`). A Tune function trial whose Train
  fit returns while its last forwarded result is still in that queue can stay RUNNING for good (a Ray 2.60 race);
  waiting until the queue is empty before the trial returns avoids it.
- `start_local_ray(gcs_address, ...)`: the `RAY_GCS_SERVER_PORT` environment variable (read by ray/_private/node.py;
  `ray.init` has no argument for the head's GCS port) and `ray.init(_node_ip_address=...)` (loopback even when Ray was
  imported before knetlab's local environment was set). A local run pins its own instance at a port it chose, so two
  runs on one machine never look each other up ("Found multiple active Ray instances").
- `torch_trainer_class()`: `DataParallelTrainer._create_default_callbacks` and `DatasetsCallback`
  (ray/train/v2/api/data_parallel_trainer.py, ray/train/v2/_internal/callbacks/datasets.py). Ray Train starts a
  `DatasetManager` actor per run even when the run has no Ray Dataset (knetlab reads its data with a torch
  DataLoader): one more Python process importing Ray Data before the first iteration, about 1.5-2 CPU-s per run and
  per sweep trial. Without Ray Datasets the callback is left out (the workers' dataset shard provider stays None,
  which Ray allows). `PlacementGroupCleanerCallback` (ray/train/v2/_internal/callbacks/placement_group_callback.py)
  starts a detached actor per run that asks the State API every second whether the controller is alive, to remove
  the run's placement group should the controller die while the job lives on. On a local instance that knetlab
  started for one `knetlab train`, the job and the whole instance end with the driver, so the cleaner is left out
  (about 2.5 CPU-s per run); a sweep keeps it (its driver outlives a trial's controller).
- `wrapped_errors(error)`: where Ray keeps the error it wraps: `RayTaskError.cause`,
  `ControllerError.controller_failure` and the worker's `UserExceptionWithTraceback._base_exc` (the exception the
  training function raised, whose traceback only survives as text).
"""

from __future__ import annotations

import functools
import time
from typing import Any

CHECKED_RAY_VERSION = "2.60.0"
GCS_PORT_VARIABLE = "RAY_GCS_SERVER_PORT"
_WRAPPED_ERROR_ATTRIBUTES = ("cause", "controller_failure", "_base_exc")


def start_local_ray(gcs_address: str, *, env_vars: dict[str, str], resources: dict[str, float] | None) -> str:
    """Start a local Ray head whose GCS listens at `gcs_address` (host:port) and whose node address is that host;
    returns the GCS address Ray reports (the caller checks it is the one asked for)."""
    import os

    import ray

    host, port = gcs_address.rsplit(":", 1)
    saved_port = os.environ.pop(GCS_PORT_VARIABLE, None)
    os.environ[GCS_PORT_VARIABLE] = port
    try:
        ray.init(runtime_env={"env_vars": env_vars}, resources=resources, _node_ip_address=host)
    finally:
        os.environ.pop(GCS_PORT_VARIABLE, None)
        if saved_port is not None:
            os.environ[GCS_PORT_VARIABLE] = saved_port
    return ray.get_runtime_context().gcs_address


@functools.cache  # the class is built on first use: ray.train.torch imports torch
def torch_trainer_class(placement_group_cleaner: bool = True) -> type:
    """`ray.train.torch.TorchTrainer` without the DatasetManager actor when the run has no Ray Datasets, and without
    the placement-group cleaner unless `placement_group_cleaner` (see the module docstring)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    left_out = (() if placement_group_cleaner else (PlacementGroupCleanerCallback,))

    class TorchTrainerWithoutIdleActors(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            unused = (*left_out, *(() if self.datasets else (DatasetsCallback,)))
            return [callback for callback in super()._create_default_callbacks()
                    if not isinstance(callback, unused)]

    return TorchTrainerWithoutIdleActors


def wrapped_errors(error: BaseException) -> list[BaseException]:
    """The errors Ray wrapped inside `error` (see the module docstring); [] for an error of one's own."""
    return [inner for name in _WRAPPED_ERROR_ATTRIBUTES
            if isinstance(inner := getattr(error, name, None), BaseException)]


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
