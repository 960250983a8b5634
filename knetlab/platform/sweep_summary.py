"""The end of a sweep: each trial's status (finished, stopped by the scheduler at an iteration, failed, or left
unfinished by an interrupt) and figures, its child run marked accordingly, the summary printed and attached to the
parent run (Markdown and CSV) together with the comparison table."""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable
from typing import Any

from knetlab.platform.compare import CompareError, csv_text, markdown_table, run_compare
from knetlab.platform.ray_internals import tune_trials
from knetlab.platform.sweep_spec import SweepSpec
from knetlab.platform.tracking import (
    FIRST_ITERATION_METRIC,
    SETTING_TAG,
    TRIAL_ID_TAG,
    TRIAL_STATUS_TAG,
    client,
    metric_history,
    set_run_status,
)
from knetlab.platform.trainer import deliver_leftover_spool


def summary_columns(metric: str) -> tuple[str, ...]:
    """The summary's columns, with the sweep's scheduler metric (val/mIoU, val/PQ, ...)."""
    return ("trial", "setting", "seed", "status", "iteration", metric, "first_iter_s", "run_id")


def deliver_leftover_spools(trials: Iterable[tuple[str, str]], sweep_id: str, storage_uri: str,
                            tracking_uri: str) -> int:
    """Send what the trials that ended without finishing (stopped by the scheduler, failed) left in their MLflow spool
    on this node: a stopped trial's workers are killed, often before they sent their last validation. `trials` are
    (trial id, Tune status) pairs; the number of trials whose spool was delivered."""
    return sum(deliver_leftover_spool(storage_uri, f"{sweep_id}-{trial_id}", tracking_uri, timeout_s=60.0)
               for trial_id, status in trials if status in ("TERMINATED", "ERROR"))


def summarize(results: Any, spec: SweepSpec, sweep_id: str, parent_id: str, tracking_uri: str, experiment: str,
              started: float, storage_uri: str, interrupted: Collection[str] = ()) -> dict[str, Any]:
    """Per-trial status and figures (also marking early-stopped and interrupted trials' child runs), printed and
    attached to the parent run with the comparison table. `interrupted`: the trials a Ctrl-C cut short, which Tune
    marks TERMINATED like the ones the scheduler stopped (trial_outcomes.py)."""
    metric = spec.scheduler["metric"]
    columns = summary_columns(metric)
    deliver_leftover_spools([(t.trial_id, t.status) for t in tune_trials(results)], sweep_id, storage_uri,
                            tracking_uri)
    mlflow_client = client(tracking_uri)
    parent = mlflow_client.get_run(parent_id)
    sweep_start = parent.info.start_time / 1000.0
    children = {r.data.tags.get(TRIAL_ID_TAG): r for r in mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=5000)}
    trials = {trial.trial_id: trial for trial in tune_trials(results)}
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
        elif trial_id in interrupted:  # continued by `knetlab sweep --resume` from its last checkpoint
            status = f"INTERRUPTED at {last}"
        elif trial.status == "TERMINATED":  # ended by the scheduler
            val_steps = [step for step, _ in metric_history(tracking_uri, run.info.run_id, metric)]
            last = max([last, *val_steps])
            status = f"STOPPED at {last}"
        else:
            status = trial.status  # ERROR, or PENDING/RUNNING/PAUSED when the sweep was interrupted
        first_iter = [value for _, value in metric_history(tracking_uri, run.info.run_id, FIRST_ITERATION_METRIC)]
        rows.append({
            "trial": trial_id, "setting": run.data.tags.get(SETTING_TAG, ""),
            "seed": run.data.params.get("trainer.seed"), "status": status, "iteration": last or None,
            metric: run.data.metrics.get(metric),
            "first_iter_s": round(min(first_iter) - sweep_start, 1) if first_iter else None,
            "run_id": run.info.run_id})
        if status.startswith(("STOPPED", "INTERRUPTED")) or status in ("FINISHED", "ERROR"):
            mlflow_client.set_tag(run.info.run_id, TRIAL_STATUS_TAG, status)
        if status.startswith(("STOPPED", "INTERRUPTED")) or status == "ERROR":
            set_run_status(tracking_uri, run.info.run_id, "KILLED" if status != "ERROR" else "FAILED")
    wall = time.time() - started
    print(f"[knetlab] sweep {sweep_id}: {len(rows)} trial runs, {wall:.0f} s in this driver", flush=True)
    print(summary_markdown(rows, metric), end="", flush=True)
    mlflow_client.log_text(parent_id, summary_markdown(rows, metric), "sweep/sweep_summary.md")
    mlflow_client.log_text(parent_id, csv_text(columns, [[row[k] for k in columns] for row in rows]),
                           "sweep/sweep_summary.csv")
    mlflow_client.log_metric(parent_id, "sweep/driver_wall_time_s", wall)
    mlflow_client.log_metric(parent_id, "sweep/trials_finished", sum(r["status"] == "FINISHED" for r in rows))
    try:
        run_compare(experiment=experiment, parent_run_id=parent_id, log=True, tracking_uri=tracking_uri)
    except CompareError as error:
        print(f"[knetlab] no comparison table: {error}", flush=True)
    return {"sweep_id": sweep_id, "parent_run_id": parent_id, "trials": rows, "wall_time_s": wall}


def summary_markdown(rows: list[dict[str, Any]], metric: str = "val/mIoU") -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    columns = summary_columns(metric)
    return markdown_table(columns, [[cell(row[k]) for k in columns] for row in rows])
