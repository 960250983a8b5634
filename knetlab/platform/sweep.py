"""Ray Tune sweeps (`knetlab sweep SWEEP.yaml`): one Tune function trial per configuration of the sweep file
(sweep_spec.py), each building and fitting its own `TorchTrainer`; one MLflow parent run per sweep with a child run
per trial; FIFO (every trial to its end: tables) or ASHA (early stopping: hyperparameter searches) on the rows' ranking
metric; `--resume`; the summary at the end (sweep_summary.py).

Trials log to MLflow themselves (from the trial and rank 0), never through Tune callbacks: a slow Tune callback
triggers a Ray 2.60 race that leaves trials RUNNING after their fit returned (docs/platform-notes.md;
ray_internals.drain_tune_queue is the other half of that story). Everything a trial needs to continue lives in its
Ray Train run directory (`storage.uri/SWEEP_ID-TRIAL_ID`) and its MLflow child run (found again by name), so a
retried or resumed trial continues both, without duplicate steps.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from knetlab.platform import tracking
from knetlab.platform.config import merge_overrides
from knetlab.platform.mlflow_context import dataset_inputs, log_dataset_inputs, source_tags, ui_link
from knetlab.platform.ray_internals import drain_tune_queue, tune_trials
from knetlab.platform.sweep_spec import (
    SweepError,
    SweepSpec,
    expand_trials,
    hyperparameter_label,
    load_sweep,
    setting_label,
    trial_config,
)
from knetlab.platform.sweep_summary import summarize
from knetlab.platform.tracking import (
    HYPERPARAMETERS_TAG,
    KIND_TAG,
    REPEAT_TAG,
    SETTING_TAG,
    SWEEP_ID_TAG,
    SWEEP_NAME_TAG,
    TRIAL_ID_TAG,
)

DRIVER_RESOURCE = "knetlab_driver"  # a custom resource the cluster files give the on-demand head only


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
def run_trial(config: dict[str, Any], spec: SweepSpec, sweep: dict[str, Any]) -> None:
    """The Tune function trial: the trial's config, its MLflow child run (continued when it exists), one
    TorchTrainer fit reported to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from knetlab.platform.trainer import (
        TrainingError,
        absolute_paths,
        build_trainer,
        end_mlflow_run,
        pretrained_key,
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
        HYPERPARAMETERS_TAG: hyperparameter_label(values), REPEAT_TAG: str(config["repeat"]),
        **sweep.get("pretrained_tags", {}).get(pretrained_key(cfg), {})},
        source=sweep["source"], datasets=sweep["datasets"].get(cfg.data.root))
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
    end_mlflow_run(mlflow_run, result, cfg, run_name)
    if result.error is not None:
        raise TrainingError(f"trial {trial_id} ({label}) failed: {result.error}")


# -- the sweep ------------------------------------------------------------------------------------------------------
def with_scheduler_metric(spec: SweepSpec, configs: list[DictConfig]) -> SweepSpec:
    """The spec with scheduler.metric filled in when null: the metric that ranks the rows' checkpoints (their task
    family's: val/mIoU, val/PQ, val/segm_mAP), which every trial reports to Tune."""
    if spec.scheduler["metric"] is not None:
        return spec
    from knetlab.platform.trainer import score_metric

    metrics = sorted({score_metric(cfg) for cfg in configs})
    if len(metrics) > 1:
        raise SweepError(f"{spec.path}: its rows are of different tasks, ranked by {', '.join(metrics)}: sweep each "
                         "task in its own sweep file (or set scheduler.metric to one all rows report)")
    return dataclasses.replace(spec, scheduler={**spec.scheduler, "metric": metrics[0]})


def build_tune_scheduler(spec: SweepSpec, configs: list[DictConfig]) -> Any:
    """ASHA on the spec's metric with rungs in iterations, or FIFO (every trial to its end)."""
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
    """Tune's search space: grid searches over rows, repeats and the grid, distributions for the search keys."""
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
    tags = {SWEEP_ID_TAG: sweep_id} if sweep_id else {SWEEP_NAME_TAG: spec.name}
    run_id = tracking.find_run(tracking_uri, experiment_id, {**tags, KIND_TAG: "sweep"})
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


