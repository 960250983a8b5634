"""The training driver (`knetlab train`): up-front checks, the MLflow run, and one Ray Train `TorchTrainer` fit.

Thin by design: every piece of training state lives in the checkpoints the workers report, so the same driver
starts a run, survives worker failures (`trainer.max_failures`) and resumes a stopped run (`--resume RUN`).
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from knetlab.platform.config import ConfigError
from knetlab.platform.ray_internals import GCS_PORT_VARIABLE, start_local_ray

# Local-cluster defaults (docs/platform-notes.md): loopback, no token auth, no usage stats, fast Train health checks,
# and none of the Train actors a one-machine cluster has no use for (the spot-preemption watcher, Prometheus metrics):
# each is one more Python process, about 2 CPU-seconds per run on a laptop.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}
LOOPBACK = "127.0.0.1"
# GCS addresses of the local Ray instances init_ray started in this process (a test may start several in turn).
_LOCAL_INSTANCES: set[str] = set()
RUN_NAME_TAG = "knetlab.run_name"
PRETRAINED_TAG = "knetlab.pretrained"  # with _sha256 and _keys: the backbone weights a run started from
# Ray Train's console log level: its failure reports carry full tracebacks, restated in one line by knetlab.
RAY_TRAIN_CONSOLE_LEVEL = "CRITICAL"


class TrainingError(RuntimeError):
    """A run that cannot start or did not finish; the message is one line."""


def default_run_name(cfg: DictConfig) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{cfg.model.name}-{stamp}"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def absolute_paths(cfg: DictConfig, base: str | Path | None = None) -> DictConfig:
    """Relative local paths resolved against `base` (default: the driver's working directory), so workers agree;
    `~/...` stays as it is, for each node to expand to its own home."""
    from knetlab.models.weights import is_from_scratch

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for key in ("data.root", "data.cache_dir", "data.classes_file", "storage.uri", "model.pretrained",
                "model.init_checkpoint", "model.cache_dir"):
        value = OmegaConf.select(cfg, key)
        from_scratch = key == "model.pretrained" and is_from_scratch(value)
        if value and "://" not in value and not value.startswith("~") and not from_scratch:
            OmegaConf.update(cfg, key, str((Path(base or ".") / value).resolve()))
    return cfg


def prepare_data(cfg: DictConfig) -> None:
    """Synthesize the demo dataset when asked and missing; then check both splits up front (errors name the file),
    in the layout of the model's task family."""
    from knetlab.platform.tasks import task_family

    task_family(cfg).prepare_data(cfg)


def init_ray(resources: dict[str, float] | None = None) -> bool:
    """Connect to the cluster in RAY_ADDRESS, or start a local one on loopback with the custom `resources`. True when
    the instance this process is connected to is a local one that knetlab started in this process: its only node is
    this machine and its processes have this process's environment.

    A local instance is pinned: its GCS port is chosen here and every process Ray starts for this driver (the Train
    controller, its placement-group cleaner and state actor, the workers, Tune's trials) gets RAY_ADDRESS=that
    address through the job's runtime environment. Without it, Ray's helpers that use the State API look the cluster
    up by scanning the machine's processes, and with a second Ray instance on the machine (two `knetlab train` at
    once, a train beside a sweep) they fail with "Found multiple active Ray instances". The driver's own environment
    is left alone: nothing in the driver looks the address up, and a later `ray.init` in this process (tests) must not
    find the address of an instance that is gone."""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        # Before Ray is imported: it reads some of them at import (imported earlier, a local head reports the
        # machine's routable address instead of the loopback one asked for).
        if "ray" in sys.modules and not all(key in os.environ for key in LOCAL_RAY_ENV):
            raise TrainingError("internal: Ray was imported before init_ray set up the local cluster's environment")
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address in _LOCAL_INSTANCES
    # Ray Train reads its settings in the process that calls fit(): for a sweep, the Tune trial's, not this one.
    env_vars = {k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")}
    # The dashboard stays on (loopback by default): Train V2's placement-group cleanup queries the State API.
    if address:
        ray.init(address=address, runtime_env={"env_vars": env_vars} if env_vars else None)
        return False
    gcs_address = f"{LOOPBACK}:{free_loopback_port()}"
    env_vars["RAY_ADDRESS"] = gcs_address
    started = start_local_ray(gcs_address, env_vars=env_vars, resources=resources)
    if started != gcs_address:  # a Ray that no longer reads RAY_GCS_SERVER_PORT: the pin would point elsewhere
        ray.shutdown()
        raise TrainingError(f"the local Ray instance started at {started}, not at the chosen {gcs_address} "
                            f"(Ray {ray.__version__}; knetlab pins its GCS port through {GCS_PORT_VARIABLE})")
    _LOCAL_INSTANCES.add(gcs_address)
    return True


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def start_mlflow_run(cfg: DictConfig, run_name: str, resume: bool, parent_run_id: str | None = None,
                     extra_tags: dict[str, str] | None = None, *, source: dict[str, str] | None = None,
                     datasets: list[dict[str, Any]] | None = None) -> dict[str, str]:
    """Create the run (or find the run of the same name when resuming) and log params, tags and its dataset inputs.
    `source` (MLflow's source tags) and `datasets` (mlflow_context.dataset_inputs) are made here unless given: a
    sweep makes them once, on its driver, for all its trials."""
    from knetlab.models.zoo import model_spec
    from knetlab.platform import mlflow_context, tracking
    from knetlab.platform.config import config_to_yaml, flatten_config

    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    experiment_id = tracking.ensure_experiment(cfg.tracking.experiment, tracking_uri)
    run_id = tracking.find_run(tracking_uri, experiment_id, {RUN_NAME_TAG: run_name}) if resume else None
    spec = model_spec(cfg.model.name)
    task = getattr(spec, "task", "semantic")
    tags = {
        RUN_NAME_TAG: run_name,
        "task": task,
        # Panoptic/instance models have one head (the FPN kernel head) and no crop: their training scale instead.
        "head": getattr(spec, "head", "fpn"),
        "backbone": spec.backbone,
        "crop": str(cfg.data.crop_size) if task == "semantic" else "x".join(map(str, cfg.data.scale)),
        "dataset": mlflow_context.dataset_name(cfg, task),
        "device": f"{'gpu' if cfg.trainer.use_gpu else 'cpu'}x{cfg.trainer.num_workers}",
        "git_commit": git_commit(),
        "checkpoint_uri": f"{cfg.storage.uri.rstrip('/')}/{run_name}",
        **({"ray_job_id": os.environ["RAY_JOB_ID"]} if os.environ.get("RAY_JOB_ID") else {}),
        **(source if source is not None else mlflow_context.source_tags()),
        **dict(cfg.tracking.tags),
        **(extra_tags or {}),
    }
    if run_id is None:
        run_id = tracking.create_run(tracking_uri, experiment_id, cfg.tracking.run_name or run_name, tags,
                                     parent_run_id=parent_run_id)
        client = tracking.client(tracking_uri)
        tracking.log_params(client, run_id, flatten_config(cfg))
        client.log_text(run_id, config_to_yaml(cfg), "config/config.yaml")  # secrets redacted
        inputs = datasets if datasets is not None else mlflow_context.dataset_inputs(cfg)
        with tracking.http_settings(tracking.UP_FRONT_ENV):
            mlflow_context.log_dataset_inputs(client, run_id, inputs)
    else:
        print(f"[knetlab] resuming MLflow run {run_id}", flush=True)
    return {"tracking_uri": tracking_uri, "run_id": run_id, "experiment_id": experiment_id}


def train_loop_entry(config: dict) -> None:
    """The function Ray Train runs on each worker. It imports the training loop (torch, timm, the models: about 9 s)
    only there: Ray also unpickles this function in the Train controller, which never trains."""
    from knetlab.platform.preflight import mark_permanent_storage_errors
    from knetlab.platform.train_loop import train_loop_per_worker

    with mark_permanent_storage_errors():  # so that Ray Train does not restart a run no restart can fix
        train_loop_per_worker(config)


def score_metric(cfg: DictConfig) -> str:
    """The metric that ranks the run's checkpoints (storage.num_to_keep keeps the best by it): the task family's."""
    from knetlab.platform.tasks import task_family

    return task_family(cfg).score_metric


def worker_resources(cfg: DictConfig) -> dict[str, float]:
    """What one training worker reserves on its node."""
    return {"CPU": cfg.trainer.cpus_per_worker, **({"GPU": 1} if cfg.trainer.use_gpu else {})}


def build_run_config(cfg: DictConfig, *, run_name: str, callbacks: list | None = None) -> Any:
    """Ray Train's RunConfig for one run: storage, checkpoints, retries. A storage error no restart can fix ends the
    run at once (preflight.StopOnPermanentStorageError). Ray Train's own log lines, tracebacks included, go to Ray's
    log files (`logs/train/` in the Ray session) rather than the console, unless KNETLAB_DEBUG is set."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from knetlab.platform.preflight import StopOnPermanentStorageError
    from knetlab.platform.storage import storage_target

    filesystem, storage_path = storage_target(cfg.storage.uri)
    return RunConfig(
        name=run_name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        checkpoint_config=CheckpointConfig(num_to_keep=cfg.storage.num_to_keep,
                                           checkpoint_score_attribute=score_metric(cfg),
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=cfg.trainer.max_failures),
        callbacks=[StopOnPermanentStorageError(), *(callbacks or [])],
        logging_config=LoggingConfig(log_level="INFO" if os.environ.get("KNETLAB_DEBUG") else RAY_TRAIN_CONSOLE_LEVEL),
    )


def build_trainer(cfg: DictConfig, *, run_name: str, mlflow_run: dict[str, str] | None,
                  callbacks: list | None = None, own_local_instance: bool = False) -> Any:
    """The TorchTrainer for one run; the sweep builds one per Tune trial. `own_local_instance`: the run is the only
    job of a local Ray instance that ends with this driver (no placement-group cleaner: ray_internals)."""
    from ray.train import ScalingConfig

    from knetlab.platform.ray_internals import torch_trainer_class

    return torch_trainer_class(placement_group_cleaner=not own_local_instance)(
        train_loop_entry,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "mlflow": mlflow_run,
                           "run_name": run_name},
        scaling_config=ScalingConfig(num_workers=cfg.trainer.num_workers, use_gpu=cfg.trainer.use_gpu,
                                     resources_per_worker=worker_resources(cfg),
                                     placement_strategy=cfg.trainer.placement_strategy),
        run_config=build_run_config(cfg, run_name=run_name, callbacks=callbacks),
    )


def deliver_leftover_spool(storage_uri: str, run_name: str, tracking_uri: str, *, timeout_s: float) -> bool:
    """Send what rank 0 of run `run_name` left in its MLflow spool on this node, waiting at most `timeout_s` for the
    server: its logger gives up `tracking.delivery_timeout_s` after the run when the server is down, and a killed
    worker (a trial stopped by the scheduler) never sends its last records. True when a spool was there and is now
    delivered in full."""
    from knetlab.platform.run_spool import SPOOL_FILE, read_pending, run_spool_dir
    from knetlab.platform.tracking import RunLogger

    spool_dir = run_spool_dir(storage_uri, run_name)
    pending = read_pending(spool_dir / SPOOL_FILE, 0, limit=1) if (spool_dir / SPOOL_FILE).exists() else []
    if not pending:
        return False
    print(f"[knetlab] sending the {run_name} records its worker could not deliver to MLflow", flush=True)
    return RunLogger(tracking_uri, pending[0][0]["run"], spool_dir=spool_dir).close(timeout_s=timeout_s)


def end_mlflow_run(mlflow_run: dict[str, str], result: Any, cfg: DictConfig, run_name: str) -> None:
    """Deliver what the run's worker left in its MLflow spool, then mark the run FINISHED, or FAILED when the fit
    ended in an error (`result`: the fit's Result, or the error `fit()` raised: Ray Train V2 raises the run's error
    rather than returning it). A finished run's best checkpoint is logged as its MLflow model first
    (tracking.log_model; never fails the run)."""
    from knetlab.platform import tracking

    deliver_leftover_spool(cfg.storage.uri, run_name, mlflow_run["tracking_uri"],
                           timeout_s=cfg.tracking.delivery_timeout_s)
    failed = isinstance(result, BaseException) or result.error is not None
    if not failed:
        from knetlab.platform.mlflow_model import log_model_at_end

        log_model_at_end(cfg, mlflow_run, run_name)
    tracking.set_run_status(mlflow_run["tracking_uri"], mlflow_run["run_id"], "FAILED" if failed else "FINISHED")


def check_worker_nodes(cfg: DictConfig) -> None:
    """Every node that can host a worker reads the data and writes the storage with its own credentials; a node
    that cannot fails the run here, in one line naming it, before any worker or MLflow run starts."""
    from knetlab.platform.preflight import NodeCheckError
    from knetlab.platform.preflight import check_worker_nodes as check_nodes
    from knetlab.platform.tasks import task_of

    try:
        check_nodes(cfg.data.root, cfg.storage.uri, worker_resources(cfg), task=task_of(cfg),
                    list_files=(cfg.data.train_list, cfg.data.val_list))
    except NodeCheckError as error:
        raise TrainingError(str(error)) from None


def check_before_start(cfg: DictConfig) -> None:
    """Everything that can be checked before any worker starts; each failure is one clear line."""
    from knetlab.platform.storage import check_storage
    from knetlab.platform.tasks import task_family

    family = task_family(cfg)
    if cfg.eval.final_ms_flip and family.validate_ms_flip is None:
        raise ConfigError(f"eval.final_ms_flip=true: multi-scale + flip testing is for semantic models; "
                          f"{cfg.model.name} is a {family.name} model (tested at eval.test_scale, as the reference)")
    prepare_data(cfg)
    check_storage(cfg.storage.uri)  # shared storage on a multi-node cluster is checked once Ray is connected


def check_pretrained_weights(cfg: DictConfig) -> dict[str, str]:
    """Fetch the run's pretrained backbone weights into this node's cache (model.cache_dir), check their sha256 and
    that they fit the backbone (built on the meta device), before any worker starts; print which weights the run
    starts from, in one line, and return the MLflow tags that record it. A failure is a PretrainedError (exit 2)
    naming the weights and how to supply a local or S3 copy."""
    from knetlab.models.zoo import check_pretrained

    checked = check_pretrained(cfg.model)
    if checked is None:
        print(f"[knetlab] backbone: random initialisation (model.pretrained={cfg.model.pretrained})", flush=True)
        return {PRETRAINED_TAG: "none"}
    weights, report = checked
    state = "checked" if weights.checked else "not checked: no checksum known (model.pretrained_sha256)"
    print(f"[knetlab] pretrained backbone: {report.source} (sha256 {weights.sha256}, {state}): {report.summary()}",
          flush=True)
    return {PRETRAINED_TAG: report.source, f"{PRETRAINED_TAG}_sha256": weights.sha256,
            f"{PRETRAINED_TAG}_keys": report.summary()}


def pretrained_key(cfg: DictConfig) -> str:
    """What decides a run's pretrained weights and how they fit (a sweep checks each distinct one once)."""
    m = cfg.model
    return f"{m.name} {m.pretrained} {m.pretrained_sha256} {sorted(dict(m.overrides).items())}"


def run_training(cfg: DictConfig, resume: str | None = None) -> dict[str, Any]:
    """Train one experiment on Ray; `resume` is the name of a stopped run to continue from its last checkpoint."""
    from knetlab.platform.mlflow_context import ui_link
    from knetlab.platform.storage import cluster_node_count, require_shared_storage

    cfg = absolute_paths(cfg)
    check_before_start(cfg)  # data and storage first: a bad input fails in seconds, before a Ray cluster starts
    pretrained_tags = check_pretrained_weights(cfg)  # then the weights (a download), still before Ray
    local = init_ray()
    if not local:
        # A cluster's nodes may see other files and credentials than this driver; a local instance started here has
        # only this machine and this environment, which check_before_start has just checked.
        require_shared_storage(cfg.storage.uri, cluster_node_count())
        check_worker_nodes(cfg)
    if resume is not None:
        run_dir_hint = f"{cfg.storage.uri.rstrip('/')}/{resume}"
        if "://" not in cfg.storage.uri and not Path(run_dir_hint).is_dir():
            raise ConfigError(f"--resume {resume}: no run of that name under storage.uri={cfg.storage.uri}")
    run_name = resume or cfg.tracking.run_name or default_run_name(cfg)
    mlflow_run = start_mlflow_run(cfg, run_name, resume=resume is not None, extra_tags=pretrained_tags)
    print(f"[knetlab] run {run_name}: {cfg.model.name}, {cfg.trainer.num_workers} worker(s), "
          f"{cfg.trainer.max_iters} iterations, checkpoints in {cfg.storage.uri}/{run_name}", flush=True)
    trainer = build_trainer(cfg, run_name=run_name, mlflow_run=mlflow_run, own_local_instance=local)
    from ray.train import TrainingFailedError

    from knetlab.platform.preflight import describe_failure

    try:
        result = trainer.fit()
    except TrainingFailedError as error:  # after trainer.max_failures restarts, or at once for a permanent error
        end_mlflow_run(mlflow_run, error, cfg, run_name)
        raise TrainingError(f"run {run_name} failed: {describe_failure(error)}") from None
    except (KeyboardInterrupt, SystemExit) as interrupt:
        # On Ctrl-C Ray Train aborts the run gracefully, then its blocked ray.get raises SystemExit(1).
        print(f"[knetlab] interrupted: run {run_name} continues from its last checkpoint with "
              f"`knetlab train EXPERIMENT.yaml --resume {run_name}`", flush=True)
        raise KeyboardInterrupt from interrupt
    end_mlflow_run(mlflow_run, result, cfg, run_name)
    if result.error is not None:
        raise TrainingError(f"run {run_name} failed: {describe_failure(result.error)}")
    metrics = dict(result.metrics or {})
    summary = {"run_name": run_name, "mlflow_run_id": mlflow_run["run_id"], "metrics": metrics,
               "checkpoint": result.checkpoint.path if result.checkpoint else None}
    print(f"[knetlab] finished {run_name}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in metrics.items() if k.startswith("val/")), flush=True)
    uri = mlflow_run["tracking_uri"]
    link = ui_link(uri, mlflow_run["experiment_id"], mlflow_run["run_id"])
    if uri.startswith("sqlite:"):
        print(f"[knetlab] open the MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1, then {link}",
              flush=True)
    else:
        print(f"[knetlab] MLflow run: {link} (run id {mlflow_run['run_id']})", flush=True)
    sys.stdout.flush()
    return summary
