"""Where a trained model comes from, for `knetlab predict`, `export` and `register`: a knetlab checkpoint directory
(local or s3://), a run's checkpoint folder (its best checkpoint is taken), an MLflow `runs:/RUN_ID[/model]` or
`models:/NAME@ALIAS` (or `models:/NAME/VERSION`) URI. Each resolves to a local directory holding the checkpoint's
model.pt, config.yaml and meta.json; only those are fetched (not the optimizer state)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from knetlab.object_store import is_s3
from knetlab.platform.checkpoint import CONFIG_FILE, META_FILE, MODEL_FILE, CheckpointError
from knetlab.redact import redact

MODEL_FILES = (MODEL_FILE, CONFIG_FILE, META_FILE)  # what inference needs of a checkpoint
CHECKPOINT_PREFIX = "checkpoint_"
MLFLOW_MODEL_NAME = "model"  # the MLflow model's name under its run: runs:/RUN_ID/model
MLFLOW_CHECKPOINT_ARTIFACT = "checkpoint"  # the checkpoint's folder among the MLflow model's artifacts
MLFLOW_SCHEMES = ("runs:/", "models:/")


def _filesystem(uri: str) -> tuple[Any, str]:
    import pyarrow.fs as pafs

    from knetlab.platform.storage import storage_target

    filesystem, path = storage_target(uri)
    return filesystem or pafs.LocalFileSystem(), path


def _children(uri: str) -> dict[str, Any]:
    """name -> FileInfo of the entries directly under `uri` (empty when it does not exist)."""
    import pyarrow.fs as pafs

    from knetlab.platform.storage import StorageError

    filesystem, path = _filesystem(uri)
    try:
        found = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as error:
        raise StorageError(f"{redact(uri)}: cannot list ({' '.join(redact(str(error)).split())[:200]})") from None
    return {info.base_name: info for info in found}


def _read_text(uri: str, name: str) -> str:
    filesystem, path = _filesystem(uri)
    with filesystem.open_input_stream(f"{path}/{name}") as stream:
        return stream.read().decode()


def checkpoint_metric(meta: dict[str, Any], metric: str) -> float | None:
    value = (meta.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def best_checkpoint(run_uri: str, metric: str | None = None) -> str:
    """The checkpoint under a run's folder (`storage.uri/RUN_NAME`) with the highest `metric` (default: its task
    family's ranking metric, e.g. val/mIoU), the newest among equals; the newest when none has the metric."""
    run_uri = run_uri.rstrip("/")
    names = sorted(name for name, info in _children(run_uri).items()
                   if name.startswith(CHECKPOINT_PREFIX) and info.type.name == "Directory")
    candidates = []
    for name in names:
        try:
            meta = json.loads(_read_text(f"{run_uri}/{name}", META_FILE))
        except (OSError, ValueError):
            continue  # a checkpoint being written or deleted: not a candidate
        candidates.append((name, meta))
    if not candidates:
        raise CheckpointError(f"{redact(run_uri)}: no knetlab checkpoint (no {CHECKPOINT_PREFIX}*/{META_FILE} in it)")
    if metric is None:
        metric = score_metric_of(f"{run_uri}/{candidates[-1][0]}")

    def rank(item: tuple[str, dict]) -> tuple[float, int]:
        value = checkpoint_metric(item[1], metric)
        return (value if value is not None else float("-inf"), int(item[1].get("iteration", 0)))

    return f"{run_uri}/{max(candidates, key=rank)[0]}"


def score_metric_of(checkpoint_uri: str) -> str:
    """The ranking metric of the task family of the checkpoint's model."""
    import yaml

    from knetlab.platform.config import config_from_container
    from knetlab.platform.tasks import task_family

    cfg = config_from_container(yaml.safe_load(_read_text(checkpoint_uri, CONFIG_FILE)),
                                source=f"{redact(checkpoint_uri)}/{CONFIG_FILE}")
    return task_family(cfg).score_metric


def is_checkpoint(uri: str) -> bool:
    return META_FILE in _children(uri.rstrip("/"))


def fetch_checkpoint(uri: str, work_dir: str | Path | None = None) -> Path:
    """A local directory with the model files of the checkpoint (or run folder, or MLflow model) at `uri`."""
    if uri.startswith(MLFLOW_SCHEMES):
        return fetch_mlflow_checkpoint(uri, work_dir)
    uri = uri.rstrip("/") or uri
    if not is_s3(uri) and not Path(uri).exists():
        raise CheckpointError(f"{uri}: no such checkpoint directory (give a checkpoint directory, a run's checkpoint "
                              "folder, s3://..., runs:/RUN_ID or models:/NAME@ALIAS)")
    if not is_checkpoint(uri):
        uri = best_checkpoint(uri)
        print(f"[knetlab] using the best checkpoint of the run: {redact(uri)}", flush=True)
    if not is_s3(uri):
        return Path(uri)
    target = Path(work_dir or tempfile.mkdtemp(prefix="knetlab-model-"))
    filesystem, path = _filesystem(uri)
    for name in MODEL_FILES:
        try:
            with filesystem.open_input_stream(f"{path}/{name}") as stream, open(target / name, "wb") as out:
                while chunk := stream.read(1 << 24):
                    out.write(chunk)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {redact(uri)}: no {name} (not a knetlab checkpoint)") from None
    return target


def mlflow_model_uri(uri: str) -> str:
    """`runs:/RUN_ID` names the run's knetlab model (`runs:/RUN_ID/model`); other URIs are taken as given."""
    if uri.startswith("runs:/") and "/" not in uri[len("runs:/"):].strip("/"):
        return f"runs:/{uri[len('runs:/'):].strip('/')}/{MLFLOW_MODEL_NAME}"
    return uri


def fetch_mlflow_checkpoint(uri: str, work_dir: str | Path | None = None) -> Path:
    """Download a knetlab MLflow model (tracking server: $MLFLOW_TRACKING_URI, else the local runs/mlflow.db) and
    return the checkpoint among its artifacts."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from knetlab.platform.tracking import resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(None)
    target = Path(work_dir or tempfile.mkdtemp(prefix="knetlab-model-"))
    model_uri = mlflow_model_uri(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model_uri.rstrip('/')}/artifacts/{MLFLOW_CHECKPOINT_ARTIFACT}", dst_path=str(target),
            tracking_uri=tracking_uri, registry_uri=tracking_uri))
    except MlflowException as error:
        raise CheckpointError(f"{uri}: no knetlab model there at {redact(tracking_uri)} "
                              f"({' '.join(redact(error.message).split())[:200]})") from None
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (local / name).is_file():
            raise CheckpointError(f"{uri}: not a knetlab MLflow model "
                                  f"(no artifacts/{MLFLOW_CHECKPOINT_ARTIFACT}/{name})")
    return local
