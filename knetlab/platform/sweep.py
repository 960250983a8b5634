"""Ray Tune sweeps (`knetlab sweep SWEEP.yaml`): one Tune function trial per configuration, each building and fitting
its own `TorchTrainer`; one MLflow parent run per sweep with a child run per trial; ASHA on val/mIoU; `--resume`.

A sweep file names a base experiment and what varies (see experiments/sweeps/smoke.yaml):

    name: smoke                      # the sweep id is NAME-YYYYmmdd-HHMMSS
    experiment: ../smoke.yaml        # the base experiment, relative to this file
    overrides: {trainer.max_iters: 60}       # every trial
    rows:                            # explicit configurations; a row may name its own experiment file
      - {model.name: tiny-fcn}
      - {experiment: ../other.yaml, data.crop_size: 96}
    grid: {optim.lr: [1.0e-4, 1.0e-3]}       # every combination of these, crossed with the rows
    search: {optim.weight_decay: {loguniform: [1.0e-5, 1.0e-3]}}   # Tune distributions, num_samples draws
    num_samples: 1
    repeats: 2                       # seeds: trainer.seed + 0 .. repeats - 1
    scheduler: {type: asha, metric: val/mIoU, mode: max, grace_period: 20, reduction_factor: 2}
    limits: {max_concurrent_trials: null, autoscaling: false, max_failures: 0}

Trials log to MLflow themselves (from the trial and rank 0), never through Tune callbacks: a slow Tune callback
triggers a Ray 2.60 race that leaves trials RUNNING after their fit ended (docs/platform-notes.md). Everything a trial
needs to continue lives in its Ray Train run directory (`storage.uri/SWEEP_ID-TRIAL_ID`) and its MLflow child run
(found again by name), so a retried or resumed trial continues both, without duplicate steps.
"""

from __future__ import annotations

import csv
import datetime
import itertools
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from knetlab.platform.config import ConfigError, load_config, merge_overrides

SWEEP_KEYS = ("name", "experiment", "overrides", "rows", "grid", "search", "num_samples", "repeats", "scheduler",
              "limits")
SCHEDULER_KEYS = ("type", "metric", "mode", "grace_period", "reduction_factor")
LIMIT_KEYS = ("max_concurrent_trials", "autoscaling", "max_failures")
SCHEDULERS = ("asha", "fifo")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
SWEEP_ID_TAG = "knetlab.sweep_id"
SWEEP_NAME_TAG = "knetlab.sweep_name"
TRIAL_ID_TAG = "knetlab.trial_id"
SETTING_TAG = "knetlab.setting"
STATUS_TAG = "knetlab.trial_status"
DRIVER_RESOURCE = "knetlab_driver"  # a custom resource the cluster files give the on-demand head only
INTERRUPTED_EXIT = 130


class SweepError(ValueError):
    """A sweep that cannot start (bad file, invalid combination, too big for the cluster) or did not finish."""


@dataclass
class SweepSpec:
    """A parsed sweep file: everything needed to build each trial's experiment config."""

    path: Path
    name: str
    experiment: Path | None
    overrides: dict[str, Any]
    rows: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    search: dict[str, dict[str, list[Any]]]
    num_samples: int = 1
    repeats: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    cli_overrides: list[str] = field(default_factory=list)

    @property
    def swept_keys(self) -> list[str]:
        return [*self.grid, *self.search]

    def trial_count(self) -> int:
        return len(self.rows) * math.prod(len(v) for v in self.grid.values()) * self.repeats * self.num_samples

    def as_params(self) -> dict[str, str]:
        """The search space as flat MLflow params of the parent run."""
        params = {"sweep.file": str(self.path), "sweep.name": self.name,
                  "sweep.experiment": str(self.experiment) if self.experiment else "-",
                  "sweep.rows": json.dumps(self.rows), "sweep.repeats": str(self.repeats),
                  "sweep.num_samples": str(self.num_samples), "sweep.trials": str(self.trial_count())}
        params.update({f"sweep.overrides.{k}": json.dumps(v) for k, v in self.overrides.items()})
        params.update({f"sweep.grid.{k}": json.dumps(v) for k, v in self.grid.items()})
        params.update({f"sweep.search.{k}": json.dumps(v) for k, v in self.search.items()})
        params.update({f"sweep.scheduler.{k}": str(v) for k, v in self.scheduler.items()})
        params.update({f"sweep.limits.{k}": str(v) for k, v in self.limits.items()})
        if self.cli_overrides:
            params["sweep.cli_overrides"] = " ".join(self.cli_overrides)
        return params


