"""MLflow tracking owned by knetlab (Ray Train V2 has no MLflow integration): the tracking URI, experiments, runs, tags,
params (logged up front), and `RunLogger`, through which rank 0 logs a run's metrics and artifacts without ever
blocking or failing training on the tracking server (its spool and delivery: run_spool.py)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from knetlab.platform.mlflow_context import KIND_TAGS, mark_model_development
from knetlab.platform.run_spool import SPOOL_FILE, SpoolSender, read_pending
from knetlab.platform.storage import REDACTED, redact

PARAM_VALUE_LIMIT = 6000  # MLflow's limits on one param / tag value
TAG_VALUE_LIMIT = 8000
FIRST_ITERATION_METRIC = "time/first_iter_unix_s"  # wall clock when a run's first iteration ended (sweep summaries)
# Tags knetlab sets on runs and searches by (the model tags head/backbone/crop come from the zoo's names).
KIND_TAG = "knetlab.kind"  # "sweep" on a sweep's parent run
SWEEP_ID_TAG = "knetlab.sweep_id"  # NAME-YYYYmmdd-HHMMSS, on the parent and every trial
SWEEP_NAME_TAG = "knetlab.sweep_name"
TRIAL_ID_TAG = "knetlab.trial_id"  # Tune's trial id
SETTING_TAG = "knetlab.setting"  # what sets a trial apart from the others of its sweep (its seed aside)
HYPERPARAMETERS_TAG = "knetlab.hyperparameters"  # a trial's grid/search values: compare groups runs by them
REPEAT_TAG = "knetlab.repeat"
TRIAL_STATUS_TAG = "knetlab.trial_status"  # FINISHED, STOPPED at N (by the scheduler), ERROR
SECRET_KEY = re.compile(r"(?i)secret|password|passwd|token|access_?key|credential")

# MLflow retries a failed request 7 times with backoff 2 (about 4 minutes), waits 120 s for an answer, and reads these
# settings from the environment at every request: knetlab sets them around its own calls (a RunLogger: its lifetime).
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
UP_FRONT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


class TrackingError(RuntimeError):
    """The tracking server or store cannot be used; one line naming the URI (never credentials)."""


_env_lock = threading.Lock()
_env_users: dict[str, int] = {}
_env_saved: dict[str, str | None] = {}


@contextlib.contextmanager
def http_settings(settings: Mapping[str, str]) -> Iterator[None]:
    """MLflow HTTP settings for the calls inside the block (process-wide while it lasts; nested and concurrent
    blocks are counted, and a variable the user set is left alone)."""
    taken = []
    with _env_lock:
        for key, value in settings.items():
            if _env_users.get(key, 0) == 0:
                if key in os.environ:
                    continue
                _env_saved[key] = os.environ.get(key)
                os.environ[key] = value
            _env_users[key] = _env_users.get(key, 0) + 1
            taken.append(key)
    try:
        yield
    finally:
        with _env_lock:
            for key in taken:
                _env_users[key] -= 1
                if _env_users[key] == 0:
                    saved = _env_saved.pop(key, None)
                    if saved is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = saved


# -- where runs go ----------------------------------------------------------------------------------------------------
def runs_dir() -> Path:
    return Path(os.environ.get("KNETLAB_RUNS_DIR", "runs")).resolve()


def resolve_tracking_uri(uri: str | None) -> str:
    """The config's URI, else $MLFLOW_TRACKING_URI, else a sqlite store in the runs folder (MLflow 3's file store is
    deprecated): sqlite:////abs/runs/mlflow.db."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = runs_dir()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// tracking URI (relative paths from the working directory), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):]).resolve()


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    warnings.filterwarnings("ignore", message=".*noload.*")  # SQLAlchemy 2.1 deprecation inside MLflow's store
    database = sqlite_path(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri)


def _tracking_error(tracking_uri: str, doing: str, error: Exception) -> TrackingError:
    reason = " ".join(redact(str(error)).split())
    return TrackingError(f"tracking.uri={redact(tracking_uri)}: {doing} failed ({reason[:300]})")


# -- experiments and runs ---------------------------------------------------------------------------------------------
def ensure_experiment(name: str, tracking_uri: str) -> str:
    """The id of the experiment `name`, created when missing (model development: KIND_TAGS); with a sqlite store its
    artifacts go to `mlartifacts/` beside the database (runs/mlartifacts by default) as a file:// URI."""
    with http_settings(UP_FRONT_ENV):
        try:
            mlflow_client = client(tracking_uri)
            experiment = mlflow_client.get_experiment_by_name(name)
            if experiment is None:
                artifact_location = None
                database = sqlite_path(tracking_uri)
                if database is not None:
                    folder = re.sub(r"[^\w.-]+", "_", name)
                    artifact_location = (database.parent / "mlartifacts" / folder).as_uri()
                try:
                    return mlflow_client.create_experiment(name, artifact_location=artifact_location, tags=KIND_TAGS)
                except Exception:  # another process created it first
                    experiment = mlflow_client.get_experiment_by_name(name)
                    if experiment is None:
                        raise
            mark_model_development(mlflow_client, experiment)  # one created before knetlab tagged them
        except TrackingError:
            raise
        except Exception as error:
            raise _tracking_error(tracking_uri, f"opening experiment {name!r}", error) from None
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(f"tracking.experiment={name}: the experiment is deleted in {redact(tracking_uri)}; "
                            f"restore it (mlflow experiments restore --experiment-id {experiment.experiment_id}) "
                            "or choose another tracking.experiment")
    return experiment.experiment_id


