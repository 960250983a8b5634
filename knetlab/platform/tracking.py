"""MLflow tracking owned by knetlab (Ray Train V2 has no MLflow integration): experiments and runs, and the
`RunLogger` rank 0 logs through — which never logs a step twice after a restart, and keeps logging to a local spool
while the tracking server is unreachable, sending it when the server is back."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from knetlab.platform.config import redact

PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
# MLflow's own HTTP client retries for minutes by default; a training loop must not stall that long on an outage.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def runs_dir() -> Path:
    return Path(os.environ.get("KNETLAB_RUNS_DIR", "runs")).resolve()


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a local sqlite store under the runs folder (MLflow 3's file
    store is deprecated)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def client(tracking_uri: str):
    import warnings

    from mlflow.tracking import MlflowClient

    warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow's store
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it (with artifacts in runs/mlartifacts for a local store) when missing."""
    mlflow_client = client(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        artifact_location = (runs_dir() / "mlartifacts" / name).as_uri()
    try:
        return mlflow_client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        experiment = mlflow_client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def find_run(tracking_uri: str, experiment_id: str, tags: dict[str, str]) -> str | None:
    """The newest run of the experiment carrying all `tags`, or None."""
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client(tracking_uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                            order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def create_run(tracking_uri: str, experiment_id: str, run_name: str, tags: dict[str, str],
               parent_run_id: str | None = None) -> str:
    tags = {k: redact(str(v)) for k, v in tags.items()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client(tracking_uri).create_run(experiment_id, tags=tags, run_name=run_name)
    return run.info.run_id


def log_params(mlflow_client, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, redact(str(v))[:PARAM_VALUE_LIMIT]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=items[start:start + 100])


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key)]


class RunLogger:
    """Rank 0's MLflow logger for one run.

    - Steps already in the run (a worker group restarted from an older checkpoint re-runs a few iterations) are
      skipped per metric key, so each step is logged exactly once.
    - When the server cannot be reached, records go to `spool_dir/spool.jsonl` (artifacts copied beside it) and are
      sent in order on a later call once it answers; `close()` tries a last time and leaves the spool for the next
      logger of the same run (a resumed run) if the server is still down.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, spool_dir: str | Path, retry_interval_s: float = 5.0):
        for key, value in FAST_FAIL_ENV.items():
            os.environ.setdefault(key, value)
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = client(tracking_uri)
        self.spool_dir = Path(spool_dir)
        self.spool_file = self.spool_dir / "spool.jsonl"
        self.retry_interval_s = retry_interval_s
        self._next_retry = 0.0
        self._last_step: dict[str, int] | None = None
        self._load_logged_steps()

    def _load_logged_steps(self) -> None:
        try:
            run = self.client.get_run(self.run_id)
            self._last_step = {}
            for key in run.data.metrics:
                history = self.client.get_metric_history(self.run_id, key)
                self._last_step[key] = max((m.step for m in history), default=-1)
        except Exception:
            self._last_step = None

    # -- public API ------------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._submit({"kind": "metrics", "metrics": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                      "timestamp": int(time.time() * 1000)})

    def log_params(self, params: dict[str, Any]) -> None:
        self._submit({"kind": "params", "params": {k: redact(str(v))[:PARAM_VALUE_LIMIT] for k, v in params.items()}})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"kind": "tags", "tags": {k: redact(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._submit({"kind": "artifact", "path": str(path), "artifact_path": artifact_path})

    def flush(self) -> bool:
        """Send the spool; True when nothing is left."""
        if not self.spool_file.exists():
            return True
        records = [json.loads(line) for line in self.spool_file.read_text().splitlines() if line.strip()]
        for index, record in enumerate(records):
            try:
                self._send(record)
            except Exception:
                self._rewrite_spool(records[index:])
                self._next_retry = time.monotonic() + self.retry_interval_s
                return False
        self.spool_file.unlink()
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() > deadline:
                print(f"[knetlab] MLflow server {redact(self.tracking_uri)} unreachable: metrics kept in "
                      f"{self.spool_file}; they are sent when this run is resumed", flush=True)
                return
            time.sleep(min(self.retry_interval_s, 2.0))

    # -- internals -------------------------------------------------------------------------------------------------
    def _submit(self, record: dict) -> None:
        if self.spool_file.exists():
            if time.monotonic() < self._next_retry or not self.flush():
                self._spool(record)
                return
        try:
            self._send(record)
        except Exception:
            self._next_retry = time.monotonic() + self.retry_interval_s
            self._spool(record)

    def _send(self, record: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self._last_step is None:
            self._load_logged_steps()
            if self._last_step is None:
                raise ConnectionError("MLflow server unreachable")
        kind = record["kind"]
        if kind == "metrics":
            step = record["step"]
            fresh = {k: v for k, v in record["metrics"].items() if step > self._last_step.get(k, -1)}
            items = [Metric(k, v, record["timestamp"], step) for k, v in fresh.items()]
            for start in range(0, len(items), 500):
                self.client.log_batch(self.run_id, metrics=items[start:start + 500])
            for key in fresh:
                self._last_step[key] = step
        elif kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in record["params"].items()])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in record["tags"].items()])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, record["path"], artifact_path=record["artifact_path"])

    def _spool(self, record: dict) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if record["kind"] == "artifact":  # the source may be a temporary file: keep a copy
            source = Path(record["path"])
            kept = self.spool_dir / "artifacts" / uuid.uuid4().hex / source.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, kept)
            record = {**record, "path": str(kept)}
        with open(self.spool_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite_spool(self, records: list[dict]) -> None:
        tmp = self.spool_file.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(self.spool_file)