# -- the sweep file -------------------------------------------------------------------------------------------------
def _fail(source: str, key: str, message: str) -> SweepError:
    return SweepError(f"{source}: {key}: {message}")


def _dotted_mapping(value: Any, source: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(source, key, f"expected a mapping of dotted config keys to values, got {value!r}")
    return {str(k): v for k, v in value.items()}


def load_sweep(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = ()) -> SweepSpec:
    """Parse and check a sweep file; `key=value` overrides set sweep keys (repeats, scheduler.*, limits.*, ...) or,
    for any other key, the experiment config of every trial (after the file's rows and grid)."""
    path = Path(path)
    source = str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SweepError(f"{source}: sweep file does not exist") from None
    except yaml.YAMLError as error:
        raise SweepError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{source}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    experiment_overrides: list[str] = []
    for item in cli_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"override {item!r}: expected key=value (e.g. repeats=3 or trainer.max_iters=100)")
        top = key.split(".")[0]
        if top in SWEEP_KEYS:
            parsed = yaml.safe_load(value) if value else None
            target = data
            parts = key.split(".")
            for part in parts[:-1]:
                target = target.setdefault(part, {})
                if not isinstance(target, dict):
                    raise SweepError(f"override {item!r}: {part} is not a section of the sweep file")
            target[parts[-1]] = parsed
        else:
            experiment_overrides.append(item)
    unknown = sorted(set(data) - set(SWEEP_KEYS))
    if unknown:
        raise _fail(source, unknown[0], f"unknown sweep key; valid keys: {', '.join(SWEEP_KEYS)}")
    name = data.get("name")
    if not isinstance(name, str) or not name or any(c in name for c in "/\\ "):
        raise _fail(source, "name", f"a name without spaces or slashes is required, got {name!r}")
    experiment = None
    if data.get("experiment") is not None:
        experiment = (path.parent / str(data["experiment"])).resolve()
        if not experiment.is_file():
            raise _fail(source, "experiment", f"{experiment} does not exist")
    rows = data.get("rows") or [{}]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise _fail(source, "rows", "expected a list of mappings (dotted config keys, optionally `experiment`)")
    parsed_rows = []
    for index, row in enumerate(rows):
        row = {str(k): v for k, v in row.items()}
        if "experiment" in row:
            row_experiment = (path.parent / str(row["experiment"])).resolve()
            if not row_experiment.is_file():
                raise _fail(source, f"rows[{index}].experiment", f"{row_experiment} does not exist")
            row["experiment"] = str(row_experiment)
        elif experiment is None:
            raise _fail(source, f"rows[{index}]", "names no `experiment` and the sweep has no top-level experiment")
        parsed_rows.append(row)
    grid = _dotted_mapping(data.get("grid"), source, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise _fail(source, f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
    search = _dotted_mapping(data.get("search"), source, "search")
    for key, spec in search.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            raise _fail(source, f"search.{key}", f"expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                raise _fail(source, f"search.{key}.choice", f"expected a non-empty list, got {args!r}")
        elif not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                  and args[0] < args[1]):
            raise _fail(source, f"search.{key}.{kind}", f"expected [low, high] with low < high, got {args!r}")
        elif kind == "loguniform" and args[0] <= 0:
            raise _fail(source, f"search.{key}.loguniform", f"bounds must be > 0, got {args!r}")
    both = sorted(set(grid) & set(search))
    if both:
        raise _fail(source, both[0], "is in both grid and search; choose one")
    for key in ("num_samples", "repeats"):
        value = data.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(source, key, f"must be an integer >= 1, got {value!r}")
    scheduler = {"type": "asha", "metric": "val/mIoU", "mode": "max", "grace_period": None, "reduction_factor": 2,
                 **_dotted_mapping(data.get("scheduler"), source, "scheduler")}
    for key in scheduler:
        if key not in SCHEDULER_KEYS:
            raise _fail(source, f"scheduler.{key}", f"unknown key; valid: {', '.join(SCHEDULER_KEYS)}")
    if scheduler["type"] not in SCHEDULERS:
        raise _fail(source, "scheduler.type", f"{scheduler['type']!r} is not one of {', '.join(SCHEDULERS)}")
    if scheduler["mode"] not in ("max", "min"):
        raise _fail(source, "scheduler.mode", f"must be max or min, got {scheduler['mode']!r}")
    if not str(scheduler["metric"]).startswith("val/"):
        raise _fail(source, "scheduler.metric", f"must be a validation metric (val/mIoU, val/mAcc, val/aAcc), got "
                    f"{scheduler['metric']!r}")
    grace = scheduler["grace_period"]
    if grace is not None and (not isinstance(grace, int) or isinstance(grace, bool) or grace < 1):
        raise _fail(source, "scheduler.grace_period", f"must be a number of iterations >= 1, got {grace!r}")
    factor = scheduler["reduction_factor"]
    if not isinstance(factor, (int, float)) or factor <= 1:
        raise _fail(source, "scheduler.reduction_factor", f"must be > 1, got {factor!r}")
    limits = {"max_concurrent_trials": None, "autoscaling": False, "max_failures": 0,
              **_dotted_mapping(data.get("limits"), source, "limits")}
    for key in limits:
        if key not in LIMIT_KEYS:
            raise _fail(source, f"limits.{key}", f"unknown key; valid: {', '.join(LIMIT_KEYS)}")
    concurrent = limits["max_concurrent_trials"]
    if concurrent is not None and (not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1):
        raise _fail(source, "limits.max_concurrent_trials", f"must be an integer >= 1 or null, got {concurrent!r}")
    if not isinstance(limits["autoscaling"], bool):
        raise _fail(source, "limits.autoscaling", f"must be true or false, got {limits['autoscaling']!r}")
    if not isinstance(limits["max_failures"], int) or limits["max_failures"] < -1:
        raise _fail(source, "limits.max_failures", f"must be >= 0, or -1 for unlimited, got {limits['max_failures']!r}")
    return SweepSpec(
        path=path.resolve(), name=name, experiment=experiment,
        overrides=_dotted_mapping(data.get("overrides"), source, "overrides"), rows=parsed_rows, grid=grid,
        search=search, num_samples=data.get("num_samples", 1), repeats=data.get("repeats", 1), scheduler=scheduler,
        limits=limits, cli_overrides=experiment_overrides,
    )


def trial_config(spec: SweepSpec, row: int, repeat: int, values: dict[str, Any]) -> DictConfig:
    """The experiment config of one trial: experiment file -> sweep overrides -> row -> grid/search values -> seed
    -> command-line overrides."""
    row_values = dict(spec.rows[row])
    experiment = row_values.pop("experiment", None) or spec.experiment
    cfg = load_config(experiment)
    source = f"{spec.path.name} row {row}"
    cli = {}
    for item in spec.cli_overrides:
        key = item.partition("=")[0].strip()
        try:
            cli[key] = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
        except Exception as error:  # the dotlist grammar raises several kinds
            raise ConfigError(f"override {item!r}: cannot parse: {str(error).splitlines()[0]}") from None
        for part in key.split("."):
            cli[key] = cli[key][part]
    merged = {**spec.overrides, **row_values, **values, **cli}
    # Repeats count from the seed the trial would have had (a row or the command line may set it).
    merged["trainer.seed"] = int(merged.get("trainer.seed", cfg.trainer.seed)) + repeat
    # One merge, so that the config is validated once, as a whole (a later key may make an earlier one valid).
    return merge_overrides(cfg, merged, source=source)


def setting_label(spec: SweepSpec, row: int, values: dict[str, Any]) -> str:
    """What distinguishes a trial's configuration from the others of its sweep (its seed aside)."""
    row_values = {k: Path(v).stem if k == "experiment" else v for k, v in spec.rows[row].items()}
    parts = [f"{k}={v}" for k, v in {**row_values, **values}.items()]
    return ", ".join(parts) or "base"


def hyperparameter_label(values: dict[str, Any]) -> str:
    """The grid/search values only (compare groups runs by model and crop, and by these)."""
    return ", ".join(f"{k}={_short(v)}" for k, v in values.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _representative_values(spec: SweepSpec) -> list[dict[str, Any]]:
    """Value sets that cover every grid value and each distribution's bounds, to validate before anything starts."""
    search_points = []
    for key, dist in spec.search.items():
        kind, args = next(iter(dist.items()))
        points = args if kind == "choice" else [args[0], args[1] - 1 if kind == "randint" else args[1]]
        search_points.append([(key, p) for p in points])
    grid_points = [[(k, v) for v in values] for k, values in spec.grid.items()]
    combos = []
    for grid_combo in itertools.product(*grid_points):
        for search_combo in itertools.product(*search_points) if search_points else [()]:
            combos.append(dict(grid_combo) | dict(search_combo))
    return combos


def expand_trials(spec: SweepSpec) -> list[DictConfig]:
    """Every row x grid combination (distributions at their bounds) as a validated config; the first invalid one
    raises SweepError naming the row and the values."""
    configs = []
    for row in range(len(spec.rows)):
        for values in _representative_values(spec):
            try:
                configs.append(trial_config(spec, row, 0, values))
            except ConfigError as error:
                raise SweepError(f"{spec.path}: rows[{row}] with {setting_label(spec, row, values)} is invalid: "
                                 f"{error}") from None
    return configs


# -- resources ------------------------------------------------------------------------------------------------------
def trial_needs(cfg: DictConfig) -> dict[str, float]:
    workers = cfg.trainer.num_workers
    needs = {"CPU": workers * cfg.trainer.cpus_per_worker}
    if cfg.trainer.use_gpu:
        needs["GPU"] = float(workers)
    return needs


def driver_resources(cluster: dict[str, float]) -> dict[str, float]:
    """What a trial's driver (the Tune function that fits the TorchTrainer) reserves: the on-demand head's custom
    resource where the cluster has one, else a token CPU share (a whole CPU per driver would starve small clusters,
    and Tune rejects 0)."""
    if cluster.get(DRIVER_RESOURCE, 0) >= 1:
        return {"cpu": 0, DRIVER_RESOURCE: 1}
    return {"cpu": 0.01}


def plan_concurrency(spec: SweepSpec, configs: list[DictConfig], cluster: dict[str, float]) -> int:
    """The most trials that run at once without waiting on each other's placement groups; refuses a sweep whose
    trials cannot fit on the cluster at all (Tune would wait forever for the placement group)."""
    largest: dict[str, float] = {}
    for cfg in configs:
        for key, value in trial_needs(cfg).items():
            largest[key] = max(largest.get(key, 0.0), value)
    driver = driver_resources(cluster)
    driver_cpu = driver.get("cpu", 0)
    if not spec.limits["autoscaling"]:
        for key, needed in largest.items():
            have = cluster.get(key, 0.0)
            if needed + driver_cpu * (key == "CPU") > have + 1e-9:
                worst = max(configs, key=lambda c: trial_needs(c).get(key, 0))
                per_worker = worst.trainer.cpus_per_worker if key == "CPU" else 1
                raise SweepError(
                    f"{spec.path}: a trial needs {needed:g} {key} ({worst.trainer.num_workers} workers x "
                    f"{per_worker:g} {key}, model {worst.model.name}) but the "
                    f"Ray cluster has {have:g} {key}: lower trainer.num_workers/trainer.cpus_per_worker, or on an "
                    "autoscaling cluster set limits.autoscaling=true")
    configured = spec.limits["max_concurrent_trials"]
    if configured is not None:
        return configured
    if spec.limits["autoscaling"]:
        raise SweepError(f"{spec.path}: limits.autoscaling=true needs limits.max_concurrent_trials (the cluster's "
                         "size after scaling is not known up front)")
    fits = []
    for key, needed in largest.items():
        if needed > 0:
            fits.append(int((cluster.get(key, 0.0) + 1e-9) // (needed + driver_cpu * (key == "CPU"))))
    if DRIVER_RESOURCE in driver:
        fits.append(int(cluster.get(DRIVER_RESOURCE, 0)))
    return max(1, min([*fits, spec.trial_count()]))


# -- one trial ------------------------------------------------------------------------------------------------------
def drain_tune_queue(timeout_s: float = 60.0) -> None:
    """Wait until the results Train forwarded are taken by Tune (Ray 2.60: a trial returning earlier can hang in
    RUNNING with its last result still queued)."""
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


def run_trial(config: dict[str, Any], spec: SweepSpec, sweep: dict[str, str]) -> None:
    """The Tune function trial: the trial's config, its MLflow child run (continued when it exists), one
    TorchTrainer fit reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from knetlab.platform import tracking
    from knetlab.platform.trainer import (
        TrainingError,
        absolute_paths,
        build_trainer,
        end_mlflow_run,
        start_mlflow_run,
    )

    trial_id = tune.get_context().get_trial_id()
    values = {k: config[k] for k in spec.swept_keys}
    # Relative paths resolve against the sweep driver's directory (a trial actor runs elsewhere), and the tracking
    # URI is the one the driver resolved.
    cfg = absolute_paths(trial_config(spec, config["row"], config["repeat"], values), base=sweep["cwd"])
    run_name = f"{sweep['id']}-{trial_id}"
    label = setting_label(spec, config["row"], values)
    display_name = f"{cfg.model.name} crop{cfg.data.crop_size} seed{cfg.trainer.seed}"
    if spec.swept_keys:
        display_name += " " + hyperparameter_label(values)
    cfg = merge_overrides(cfg, {"tracking.run_name": display_name, "tracking.uri": sweep["tracking_uri"]},
                          source="sweep")
    mlflow_run = start_mlflow_run(cfg, run_name, resume=True, parent_run_id=sweep["parent_run_id"], extra_tags={
        SWEEP_ID_TAG: sweep["id"], TRIAL_ID_TAG: trial_id, SETTING_TAG: label,
        "knetlab.hyperparameters": hyperparameter_label(values), "knetlab.repeat": str(config["repeat"])})
    existing = tracking.client(mlflow_run["tracking_uri"]).get_run(mlflow_run["run_id"])
    if existing.info.status == "FINISHED":
        # It ended while the sweep was being interrupted, before Tune recorded it: report its result, don't rerun.
        print(f"[knetlab] trial {trial_id} had finished before the interrupt (MLflow run {mlflow_run['run_id']})",
              flush=True)
        metrics = {k: v for k, v in existing.data.metrics.items() if k.startswith("val/") and "/IoU/" not in k}
        tune.report({**metrics, "iteration": cfg.trainer.max_iters})
        return
    tracking.set_run_status(mlflow_run["tracking_uri"], mlflow_run["run_id"], "RUNNING")  # a resumed trial
    print(f"[knetlab] trial {trial_id}: {label}, seed {cfg.trainer.seed} (MLflow run {mlflow_run['run_id']})",
          flush=True)
    trainer = build_trainer(cfg, run_name=run_name, mlflow_run=mlflow_run, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    drain_tune_queue()
    end_mlflow_run(mlflow_run, result)
    if result.error is not None:
        raise TrainingError(f"trial {trial_id} ({label}) failed: {result.error}")


# -- the sweep ------------------------------------------------------------------------------------------------------
def build_scheduler(spec: SweepSpec, configs: list[DictConfig]) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if spec.scheduler["type"] == "fifo":
        return FIFOScheduler()
    max_t = max(cfg.trainer.max_iters for cfg in configs)
    eval_interval = min(cfg.trainer.eval_interval for cfg in configs)
    grace = spec.scheduler["grace_period"] or eval_interval
    # "iteration" is reported with every evaluation; the rungs are grace x factor^k iterations, all below max_iters:
    # a trial is never stopped at (or for reaching) its last report, so it ends by itself, closing its MLflow run
    # (a stop kills the trial's actor, and with it its Train workers).
    return ASHAScheduler(time_attr="iteration", grace_period=grace, max_t=max(grace, max_t - 1),
                         reduction_factor=spec.scheduler["reduction_factor"], stop_last_trials=False)


def param_space(spec: SweepSpec) -> dict[str, Any]:
    from ray import tune

    space: dict[str, Any] = {"row": tune.grid_search(list(range(len(spec.rows)))),
                             "repeat": tune.grid_search(list(range(spec.repeats)))}
    for key, values in spec.grid.items():
        space[key] = tune.grid_search(values)
    for key, dist in spec.search.items():
        kind, args = next(iter(dist.items()))
        space[key] = {"uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
                      "randint": lambda a: tune.randint(*a), "choice": lambda a: tune.choice(a)}[kind](args)
    return space


def find_sweep(tracking_uri: str, experiment_id: str, spec: SweepSpec, sweep_id: str | None) -> tuple[str, str]:
    """(sweep id, parent run id) of the sweep to resume: the one named, else the newest of this sweep's name."""
    from knetlab.platform import tracking

    tags = {SWEEP_ID_TAG: sweep_id} if sweep_id else {SWEEP_NAME_TAG: spec.name}
    run_id = tracking.find_run(tracking_uri, experiment_id, {**tags, "knetlab.kind": "sweep"})
    if run_id is None:
        what = f"sweep {sweep_id}" if sweep_id else f"a sweep named {spec.name}"
        raise SweepError(f"--resume: no parent run of {what} in MLflow at {tracking_uri}")
    run = tracking.client(tracking_uri).get_run(run_id)
    started_with = run.data.params.get("sweep.cli_overrides", "")
    if started_with != " ".join(spec.cli_overrides):
        # The trials' configs come from the sweep file and these overrides: others would change unfinished trials.
        raise SweepError(f"--resume: sweep {run.data.tags[SWEEP_ID_TAG]} was started with the overrides "
                         f"{started_with or '(none)'!r}; resume it with the same ones, not "
                         f"{' '.join(spec.cli_overrides) or '(none)'!r}")
    return run.data.tags[SWEEP_ID_TAG], run_id


def start_parent_run(spec: SweepSpec, cfg: DictConfig, sweep_id: str) -> dict[str, str]:
    from knetlab.platform import tracking

    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(cfg.tracking.experiment, tracking_uri)
    run_id = tracking.create_run(tracking_uri, experiment_id, sweep_id, {
        SWEEP_ID_TAG: sweep_id, SWEEP_NAME_TAG: spec.name, "knetlab.kind": "sweep",
        "knetlab.sweep_file": spec.path.name})
    client = tracking.client(tracking_uri)
    tracking.log_params(client, run_id, spec.as_params())
    client.log_artifact(run_id, str(spec.path), artifact_path="sweep")
    return {"tracking_uri": tracking_uri, "run_id": run_id, "experiment_id": experiment_id}


def run_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: str | bool | None = None) -> dict:
    """Run (or with `resume`, a sweep id or True for the newest of this name, continue) a sweep; returns the
    summary rows. Raises SweepError before anything starts when the sweep cannot run."""
    import ray
    from ray import tune

    from knetlab.platform import tracking
    from knetlab.platform.storage import cluster_node_count, join_uri, require_shared_storage, storage_target
    from knetlab.platform.trainer import absolute_paths, check_before_start, init_ray

    spec = load_sweep(path, overrides)
    configs = expand_trials(spec)
    first = absolute_paths(configs[0])
    for cfg in {c.data.root: c for c in configs}.values():
        check_before_start(absolute_paths(cfg))
    init_ray(resources={DRIVER_RESOURCE: 64})
    cluster = {k: float(v) for k, v in ray.cluster_resources().items()}
    require_shared_storage(first.storage.uri, cluster_node_count())
    concurrent = plan_concurrency(spec, configs, cluster)

    tracking_uri = tracking.resolve_tracking_uri(first.tracking.uri)
    if resume:
        experiment_id = tracking.ensure_experiment(first.tracking.experiment, tracking_uri)
        sweep_id, parent_id = find_sweep(tracking_uri, experiment_id, spec, resume if isinstance(resume, str) else None)
        tracking.set_run_status(tracking_uri, parent_id, "RUNNING")
    else:
        sweep_id = f"{spec.name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
        parent_id = start_parent_run(spec, first, sweep_id)["run_id"]
    sweep = {"id": sweep_id, "parent_run_id": parent_id, "tracking_uri": tracking_uri, "cwd": os.getcwd()}
    filesystem, storage_path = storage_target(first.storage.uri)
    trainable = tune.with_resources(tune.with_parameters(run_trial, spec=spec, sweep=sweep),
                                    driver_resources(cluster))
    experiment_path = join_uri(first.storage.uri, sweep_id)
    started = time.time()
    print(f"[knetlab] sweep {sweep_id}: {spec.trial_count()} trials ({len(spec.rows)} rows x "
          f"{max(1, math.prod(len(v) for v in spec.grid.values()))} grid x {spec.repeats} repeats x "
          f"{spec.num_samples} samples), up to {concurrent} at once, scheduler {spec.scheduler['type']}; "
          f"MLflow parent run {parent_id}", flush=True)
    if resume:
        if not tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
            raise SweepError(f"--resume: no Tune state for sweep {sweep_id} at {experiment_path}")
        print(f"[knetlab] resuming sweep {sweep_id}: unfinished trials only", flush=True)
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                   resume_errored=True, storage_filesystem=filesystem)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(spec),
            tune_config=tune.TuneConfig(metric=spec.scheduler["metric"], mode=spec.scheduler["mode"],
                                        scheduler=build_scheduler(spec, configs), num_samples=spec.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=sweep_id, storage_path=storage_path, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=spec.limits["max_failures"]),
                                      verbose=1),
        )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        results = None
    summary = summarize(results, spec, sweep_id, parent_id, tracking_uri, first.tracking.experiment, started)
    trials = results._experiment_analysis.trials if results is not None else []
    ended = sum(trial.status in ("TERMINATED", "ERROR") for trial in trials)
    unfinished = spec.trial_count() - ended
    if results is None or unfinished > 0:
        tracking.set_run_status(tracking_uri, parent_id, "KILLED")
        print(f"[knetlab] sweep {sweep_id} interrupted with {unfinished} unfinished trial(s); continue it with "
              f"`knetlab sweep {spec.path} --resume {sweep_id}` (same overrides)", flush=True)
        raise KeyboardInterrupt
    failed = [row["trial"] for row in summary["trials"] if row["status"] == "ERROR"]
    tracking.set_run_status(tracking_uri, parent_id, "FAILED" if failed else "FINISHED")
    if failed:
        raise SweepError(f"sweep {sweep_id} ended with {len(failed)} failed trial(s) ({', '.join(failed)}): their "
                         "errors are above and in each trial's MLflow run; the others are in the summary")
    return summary


# -- the summary ----------------------------------------------------------------------------------------------------
def summarize(results: Any, spec: SweepSpec, sweep_id: str, parent_id: str, tracking_uri: str, experiment: str,
              started: float) -> dict[str, Any]:
    """Per-trial status and figures (also marking early-stopped trials' child runs), printed and attached to the
    parent run with the comparison table."""
    from knetlab.platform import tracking
    from knetlab.platform.compare import CompareError, run_compare
    from knetlab.platform.tracking import FIRST_ITERATION_METRIC

    mlflow_client = tracking.client(tracking_uri)
    parent = mlflow_client.get_run(parent_id)
    sweep_start = parent.info.start_time / 1000.0
    children = {r.data.tags.get(TRIAL_ID_TAG): r for r in mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)}
    trials = {trial.trial_id: trial for trial in (results._experiment_analysis.trials if results is not None else [])}
    rows = []
    for trial_id, run in sorted(children.items(), key=lambda item: item[1].info.start_time):
        trial = trials.get(trial_id)
        last_result = (trial.last_result if trial is not None else None) or {}
        max_iters = int(run.data.params.get("trainer.max_iters", "0") or 0)
        last = int(last_result.get("iteration", 0) or 0)
        if run.info.status == "FINISHED":  # set by the trial itself once its fit returned
            status, last = "FINISHED", max_iters
        elif trial is None:
            status = run.info.status
        elif trial.status == "TERMINATED":  # ended by the scheduler
            val_steps = [step for step, _ in tracking.metric_history(tracking_uri, run.info.run_id, "val/mIoU")]
            last = max([last, *val_steps])
            status = f"STOPPED at {last}"
        else:
            status = trial.status  # ERROR, or PENDING/RUNNING/PAUSED when the sweep was interrupted
        first_iter = [value for _, value in tracking.metric_history(tracking_uri, run.info.run_id,
                                                                    FIRST_ITERATION_METRIC)]
        rows.append({
            "trial": trial_id, "setting": run.data.tags.get(SETTING_TAG, ""),
            "seed": run.data.params.get("trainer.seed"), "status": status, "iteration": last or None,
            "val/mIoU": run.data.metrics.get("val/mIoU"),
            "first_iter_s": round(min(first_iter) - sweep_start, 1) if first_iter else None,
            "run_id": run.info.run_id})
        if status.startswith("STOPPED") or status in ("FINISHED", "ERROR"):
            mlflow_client.set_tag(run.info.run_id, STATUS_TAG, status)
        if status.startswith("STOPPED") or status == "ERROR":
            tracking.set_run_status(tracking_uri, run.info.run_id, "KILLED" if status != "ERROR" else "FAILED")
    wall = time.time() - started
    print(f"[knetlab] sweep {sweep_id}: {len(rows)} trial runs, {wall:.0f} s in this driver", flush=True)
    print(summary_markdown(rows), end="", flush=True)
    out_dir = Path(tempfile.mkdtemp(prefix="knetlab-sweep-"))
    (out_dir / "sweep_summary.md").write_text(summary_markdown(rows))
    with (out_dir / "sweep_summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SUMMARY_COLUMNS))
        writer.writeheader()
        writer.writerows({k: row[k] for k in SUMMARY_COLUMNS} for row in rows)
    for name in ("sweep_summary.md", "sweep_summary.csv"):
        mlflow_client.log_artifact(parent_id, str(out_dir / name), artifact_path="sweep")
    mlflow_client.log_metric(parent_id, "sweep/driver_wall_time_s", wall)
    mlflow_client.log_metric(parent_id, "sweep/trials_finished", sum(r["status"] == "FINISHED" for r in rows))
    try:
        run_compare(experiment=experiment, parent_run_id=parent_id, out_dir=str(out_dir / "comparison"), log=True,
                    tracking_uri=tracking_uri)
    except CompareError as error:
        print(f"[knetlab] no comparison table: {error}", flush=True)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)  # the parent run has them now
    return {"sweep_id": sweep_id, "parent_run_id": parent_id, "trials": rows, "wall_time_s": wall}


SUMMARY_COLUMNS = ("trial", "setting", "seed", "status", "iteration", "val/mIoU", "first_iter_s", "run_id")


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "|".join("---" for _ in SUMMARY_COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(row[k]) for k in SUMMARY_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"
