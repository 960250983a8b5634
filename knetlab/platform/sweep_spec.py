"""The sweep file of `knetlab sweep` (a structured OmegaConf schema, read with the same typed merge and one-line errors
as experiment files) and what it expands to: each trial's experiment config, and every configuration validated before
anything starts.

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
    scheduler: {type: fifo}          # or {type: asha, metric: val/mIoU, mode: max, grace_period: 20, ...}
    limits: {max_concurrent_trials: null, autoscaling: false, max_failures: 0}
"""

from __future__ import annotations

import itertools
import json
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from knetlab.platform.config import load_config, merge_overrides
from knetlab.platform.structured_config import (
    ConfigError,
    ErrorTexts,
    apply_mapping,
    field_names,
    nest,
    parse_override,
    read_yaml_mapping,
)

SCHEDULERS = ("asha", "fifo")
SCHEDULER_MODES = ("max", "min")
DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice")
DOTTED_KEY_SECTIONS = ("overrides", "grid", "search")  # their keys are dotted experiment keys (optim.lr)
SWEEP_ERROR_TEXTS = ErrorTexts(unknown_key="{key}: unknown sweep key", unknown_section_key="{key}: unknown key",
                               wrong_type="{key}: expected {expected}, got {value!r}")


class SweepError(ValueError):
    """A sweep that cannot start (bad file, invalid combination, too big for the cluster) or did not finish."""


@dataclass
class SchedulerSection:
    type: str = "asha"  # asha | fifo
    # A validation metric; null: the one that ranks the rows' checkpoints (val/mIoU, val/PQ, val/segm_mAP).
    metric: str | None = None
    mode: str = "max"  # max | min
    grace_period: int | None = None  # iterations before ASHA's first decision; null: the smallest eval_interval
    reduction_factor: float = 2.0


@dataclass
class LimitsSection:
    max_concurrent_trials: int | None = None  # null: as many trials as the cluster fits now
    autoscaling: bool = False  # the cluster grows on demand: trials that do not fit now are not refused
    max_failures: int = 0  # retries of a failed trial (from its newest checkpoint); -1: unlimited


@dataclass
class SweepFile:
    """The schema of a sweep file."""

    name: str | None = None
    experiment: str | None = None
    # null (e.g. a key whose entries are all commented out) is the same as empty
    overrides: dict[str, Any] | None = field(default_factory=dict)
    rows: list[dict[str, Any]] | None = field(default_factory=list)
    grid: dict[str, list[Any]] | None = field(default_factory=dict)
    search: dict[str, dict[str, Any]] | None = field(default_factory=dict)
    num_samples: int = 1
    repeats: int = 1
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    limits: LimitsSection = field(default_factory=LimitsSection)


@dataclass
class SweepSpec:
    """A checked sweep file (paths resolved, defaults filled): everything needed to build each trial's config."""

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
    cli_overrides: list[str] = field(default_factory=list)  # the command line's experiment overrides

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
def load_sweep(path: str | Path, cli_overrides: Sequence[str] = ()) -> SweepSpec:
    """Read and check a sweep file; `key=value` overrides set sweep keys (repeats, scheduler.*, limits.*,
    grid.optim.lr, ...) or, for any other key, the experiment config of every trial (after the rows and grid)."""
    path = Path(path)
    source = str(path)
    origins: dict[str, str] = {}
    experiment_overrides: list[str] = []
    try:
        sweep = OmegaConf.structured(SweepFile)
        apply_mapping(sweep, read_yaml_mapping(path, "sweep file", field_names(SweepFile)), source, origins,
                      SweepFile, SWEEP_ERROR_TEXTS)
        for item in cli_overrides:
            key, value = parse_override(item, example="repeats=3 or trainer.max_iters=100")
            section, _, rest = key.partition(".")
            if section not in field_names(SweepFile):
                experiment_overrides.append(item)
                continue
            data = {section: {rest: value}} if section in DOTTED_KEY_SECTIONS and rest else nest(key, value)
            apply_mapping(sweep, data, f"override {item!r}", origins, SweepFile, SWEEP_ERROR_TEXTS)
    except ConfigError as error:
        raise SweepError(str(error)) from None
    return _checked(path, OmegaConf.to_container(sweep, resolve=False), origins, experiment_overrides)


