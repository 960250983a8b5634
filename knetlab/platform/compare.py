"""The results tables of an experiment (or one sweep) read from MLflow: one table per task family among the runs, in
the columns the family names (`task_family.ResultTable`: the K-Net ADE20K table for semantic runs, the K-Net README's
panoptic and instance tables for COCO runs), each metric the mean ± std over a configuration's runs (its seeds)."""

from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knetlab.platform.task_family import ResultTable
from knetlab.platform.tracking import (
    HYPERPARAMETERS_TAG,
    SWEEP_ID_TAG,
    TRIAL_STATUS_TAG,
    UP_FRONT_ENV,
    TrackingError,
    client,
    http_settings,
    resolve_tracking_uri,
)
from knetlab.redact import redact

TASK_TAG = "task"  # the model's task family, set on every training run (runs from before it are semantic)
FPS_COLUMN = "Inf time (fps)"  # every table's plot puts its score against it


class CompareError(ValueError):
    """No experiment or runs to compare, or an unknown sort column."""


@dataclass
class Table:
    """One task family's table: its columns and its rows (one per configuration)."""

    task: str
    spec: ResultTable
    rows: list[dict[str, Any]]


def mean_std(values: list[float]) -> tuple[float, float] | None:
    values = [v for v in values if math.isfinite(v)]  # NaN: e.g. a mask AP with no ground truth in its size range
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_cell(stat: tuple[float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


@contextmanager
def reading_mlflow(tracking_uri: str) -> Iterator[None]:
    """MLflow calls that fail fast when the server does not answer, and fail as one line without credentials."""
    with http_settings(UP_FRONT_ENV):
        try:
            yield
        except (CompareError, TrackingError):
            raise
        except Exception as error:
            reason = " ".join(redact(str(error)).split())[:300]
            raise TrackingError(f"tracking URI {redact(tracking_uri)}: reading MLflow failed ({reason})") from None


def find_experiment(mlflow_client: Any, tracking_uri: str, experiment: str) -> str:
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"MLflow experiment {experiment!r} does not exist at {redact(tracking_uri)}")
    return found.experiment_id


def resolve_parent(mlflow_client: Any, experiment_id: str, parent: str) -> str:
    """A sweep's parent run id from its run id or its sweep id (e.g. smoke-20261129-235326)."""
    if re.fullmatch(r"[0-9a-f]{32}", parent):
        return parent
    found = mlflow_client.search_runs([experiment_id], max_results=1,
                                      filter_string=f"tags.`{SWEEP_ID_TAG}` = '{parent}'")
    if not found:
        raise CompareError(f"--parent {parent}: neither a run id nor a sweep id in this experiment")
    return found[0].info.run_id


def fetch_runs(tracking_uri: str, experiment: str, parent_run_id: str | None, filter_string: str | None) -> list:
    mlflow_client = client(tracking_uri)
    experiment_id = find_experiment(mlflow_client, tracking_uri, experiment)
    query = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"] if parent_run_id else []
    if filter_string:
        query.append(filter_string)
    return mlflow_client.search_runs([experiment_id], filter_string=" and ".join(query), max_results=5000)


def counts_in_table(run: Any) -> bool:
    """Failed runs and trials a scheduler stopped early (their last metrics are from fewer iterations) are left out."""
    return run.info.status != "FAILED" and not run.data.tags.get(TRIAL_STATUS_TAG, "").startswith("STOPPED")


def is_training_run(run: Any) -> bool:
    """A training run (parent runs and foreign runs have no model tags)."""
    return "head" in run.data.tags


def group_rows(runs: list, table: ResultTable) -> list[dict[str, Any]]:
    """One row per configuration (the table's labels, the iterations and a sweep's grid/search values), the metrics'
    mean and std over its runs."""
    groups: dict[tuple, list] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        key = (table.labels(tags, params), params.get("trainer.max_iters"), tags.get(HYPERPARAMETERS_TAG, ""))
        groups.setdefault(key, []).append(run)
    rows = []
    for (labels, _, hyperparameters), members in groups.items():
        row: dict[str, Any] = dict(zip(table.label_columns, labels))
        if hyperparameters:  # a sweep's grid/search values make configurations of their own
            row[table.setting_column] += f" ({hyperparameters})"
        for column, metric in table.metric_columns:
            row[column] = mean_std([r.data.metrics[metric] for r in members if metric in r.data.metrics])
        row.update(runs=len(members), run_ids=[r.info.run_id for r in members])
        rows.append(row)
    return rows


def build_tables(runs: list) -> tuple[list[Table], list[str]]:
    """The tables of the runs' task families (in TASK_FAMILIES' order), and the tasks no family knows."""
    from knetlab.platform.tasks import TASK_FAMILIES, family_named

    by_task: dict[str, list] = {}
    for run in runs:
        if is_training_run(run) and counts_in_table(run):
            by_task.setdefault(run.data.tags.get(TASK_TAG, "semantic"), []).append(run)
    tables = []
    for task in TASK_FAMILIES:
        if task in by_task:
            spec = family_named(task).table
            tables.append(Table(task, spec, group_rows(by_task[task], spec)))
    return tables, sorted(set(by_task) - set(TASK_FAMILIES))


def sort_rows(table: Table, sort: str | None) -> None:
    """Best first by a metric column (rows without it last), by a label column, or by the labels."""
    if not sort or sort not in table.spec.columns:
        table.rows.sort(key=lambda r: tuple(str(r[c]) for c in table.spec.label_columns))
        return

    def key(row: dict[str, Any]) -> Any:
        value = row[sort]
        return (0, -value[0]) if isinstance(value, tuple) else (1, str(value))

    table.rows.sort(key=key)


def cells(row: dict[str, Any], table: ResultTable) -> list[str]:
    return [*(str(row[c]) for c in table.label_columns), *(format_cell(row[c]) for c, _ in table.metric_columns),
            str(row["runs"])]


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (the comparison, a sweep's summary) from its header and rows of cell texts."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table as CSV."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(columns)
    writer.writerows(rows)
    return out.getvalue()


def comparison_figure(table: Table) -> Any:
    """The table's score (mIoU, PQ, mask AP) against fps, one point (mean, std as error bars) per row; a matplotlib
    figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    score = table.spec.score_column
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in table.rows:
        if row[score] is None or row[FPS_COLUMN] is None:
            continue
        (fps, fps_std), (value, value_std) = row[FPS_COLUMN], row[score]
        axes.errorbar(fps, value, xerr=fps_std, yerr=value_std, fmt="o",
                      label=" ".join(str(row[c]) for c in table.spec.label_columns))
    axes.set_xlabel(FPS_COLUMN)
    axes.set_ylabel(score)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def file_stem(table: Table, tables: list[Table]) -> str:
    """comparison.*, or comparison-<task>.* when the runs hold several task families."""
    return "comparison" if len(tables) == 1 else f"comparison-{table.task}"


def comparison_texts(tables: list[Table]) -> dict[str, str]:
    """{file name: content} of each table as Markdown and CSV."""
    texts = {}
    for table in tables:
        body = [cells(row, table.spec) for row in table.rows]
        stem = file_stem(table, tables)
        texts[f"{stem}.md"] = markdown_table(table.spec.columns, body)
        texts[f"{stem}.csv"] = csv_text(table.spec.columns, body)
    return texts


def write_outputs(tables: list[Table], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in comparison_texts(tables).items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    for table in tables:
        figure = comparison_figure(table)
        paths.append(out_dir / f"{file_stem(table, tables)}.png")
        figure.savefig(paths[-1])
        plt.close(figure)
    return paths


def log_outputs(tables: list[Table], tracking_uri: str, run_id: str) -> None:
    """The tables (Markdown, CSV) and the plots as the run's `comparison/` artifacts."""
    import matplotlib.pyplot as plt

    mlflow_client = client(tracking_uri)
    for name, text in comparison_texts(tables).items():
        mlflow_client.log_text(run_id, text, f"comparison/{name}")
    for table in tables:
        figure = comparison_figure(table)
        mlflow_client.log_figure(run_id, figure, f"comparison/{file_stem(table, tables)}.png")
        plt.close(figure)


def run_compare(experiment: str | None = None, parent_run_id: str | None = None, out_dir: str | None = None,
                log: bool = False, filter_string: str | None = None, sort: str | None = None,
                tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Print the tables; write Markdown, CSV and PNG to `out_dir` when given; with `log`, attach them to the parent
    run. Returns every table's rows (each with its "task")."""
    if log and not parent_run_id:
        raise CompareError("--log needs --parent RUN_ID (the sweep's parent run)")
    uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or "knetlab"
    with reading_mlflow(uri):
        if parent_run_id:
            mlflow_client = client(uri)
            parent_run_id = resolve_parent(mlflow_client, find_experiment(mlflow_client, uri, experiment),
                                           parent_run_id)
        runs = fetch_runs(uri, experiment, parent_run_id, filter_string)
    tables, unknown_tasks = build_tables(runs)
    if not tables:
        raise CompareError(f"no trained runs in experiment {experiment!r}"
                           + (f" under parent run {parent_run_id}" if parent_run_id else ""))
    columns = {column for table in tables for column in table.spec.columns}
    if sort and sort not in columns:
        raise CompareError(f"--sort {sort!r}: not a column; valid: {', '.join(sorted(columns))}")
    for table in tables:
        sort_rows(table, sort)
        if len(tables) > 1:
            print(f"\n{table.task}:")
        print(markdown_table(table.spec.columns, [cells(row, table.spec) for row in table.rows]), end="")
    left_out = sum(1 for run in runs if is_training_run(run) and not counts_in_table(run))
    if left_out:
        print(f"({left_out} failed or early-stopped run(s) left out)")
    if unknown_tasks:
        print(f"(runs of task(s) {', '.join(unknown_tasks)} left out: no table for them in this knetlab)")
    if out_dir:
        write_outputs(tables, Path(out_dir))
    if log:
        with reading_mlflow(uri):
            log_outputs(tables, uri, parent_run_id)
    return [{"task": table.task, **row} for table in tables for row in table.rows]
