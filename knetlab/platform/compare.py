"""The results table of an experiment (or one sweep) read from MLflow, in the K-Net table's format."""

from __future__ import annotations

import csv
import io
import re
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from knetlab.platform.tracking import (
    HYPERPARAMETERS_TAG,
    SWEEP_ID_TAG,
    TRIAL_STATUS_TAG,
    client,
    resolve_tracking_uri,
)

COLUMNS = ("Method", "Backbone", "Crop Size", "Lr schd", "Mem (GB)", "Inf time (fps)", "mIoU", "mIoU(ms+flip)", "runs")
METRICS = {"Mem (GB)": "bench/mem_gb", "Inf time (fps)": "bench/fps", "mIoU": "val/mIoU",
           "mIoU(ms+flip)": "val/mIoU_msflip"}
METHOD_NAMES = {"fcn": "KNet + FCN", "psp": "KNet + PSPNet", "pspnet": "KNet + PSPNet", "aspp": "KNet + DeepLabV3",
                "deeplabv3": "KNet + DeepLabV3", "upernet": "KNet + UperNet"}
BACKBONE_NAMES = {"r50-d8": "R-50-D8", "resnet50-d8": "R-50-D8", "swin-t": "Swin-T", "swin_t": "Swin-T",
                  "swin-l": "Swin-L", "swin_l": "Swin-L"}


class CompareError(ValueError):
    """No experiment or runs to compare, or an unknown sort column."""


def method_name(head: str | None) -> str:
    return METHOD_NAMES.get((head or "").lower(), head or "-")


def backbone_name(backbone: str | None) -> str:
    return BACKBONE_NAMES.get((backbone or "").lower(), backbone or "-")


def mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_cell(stat: tuple[float, float] | None, scale: float = 1.0, digits: int = 2) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def find_experiment(mlflow_client: Any, tracking_uri: str, experiment: str) -> str:
    found = mlflow_client.get_experiment_by_name(experiment)
    if found is None:
        raise CompareError(f"MLflow experiment {experiment!r} does not exist at {tracking_uri}")
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
    """Failed runs and trials a scheduler stopped early (their last mIoU is from fewer iterations) are left out."""
    return run.info.status != "FAILED" and not run.data.tags.get(TRIAL_STATUS_TAG, "").startswith("STOPPED")


def group_rows(runs: list) -> list[dict[str, Any]]:
    """One row per configuration (head, backbone, crop, schedule), the metrics' mean and std over its runs."""
    groups: dict[tuple, list] = {}
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if "head" not in tags:  # parent runs and foreign runs have no model tags
            continue
        if not counts_in_table(run):
            continue
        # A sweep's grid/search values make configurations of their own.
        key = (tags.get("head"), tags.get("backbone"), tags.get("crop"), params.get("trainer.max_iters"),
               tags.get(HYPERPARAMETERS_TAG, ""))
        groups.setdefault(key, []).append(run)
    rows = []
    for (head, backbone, crop, iters, hyperparameters), members in groups.items():
        method = method_name(head) + (f" ({hyperparameters})" if hyperparameters else "")
        row: dict[str, Any] = {"Method": method, "Backbone": backbone_name(backbone),
                               "Crop Size": f"{crop}x{crop}" if crop else "-", "Lr schd": iters or "-",
                               "runs": len(members), "run_ids": [r.info.run_id for r in members]}
        for column, metric in METRICS.items():
            row[column] = mean_std([r.data.metrics[metric] for r in members if metric in r.data.metrics])
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], sort: str | None) -> list[dict[str, Any]]:
    if not sort:
        return sorted(rows, key=lambda r: (r["Method"], r["Backbone"], r["Crop Size"]))
    if sort not in COLUMNS:
        raise CompareError(f"--sort {sort!r}: not a column; valid: {', '.join(COLUMNS)}")
    def key(row: dict[str, Any]) -> Any:
        value = row[sort]
        return (0, -value[0]) if isinstance(value, tuple) else (1, str(value))
    return sorted(rows, key=key)


