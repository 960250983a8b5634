"""knetlab runs as MLflow models: a run's best checkpoint logged as an MLflow model (pyfunc, pyfunc_model.py) under
the run, `runs:/RUN_ID/model` (at the end of every run with tracking.log_model, or by `knetlab register`), with an
input/output signature, an input example, the pip requirements pinned to this environment's versions and knetlab's
own code; and registered under a name with an alias (`knetlab register`, `knetlab compare --register-best`).

The model holds only the checkpoint's model.pt, config.yaml and meta.json (not the optimizer state). Logging it must
never cost a run: at the end of a run a tracking server that does not answer is reported in one line and the
checkpoints stay where they are; `knetlab register RUN --name NAME` logs the model later."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from knetlab.platform.model_source import MLFLOW_CHECKPOINT_ARTIFACT, MLFLOW_MODEL_NAME, MODEL_FILES, fetch_checkpoint
from knetlab.platform.tracking import UP_FRONT_ENV, TrackingError, client, http_settings, resolve_tracking_uri
from knetlab.redact import redact

# What loading and running the model imports, pinned to the versions installed here (the run's environment).
PINNED_PACKAGES = ("torch", "torchvision", "timm", "numpy", "opencv-python-headless", "pillow", "omegaconf", "pyyaml",
                   "pyarrow", "cloudpickle", "mlflow")
CHECKPOINT_TAG = "knetlab.checkpoint"  # on the logged model: the checkpoint it was made from
CHECKPOINT_URI_TAG = "checkpoint_uri"  # on the run (trainer.start_mlflow_run): storage.uri/RUN_NAME
EXAMPLE_SIZE = (48, 64)  # the input example's height and width
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")  # what MLflow runs to build the model (models from code)


def pinned_requirements() -> list[str]:
    pins = []
    for name in PINNED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            pins.append(f"{name}=={metadata.version(name)}")
    return pins


def model_signature(task: str) -> Any:
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    outputs = [TensorSpec(np.dtype(np.int32), (-1, -1, -1), "labels")]
    if task != "semantic":
        outputs.append(TensorSpec(np.dtype(np.int32), (-1, -1, -1), "segment_ids"))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
                          outputs=Schema(outputs))


def input_example() -> Any:
    """One small RGB image (a colour gradient)."""
    import numpy as np

    h, w = EXAMPLE_SIZE
    rows, cols = np.mgrid[0:h, 0:w]
    return np.stack([rows * 255 // h, cols * 255 // w, (rows + cols) * 255 // (h + w)], -1).astype(np.uint8)[None]


@contextlib.contextmanager
def tracking_at(tracking_uri: str) -> Iterator[None]:
    """MLflow's fluent API (model logging, registration) pointed at `tracking_uri` for the block, then exactly as
    before: `mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI, and restoring `mlflow.get_tracking_uri()`'s
    resolved value would pin a default (and the environment) that was never set (docs/platform-notes.md)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as fluent_tracking  # the fluent API's URI (MLflow 3.17)

    saved_global, saved_env = fluent_tracking._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:  # (the input example's check downloads the model's artifacts again: no progress bars in the run's log)
        with http_settings({**UP_FRONT_ENV, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}):
            yield
    finally:
        mlflow.set_tracking_uri(saved_global)  # None: unset, the environment variable too
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def model_files(checkpoint_uri: str, into: Path) -> Path:
    """A folder with only the model files of the checkpoint (or the best of a run folder) at `checkpoint_uri`."""
    source = fetch_checkpoint(checkpoint_uri, into / "download")
    target = into / MLFLOW_CHECKPOINT_ARTIFACT
    target.mkdir(parents=True)
    for name in MODEL_FILES:
        shutil.copy2(source / name, target / name)
    return target


def log_model(tracking_uri: str, run_id: str, checkpoint_uri: str | None = None) -> str:
    """Log the checkpoint (default: the best of the run's checkpoint folder, tag checkpoint_uri) as the run's MLflow
    model; returns the logged model's id (models:/ID)."""
    import mlflow
    import yaml
    from mlflow.models import Model

    from knetlab.platform.config import config_from_container
    from knetlab.platform.task_family import task_of

    mlflow_client = client(tracking_uri)
    run = mlflow_client.get_run(run_id)
    checkpoint_uri = checkpoint_uri or run.data.tags.get(CHECKPOINT_URI_TAG)
    if not checkpoint_uri:
        raise TrackingError(f"MLflow run {run_id} names no checkpoint folder (tag {CHECKPOINT_URI_TAG}); give one")
    with tempfile.TemporaryDirectory(prefix="knetlab-mlflow-model-") as tmp:
        checkpoint = model_files(checkpoint_uri, Path(tmp))
        cfg = config_from_container(yaml.safe_load((checkpoint / "config.yaml").read_text()), source="checkpoint")
        meta = json.loads((checkpoint / "meta.json").read_text())
        task, iteration = task_of(cfg), int(meta.get("iteration", 0))
        with tracking_at(tracking_uri):
            # Created here rather than by Model.log, which would put it into the fluent API's active experiment.
            model = mlflow_client.create_logged_model(
                run.info.experiment_id, name=MLFLOW_MODEL_NAME, source_run_id=run_id, params=run.data.params,
                tags={CHECKPOINT_TAG: redact(str(checkpoint_uri)), "task": task, "iteration": str(iteration)})
            try:
                Model.log(artifact_path=None, name=MLFLOW_MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id,
                          model_id=model.model_id, step=iteration, python_model=str(ENTRY_FILE),
                          artifacts={"checkpoint": str(checkpoint)},
                          code_paths=[str(Path(__file__).resolve().parents[1])],
                          signature=model_signature(task), input_example=input_example(),
                          pip_requirements=pinned_requirements(),
                          metadata={"knetlab_model": str(cfg.model.name), "task": task, "iteration": iteration})
            except BaseException:
                with contextlib.suppress(Exception):
                    mlflow_client.finalize_logged_model(model.model_id, "FAILED")
                raise
    return model.model_id


def logged_model_id(tracking_uri: str, run_id: str) -> str | None:
    """The newest knetlab model logged under the run, or None."""
    mlflow_client = client(tracking_uri)
    outputs = mlflow_client.get_run(run_id).outputs
    found = None
    for output in (outputs.model_outputs if outputs else None) or []:
        model = mlflow_client.get_logged_model(output.model_id)
        if model.name == MLFLOW_MODEL_NAME and str(model.status).endswith("READY"):
            if found is None or model.creation_timestamp >= found.creation_timestamp:
                found = model
    return found.model_id if found is not None else None


def log_model_at_end(cfg: Any, mlflow_run: dict[str, str], run_name: str) -> str | None:
    """The end of a successful run (tracking.log_model): its best checkpoint as the run's MLflow model. Never raises:
    an MLflow or storage failure is one line saying how to log the model later."""
    if not cfg.tracking.log_model:
        return None
    start = time.perf_counter()
    run_id = mlflow_run["run_id"]
    try:
        with http_settings(UP_FRONT_ENV):  # a server that does not answer costs seconds, not MLflow's 4 minutes
            model_id = log_model(mlflow_run["tracking_uri"], run_id, f"{cfg.storage.uri.rstrip('/')}/{run_name}")
    except Exception as error:
        reason = " ".join(redact(str(error)).split())[:300]
        print(f"[knetlab] could not log the MLflow model of run {run_id} ({type(error).__name__}: {reason}); the "
              f"checkpoints are kept: `knetlab register {run_id} --name NAME` logs and registers it", flush=True)
        return None
    print(f"[knetlab] logged the best checkpoint as MLflow model runs:/{run_id}/{MLFLOW_MODEL_NAME} "
          f"(models:/{model_id}, {time.perf_counter() - start:.1f}s)", flush=True)
    return model_id


def find_run_id(tracking_uri: str, run: str) -> str:
    """A run id, or the run of that knetlab run name (tag knetlab.run_name) or MLflow run name, newest first."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(tracking_uri)
    with contextlib.suppress(MlflowException):
        return mlflow_client.get_run(run).info.run_id
    quoted = "'" + run.replace("\\", "\\\\").replace("'", "\\'") + "'"
    experiments = [e.experiment_id for e in mlflow_client.search_experiments()]
    for query in (f"tags.`knetlab.run_name` = {quoted}", f"attributes.run_name = {quoted}"):
        runs = mlflow_client.search_runs(experiments, filter_string=query, max_results=1,
                                         order_by=["attributes.start_time DESC"]) if experiments else []
        if runs:
            return runs[0].info.run_id
    raise TrackingError(f"no MLflow run with id or name {run!r} at {redact(tracking_uri)}")


def register(run: str, name: str, alias: str | None = None, tracking_uri: str | None = None) -> dict[str, str]:
    """Register the run's MLflow model (logged first when the run has none) as a new version of `name`, with
    `alias` pointing at it."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    with http_settings(UP_FRONT_ENV):
        return _register(run, name, alias, tracking_uri)


def _register(run: str, name: str, alias: str | None, tracking_uri: str) -> dict[str, str]:
    import mlflow

    run_id = find_run_id(tracking_uri, run)
    model_id = logged_model_id(tracking_uri, run_id)
    if model_id is None:
        print(f"[knetlab] run {run_id} has no MLflow model yet: logging its best checkpoint", flush=True)
        model_id = log_model(tracking_uri, run_id)
    with tracking_at(tracking_uri):
        version = mlflow.register_model(f"models:/{model_id}", name, await_registration_for=60).version
        if alias:
            client(tracking_uri).set_registered_model_alias(name, alias, version)
    uri = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    print(f"[knetlab] registered run {run_id}'s model as {name} version {version}: {uri}", flush=True)
    return {"run_id": run_id, "model_id": model_id, "version": str(version), "uri": uri}


def register_best_run(tracking_uri: str, runs: list, name: str, alias: str | None) -> dict[str, str]:
    """Register the model of the run that scores best (its task family's metric, e.g. val/mIoU) among `runs` (one
    row of `knetlab compare`)."""
    from knetlab.platform.tasks import family_named

    def score(run: Any) -> float:
        metric = family_named(run.data.tags.get("task", "semantic")).score_metric
        return run.data.metrics.get(metric, float("-inf"))

    best = max(runs, key=score)
    print(f"[knetlab] the top row's best run: {best.info.run_id} ({best.info.run_name})", flush=True)
    return register(best.info.run_id, name, alias, tracking_uri=tracking_uri)