def _checked(path: Path, data: dict[str, Any], origins: dict[str, str], cli_overrides: list[str]) -> SweepSpec:
    """The values that have the right type but cannot work, refused naming the key and the file or override."""

    def fail(key: str, message: str) -> typing.NoReturn:
        set_by = next((origins[k] for k in (key, key.split(".")[0], key.split("[")[0]) if k in origins), str(path))
        raise SweepError(f"{set_by}: {key}: {message}")

    for key in ("overrides", "grid", "search"):
        data[key] = data[key] or {}
    name = data["name"]
    if not name or any(c in name for c in "/\\ "):
        fail("name", f"a name without spaces or slashes is required, got {name!r}")
    experiment = None
    if data["experiment"] is not None:
        experiment = (path.parent / data["experiment"]).resolve()
        if not experiment.is_file():
            fail("experiment", f"{experiment} does not exist")
    rows = []
    for index, row in enumerate(data["rows"] or [{}]):
        if "experiment" in row:
            row_experiment = (path.parent / str(row["experiment"])).resolve()
            if not row_experiment.is_file():
                fail(f"rows[{index}].experiment", f"{row_experiment} does not exist")
            row = {**row, "experiment": str(row_experiment)}
        elif experiment is None:
            fail(f"rows[{index}]", "names no `experiment` and the sweep has no top-level experiment")
        rows.append(row)
    for key, values in data["grid"].items():
        if not values:
            fail(f"grid.{key}", f"expected a non-empty list of values, got {values!r}")
    for key, spec in data["search"].items():
        if not (len(spec) == 1 and next(iter(spec)) in DISTRIBUTIONS):
            fail(f"search.{key}", f"expected one of {{{', '.join(DISTRIBUTIONS)}: [...]}}, got {spec!r}")
        kind, args = next(iter(spec.items()))
        if kind == "choice":
            if not isinstance(args, list) or not args:
                fail(f"search.{key}.choice", f"expected a non-empty list, got {args!r}")
        elif not (isinstance(args, list) and len(args) == 2 and all(isinstance(a, (int, float)) for a in args)
                  and args[0] < args[1]):
            fail(f"search.{key}.{kind}", f"expected [low, high] with low < high, got {args!r}")
        elif kind == "loguniform" and args[0] <= 0:
            fail(f"search.{key}.loguniform", f"bounds must be > 0, got {args!r}")
    both = sorted(set(data["grid"]) & set(data["search"]))
    if both:
        fail(both[0], "is in both grid and search; choose one")
    for key in ("num_samples", "repeats"):
        if data[key] < 1:
            fail(key, f"must be an integer >= 1, got {data[key]!r}")
    scheduler, limits = data["scheduler"], data["limits"]
    if scheduler["type"] not in SCHEDULERS:
        fail("scheduler.type", f"{scheduler['type']!r} is not one of {', '.join(SCHEDULERS)}")
    if scheduler["mode"] not in SCHEDULER_MODES:
        fail("scheduler.mode", f"must be max or min, got {scheduler['mode']!r}")
    if scheduler["metric"] is not None and not scheduler["metric"].startswith("val/"):
        fail("scheduler.metric", f"must be a validation metric (val/mIoU, val/PQ, val/segm_mAP, ...) or null, got "
                                 f"{scheduler['metric']!r}")
    if scheduler["grace_period"] is not None and scheduler["grace_period"] < 1:
        fail("scheduler.grace_period", f"must be a number of iterations >= 1, got {scheduler['grace_period']!r}")
    if scheduler["reduction_factor"] <= 1:
        fail("scheduler.reduction_factor", f"must be > 1, got {scheduler['reduction_factor']!r}")
    if limits["max_concurrent_trials"] is not None and limits["max_concurrent_trials"] < 1:
        fail("limits.max_concurrent_trials", f"must be an integer >= 1 or null, got {limits['max_concurrent_trials']}")
    if limits["max_failures"] < -1:
        fail("limits.max_failures", f"must be >= 0, or -1 for unlimited, got {limits['max_failures']}")
    return SweepSpec(path=path.resolve(), name=name, experiment=experiment, overrides=data["overrides"], rows=rows,
                     grid=data["grid"], search=data["search"], num_samples=data["num_samples"],
                     repeats=data["repeats"], scheduler=scheduler, limits=limits, cli_overrides=cli_overrides)


# -- the trials -----------------------------------------------------------------------------------------------------
def trial_config(spec: SweepSpec, row: int, repeat: int, values: dict[str, Any]) -> DictConfig:
    """The experiment config of one trial: experiment file -> sweep overrides -> row -> grid/search values ->
    command-line overrides, then the seed moved on by `repeat` (from the seed those leave), validated once."""
    row_values = dict(spec.rows[row])
    experiment = row_values.pop("experiment", None) or spec.experiment
    return merge_overrides(load_config(experiment), spec.overrides, row_values, values, spec.cli_overrides,
                           source=f"{spec.path.name} row {row}", seed_offset=repeat)


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