def cells(row: dict[str, Any]) -> list[str]:
    return [str(row["Method"]), str(row["Backbone"]), str(row["Crop Size"]), str(row["Lr schd"]),
            format_cell(row["Mem (GB)"]), format_cell(row["Inf time (fps)"]),
            format_cell(row["mIoU"]), format_cell(row["mIoU(ms+flip)"]), str(row["runs"])]


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


def comparison_figure(rows: list[dict[str, Any]]) -> Any:
    """mIoU against fps, one point (mean, std as error bars) per row; a matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for row in rows:
        if row["mIoU"] is None or row["Inf time (fps)"] is None:
            continue
        (fps, fps_std), (miou, miou_std) = row["Inf time (fps)"], row["mIoU"]
        axes.errorbar(fps, miou, xerr=fps_std, yerr=miou_std, fmt="o",
                      label=f"{row['Method']} {row['Backbone']} {row['Crop Size']}")
    axes.set_xlabel("Inf time (fps)")
    axes.set_ylabel("mIoU")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def comparison_texts(rows: list[dict[str, Any]]) -> dict[str, str]:
    """{file name: content} of the table as Markdown and CSV."""
    table = [cells(row) for row in rows]
    return {"comparison.md": markdown_table(COLUMNS, table), "comparison.csv": csv_text(COLUMNS, table)}


def write_outputs(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in comparison_texts(rows).items():
        (out_dir / name).write_text(text)
        paths.append(out_dir / name)
    figure = comparison_figure(rows)
    figure.savefig(out_dir / "comparison.png")
    plt.close(figure)
    return [*paths, out_dir / "comparison.png"]


def log_outputs(rows: list[dict[str, Any]], tracking_uri: str, run_id: str) -> None:
    """The table (Markdown, CSV) and the plot as the run's `comparison/` artifacts."""
    import matplotlib.pyplot as plt

    mlflow_client = client(tracking_uri)
    for name, text in comparison_texts(rows).items():
        mlflow_client.log_text(run_id, text, f"comparison/{name}")
    figure = comparison_figure(rows)
    mlflow_client.log_figure(run_id, figure, "comparison/comparison.png")
    plt.close(figure)


def run_compare(experiment: str | None = None, parent_run_id: str | None = None, out_dir: str | None = None,
                log: bool = False, filter_string: str | None = None, sort: str | None = None,
                tracking_uri: str | None = None, register_best: str | None = None,
                alias: str | None = "champion") -> list[dict[str, Any]]:
    """Print the table; write Markdown, CSV and PNG to `out_dir` when given; with `log`, attach them to the parent
    run; with `register_best` (a registered model name), register the top row's best run's model with `alias`."""
    if log and not parent_run_id:
        raise CompareError("--log needs --parent RUN_ID (the sweep's parent run)")
    uri = resolve_tracking_uri(tracking_uri)
    experiment = experiment or "knetlab"
    if parent_run_id:
        mlflow_client = client(uri)
        parent_run_id = resolve_parent(mlflow_client, find_experiment(mlflow_client, uri, experiment), parent_run_id)
    runs = fetch_runs(uri, experiment, parent_run_id, filter_string)
    rows = sort_rows(group_rows(runs), sort or ("mIoU" if register_best else None))
    if not rows:
        raise CompareError(f"no trained runs in experiment {experiment!r}"
                           + (f" under parent run {parent_run_id}" if parent_run_id else ""))
    print(markdown_table(COLUMNS, [cells(row) for row in rows]), end="")
    left_out = sum(1 for run in runs if "head" in run.data.tags and not counts_in_table(run))
    if left_out:
        print(f"({left_out} failed or early-stopped run(s) left out)")
    if out_dir:
        write_outputs(rows, Path(out_dir))
    if log:
        log_outputs(rows, uri, parent_run_id)
    if register_best:
        from knetlab.platform.mlflow_model import register_best_run

        register_best_run(uri, [run for run in runs if run.info.run_id in rows[0]["run_ids"]], register_best, alias)
    return rows