def create_run(tracking_uri: str, experiment_id: str, run_name: str, tags: Mapping[str, Any],
               parent_run_id: str | None = None) -> str:
    """A new run (a child of `parent_run_id` when given: tag mlflow.parentRunId); returns its id."""
    tags = {str(k): redact(str(v))[:TAG_VALUE_LIMIT] for k, v in tags.items()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    with http_settings(UP_FRONT_ENV):
        try:
            run = client(tracking_uri).create_run(experiment_id, tags=tags, run_name=run_name)
        except Exception as error:
            raise _tracking_error(tracking_uri, f"creating run {run_name!r}", error) from None
    return run.info.run_id


def find_run(tracking_uri: str, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    """The newest run of the experiment carrying all `tags`, or None."""
    def quoted(value: str) -> str:
        return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"

    query = " and ".join(f"tags.`{k}` = {quoted(v)}" for k, v in tags.items())
    with http_settings(UP_FRONT_ENV):
        try:
            runs = client(tracking_uri).search_runs([experiment_id], filter_string=query, max_results=1,
                                                    order_by=["attributes.start_time DESC"])
        except Exception as error:
            raise _tracking_error(tracking_uri, "searching runs", error) from None
    return runs[0].info.run_id if runs else None


def set_run_status(tracking_uri: str, run_id: str, status: str) -> bool:
    """Mark a run FINISHED, FAILED or KILLED (with its end time), or RUNNING again; a tracking server that does not
    answer is reported on stdout, not raised: the run's results are already logged."""
    with http_settings(UP_FRONT_ENV):
        try:
            if status == "RUNNING":
                client(tracking_uri).update_run(run_id, status=status)
            else:
                client(tracking_uri).set_terminated(run_id, status=status)
            return True
        except Exception as error:
            reason = _tracking_error(tracking_uri, "it", error)
            print(f"[knetlab] could not mark MLflow run {run_id} {status}: {reason}", flush=True)
            return False


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric of a run, in the order the store returns them."""
    return [(m.step, m.value) for m in client(tracking_uri).get_metric_history(run_id, key)]


# -- params -----------------------------------------------------------------------------------------------------------
def _as_lists(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value


def param_value(key: str, value: Any) -> str:
    """A param value as MLflow stores it: text (sequences as "[0.9, 0.999]"), secrets redacted (by key name and in
    URIs), at most 6000 characters."""
    text = str(_as_lists(value))
    if value not in (None, "") and SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    return redact(text)[:PARAM_VALUE_LIMIT]


def log_params(mlflow_client, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params right away (the driver, before workers start), redacted and cut as `param_value`."""
    from mlflow.entities import Param

    with http_settings(UP_FRONT_ENV):
        mlflow_client.log_batch(run_id, params=[Param(str(k), param_value(str(k), v)) for k, v in params.items()])


# -- RunLogger --------------------------------------------------------------------------------------------------------
class RunLogger:
    """Rank 0's MLflow logger for one run: metrics, tags and artifacts.

    Calls return at once: records are appended to `spool_dir/spool.jsonl` and sent in order by a background thread
    (metrics in `log_batch` calls). While the server does not answer, the thread retries with backoff (0.5 s doubling
    to `max_retry_interval_s`); `flush()` tries at once and waits; `close()` waits up to `timeout_s`, then leaves the
    spool on disk and says where it is; the next logger with the same `spool_dir` sends it. Metric steps at or below
    the run's last logged step for that key are skipped, so a re-run iteration is never logged twice. A request the
    server rejects (e.g. an invalid key) is dropped with a message instead of blocking the rest.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, spool_dir: str | Path, max_retry_interval_s: float = 10.0):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = Path(spool_dir)
        self.spool_file = self.spool_dir / SPOOL_FILE
        self.artifact_dir = self.spool_dir / "artifacts"
        self.max_retry_interval_s = max_retry_interval_s
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._sender = SpoolSender(client(tracking_uri), self.spool_file, self.artifact_dir)
        self._lock = threading.Lock()  # guards the spool file and the state below
        self._wake = threading.Condition(self._lock)
        self._offset = 0  # bytes of the spool file already sent
        self._retry_at = 0.0
        self._backoff = 0.5
        self._sending = False
        self._closing = False
        self._closed = False
        self._down_since: float | None = None
        if self.spool_file.exists() and not self.spool_file.read_bytes().endswith(b"\n"):
            with open(self.spool_file, "ab") as f:  # a logger that died mid-line: keep our records apart
                f.write(b"\n")
        # Set here, never from the sender thread: a setenv racing another thread's getenv in C (OpenCV's) segfaults.
        self._http_settings = http_settings(FAST_FAIL_ENV)
        self._http_settings.__enter__()
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-run-logger-{run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Records the server rejected (bad key or value, unknown run)."""
        return self._sender.dropped

    # -- public API (called on the training thread; never waits for the server) -------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self._append({"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                      "metrics": {str(k): float(v) for k, v in metrics.items()}})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._append({"kind": "tags", "tags": {str(k): redact(str(v)) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file or directory; it is copied into the spool first, so the caller may delete it at once."""
        source = Path(path)
        kept = self.artifact_dir / uuid.uuid4().hex / source.name
        kept.parent.mkdir(parents=True)
        if source.is_dir():
            shutil.copytree(source, kept)
        else:
            shutil.copy2(source, kept)
        self._append({"kind": "artifact", "path": str(kept), "artifact_path": artifact_path})

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Try to send everything now; True when nothing is left to send after at most `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        with self._wake:
            self._retry_at = 0.0
            self._wake.notify_all()
            while not self._delivered():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    break
                self._wake.wait(min(remaining, 0.5))
            return self._delivered()

    def close(self, timeout_s: float = 30.0) -> bool:
        """Send what is left, waiting at most `timeout_s` (with retries); then stop. When the server is still
        unreachable the spool stays on disk, with a message naming it. True when everything was delivered."""
        if self._closed:
            with self._lock:
                return self._delivered()
        delivered = self.flush(timeout_s)
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        self._thread.join(timeout=max(1.0, timeout_s))
        self._closed = True
        self._http_settings.__exit__(None, None, None)
        if not delivered:
            pending = self._pending_records()
            print(f"[knetlab] MLflow at {redact(self.tracking_uri)} did not answer: {pending} record(s) of run "
                  f"{self.run_id} are kept in {self.spool_file}; they are sent when the run is resumed (a RunLogger "
                  f"with spool_dir={self.spool_dir})", flush=True)
        return delivered

    # -- the spool ----------------------------------------------------------------------------------------------------
    def _append(self, record: dict) -> None:
        if self._closed:
            raise RuntimeError(f"RunLogger for run {self.run_id} is closed")
        line = json.dumps({"run": self.run_id, **record}, separators=(",", ":")) + "\n"
        with self._wake:
            with open(self.spool_file, "a") as f:
                f.write(line)
            self._wake.notify_all()

    def _delivered(self) -> bool:  # with the lock held
        return not self._sending and not self.spool_file.exists()

    def _pending_records(self) -> int:
        with self._lock:
            if not self.spool_file.exists():
                return 0
            with open(self.spool_file, "rb") as f:
                f.seek(self._offset)
                return sum(1 for line in f if line.strip())

    def _sent_up_to(self, offset: int) -> None:
        with self._lock:
            self._offset = offset

    # -- the sending thread -------------------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while True:
                    if self._closing:
                        return
                    has_work = self.spool_file.exists()
                    wait = self._retry_at - time.monotonic()
                    if has_work and wait <= 0:
                        break
                    self._wake.wait(timeout=wait if has_work else None)
                try:
                    records = read_pending(self.spool_file, self._offset)
                except OSError as error:
                    records, error_reading = [], error
                else:
                    error_reading = None
                    if not records:  # everything in the file was sent: it goes
                        with contextlib.suppress(FileNotFoundError):
                            self.spool_file.unlink()
                        self._offset = 0
                        self._wake.notify_all()
                        continue
                self._sending = True
            try:
                if error_reading is not None:
                    error = error_reading
                else:
                    error = self._sender.send(records, self._sent_up_to)
            except Exception as unexpected:  # the thread must not die: the spool keeps the records
                error = unexpected
            finally:
                with self._wake:
                    self._sending = False
                    self._wake.notify_all()
            self._after_attempt(error)

    def _after_attempt(self, error: Exception | None) -> None:
        if error is None:
            if self._down_since is not None:
                print(f"[knetlab] MLflow at {redact(self.tracking_uri)} answers again after "
                      f"{time.monotonic() - self._down_since:.0f}s; spooled records sent", flush=True)
                self._down_since = None
            self._backoff = 0.5
            return
        if self._down_since is None:
            self._down_since = time.monotonic()
            print(f"[knetlab] MLflow at {redact(self.tracking_uri)} unreachable "
                  f"({' '.join(redact(str(error)).split())[:200]}); records are kept in {self.spool_file} "
                  "and sent when it answers", flush=True)
        with self._wake:
            self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_interval_s)