def start_parent_run(spec: SweepSpec, cfg: DictConfig, sweep_id: str, source: dict[str, str] | None = None,
                     datasets: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, str]:
    """The sweep's MLflow parent run: its tags (MLflow's source tags among them), the search space as params, the
    sweep file as an artifact, the datasets of all its trials (by data.root) as dataset inputs."""
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(cfg.tracking.experiment, tracking_uri)
    run_id = tracking.create_run(tracking_uri, experiment_id, sweep_id, {
        SWEEP_ID_TAG: sweep_id, SWEEP_NAME_TAG: spec.name, KIND_TAG: "sweep",
        "knetlab.sweep_file": spec.path.name, **(source if source is not None else source_tags())})
    client = tracking.client(tracking_uri)
    tracking.log_params(client, run_id, spec.as_params())
    client.log_artifact(run_id, str(spec.path), artifact_path="sweep")
    with tracking.http_settings(tracking.UP_FRONT_ENV):
        log_dataset_inputs(client, run_id, [item for inputs in (datasets or {}).values() for item in inputs])
    return {"tracking_uri": tracking_uri, "run_id": run_id, "experiment_id": experiment_id}


def run_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: str | bool | None = None) -> dict:
    """Run (or with `resume`, a sweep id or True for the newest of this name, continue) a sweep; returns the
    summary rows. Raises SweepError before anything starts when the sweep cannot run."""
    from knetlab.platform.storage import cluster_node_count, join_uri, require_shared_storage, storage_target
    from knetlab.platform.trainer import (
        absolute_paths,
        check_before_start,
        check_pretrained_weights,
        init_ray,
        pretrained_key,
    )

    spec = load_sweep(path, overrides)
    configs = expand_trials(spec)
    spec = with_scheduler_metric(spec, configs)
    first = absolute_paths(configs[0])
    datasets = {}  # data.root -> its MLflow dataset inputs, made once here for the parent run and every trial
    for cfg in {c.data.root: absolute_paths(c) for c in configs}.values():
        check_before_start(cfg)
        datasets[cfg.data.root] = dataset_inputs(cfg)
    source = source_tags()
    pretrained_tags = {pretrained_key(cfg): check_pretrained_weights(cfg)
                       for cfg in {pretrained_key(c): absolute_paths(c) for c in configs}.values()}
    init_ray(resources={DRIVER_RESOURCE: 64})  # first: it sets the local cluster's settings Ray reads at import
    import ray
    from ray import tune

    from knetlab.platform.trial_outcomes import TrialOutcomes, cut_short

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
        parent = start_parent_run(spec, first, sweep_id, source, datasets)
        parent_id, experiment_id = parent["run_id"], parent["experiment_id"]
    sweep = {"id": sweep_id, "parent_run_id": parent_id, "tracking_uri": tracking_uri, "cwd": os.getcwd(),
             "pretrained_tags": pretrained_tags, "source": source, "datasets": datasets}
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
                                        scheduler=build_tune_scheduler(spec, configs), num_samples=spec.num_samples,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name=sweep_id, storage_path=storage_path, storage_filesystem=filesystem,
                                      failure_config=tune.FailureConfig(max_failures=spec.limits["max_failures"]),
                                      callbacks=[TrialOutcomes(sweep_id)], verbose=1),
        )
    try:
        results = tuner.fit()
    except KeyboardInterrupt:
        results = None
    interrupted = cut_short(sweep_id)  # TERMINATED by Tune's clean-up after a Ctrl-C, not ended (trial_outcomes.py)
    summary = summarize(results, spec, sweep_id, parent_id, tracking_uri, first.tracking.experiment, started,
                        first.storage.uri, interrupted)
    ended = sum(trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in interrupted
                for trial in tune_trials(results))
    unfinished = spec.trial_count() - ended
    if results is None or unfinished > 0:
        tracking.set_run_status(tracking_uri, parent_id, "KILLED")
        print(f"[knetlab] sweep {sweep_id} interrupted with {unfinished} unfinished trial(s); continue it with "
              f"`knetlab sweep {spec.path} --resume {sweep_id}` (same overrides)", flush=True)
        raise KeyboardInterrupt
    failed = [row["trial"] for row in summary["trials"] if row["status"] == "ERROR"]
    tracking.set_run_status(tracking_uri, parent_id, "FAILED" if failed else "FINISHED")
    print(f"[knetlab] MLflow: {ui_link(tracking_uri, experiment_id, parent_id)}", flush=True)
    if failed:
        raise SweepError(f"sweep {sweep_id} ended with {len(failed)} failed trial(s) ({', '.join(failed)}): their "
                         "errors are above and in each trial's MLflow run; the others are in the summary")
    return summary


