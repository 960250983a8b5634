"""The spool behind `tracking.RunLogger` and its delivery to MLflow: records (metrics at a step, artifact files)
are JSON lines in `spool.jsonl`, artifact files copied beside it; `SpoolSender` sends them in order, consecutive
metrics of a run merged into `log_batch` calls, steps the run already has skipped, and a record the server rejects
dropped with a message instead of blocking the ones after it."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from knetlab.platform.storage import redact

SPOOL_FILE = "spool.jsonl"
MAX_BATCH_ITEMS = 1000  # metrics per log_batch request (MLflow's limit)


def run_spool_dir(storage_uri: str, run_name: str) -> Path:
    """Where rank 0 of run `run_name` spools its MLflow records: beside local checkpoints, or for s3:// storage in the
    temp dir of rank 0's node (not the temp dir's parent, i.e. "/")."""
    root = Path(tempfile.gettempdir()) if storage_uri.startswith("s3://") else Path(storage_uri).parent
    return root / "mlflow-spool" / run_name


def is_permanent(error: Exception) -> bool:
    """An error that retrying cannot fix (a bad request, an unknown run, a missing file), as opposed to an
    unreachable or overloaded server."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, FileNotFoundError):
        return True
    status = None
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    elif getattr(error, "response", None) is not None:
        status = getattr(error.response, "status_code", None)
    return status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429)


def read_pending(spool_file: Path, offset: int, limit: int = 2000) -> list[tuple[dict, int]]:
    """(record, its end offset) for up to `limit` records after byte `offset` of the spool file."""
    if not spool_file.exists():
        return []
    records = []
    with open(spool_file, "rb") as f:
        f.seek(offset)
        position = offset
        for line in f:
            if not line.endswith(b"\n"):
                break  # written by a logger that died mid-line: the rest is unreadable anyway
            position += len(line)
            if line.strip():
                try:
                    records.append((json.loads(line), position))
                except json.JSONDecodeError:
                    print(f"[knetlab] skipping an unreadable line in {spool_file}", flush=True)
            if len(records) >= limit:
                break
    return records


def group_records(records: list[tuple[dict, int]], start: int) -> list[tuple[dict, int]]:
    """Consecutive metric records of the same run from `start`, to send in one request (an artifact goes alone)."""
    first = records[start][0]
    group = [records[start]]
    if first["kind"] != "metrics":
        return group
    items = len(first["metrics"])
    for record, end in records[start + 1:]:
        if record["run"] != first["run"] or record["kind"] != "metrics" or items + len(record["metrics"]) > \
                MAX_BATCH_ITEMS:
            break
        group.append((record, end))
        items += len(record["metrics"])
    return group


def split_record(record: dict) -> list[dict]:
    """A record as one record per metric."""
    if record["kind"] != "metrics":
        return [record]
    return [{**record, "metrics": {key: value}} for key, value in record["metrics"].items()]


def describe_record(record: dict) -> str:
    if record["kind"] == "artifact":
        return f"artifact {Path(record['path']).name}"
    key = next(iter(record.get("metrics", {})), "?")
    return f"metric {key!r} at step {record.get('step')}"


class SpoolSender:
    """Sends spooled records of runs to one MLflow store (the caller holds the spool file and its offset)."""

    def __init__(self, mlflow_client: Any, spool_file: Path, artifact_dir: Path) -> None:
        self.client = mlflow_client
        self.spool_file = spool_file
        self.artifact_dir = artifact_dir
        self.last_step: dict[str, dict[str, int]] = {}  # run id -> metric key -> last logged step
        self.dropped = 0  # records the server rejected (bad key or value, unknown run)

    def send(self, records: list[tuple[dict, int]], on_sent: Callable[[int], None]) -> Exception | None:
        """Send `records` in order, calling `on_sent(end offset)` after each request; the error that stopped it
        (the server is unreachable) or None."""
        index = 0
        while index < len(records):
            group = group_records(records, index)
            try:
                try:
                    self._send_group([record for record, _ in group])
                except Exception as error:
                    if not is_permanent(error):
                        raise
                    self._send_singly([record for record, _ in group], error)
            except Exception as error:
                return error
            on_sent(group[-1][1])
            index += len(group)
        return None

    def _send_singly(self, group: list[dict], error: Exception) -> None:
        """A group the server rejected: each metric alone, dropping only those it rejects."""
        singles = [single for record in group for single in split_record(record)]
        if len(singles) == 1:
            self._drop(singles[0], error)
            return
        for single in singles:
            try:
                self._send_group([single])
            except Exception as single_error:
                if not is_permanent(single_error):
                    raise
                self._drop(single, single_error)

    def _drop(self, record: dict, error: Exception) -> None:
        self.dropped += 1
        if self.dropped <= 5:
            print(f"[knetlab] MLflow rejected {describe_record(record)} for run {record['run']}, dropped: "
                  f"{' '.join(redact(str(error)).split())[:300]}", flush=True)
        elif self.dropped == 6:
            print("[knetlab] MLflow rejected more records; see RunLogger.dropped", flush=True)
        if record["kind"] == "artifact":
            self._remove_copy(Path(record["path"]))

    def _remove_copy(self, kept: Path) -> None:
        if kept.parent.parent == self.artifact_dir:  # the spool's own copy, not a file of the caller's
            shutil.rmtree(kept.parent, ignore_errors=True)

    def _last_steps(self, run_id: str) -> dict[str, int]:
        """The last logged step of every metric of the run, read once (one get_run: the latest value of each metric
        carries the highest step)."""
        if run_id not in self.last_step:
            run = self.client.get_run(run_id)
            latest = getattr(run.data, "_metric_objs", None)
            if latest is not None:
                self.last_step[run_id] = {m.key: m.step for m in latest}
            else:  # another MLflow version: the history of each metric
                self.last_step[run_id] = {
                    key: max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
                    for key in run.data.metrics}
        return self.last_step[run_id]

    def _send_group(self, group: list[dict]) -> None:
        from mlflow.entities import Metric

        run_id, kind = group[0]["run"], group[0]["kind"]
        if kind == "metrics":
            last = dict(self._last_steps(run_id))
            metrics = []
            for record in group:
                for key, value in record["metrics"].items():
                    if record["step"] > last.get(key, -(2**62)):
                        metrics.append(Metric(key, value, record["timestamp"], record["step"]))
                        last[key] = record["step"]
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)
            self.last_step[run_id] = last
        elif kind == "tags":
            for record in group:
                for key, value in record["tags"].items():
                    self.client.set_tag(run_id, key, value)
        elif kind == "artifact":
            for record in group:
                self.client.log_artifact(run_id, record["path"], artifact_path=record["artifact_path"])
                self._remove_copy(Path(record["path"]))
        else:  # e.g. params from an older knetlab's spool: the driver logs those up front now
            print(f"[knetlab] unknown record kind {kind!r} in {self.spool_file}, skipped", flush=True)
