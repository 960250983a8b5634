"""Test support: `assert_dashboard_ready`, the check (through MLflow's REST API, as the UI reads it) that an
experiment knetlab logged to opens as a model-development experiment whose runs fill the UI's Dataset and Source
columns, and whose training runs have system metrics. Called from an end-to-end test after a real run."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import requests

REPO_ROOT = Path(__file__).resolve().parent.parent
SYSTEM_METRICS = ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes")


def rest(tracking_uri: str, endpoint: str, payload: dict | None = None, **params: str) -> dict:
    url = f"{tracking_uri.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    response = requests.post(url, json=payload, timeout=30) if payload is not None else \
        requests.get(url, params=params, timeout=30)
    assert response.status_code == 200, (url, response.status_code, response.text[:500])
    return response.json()


def expected_git_commit() -> str | None:
    """The commit knetlab's checkout is at (None outside a git checkout: then no commit tag is expected)."""
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def assert_dashboard_ready(tracking_uri: str, experiment_name: str) -> None:
    """The experiment carries the model-development kind; every run has dataset inputs (name, digest, source URI,
    split as context) and MLflow's source tags; every finished training run has system metrics with a history."""
    experiment = rest(tracking_uri, "experiments/get-by-name", experiment_name=experiment_name)["experiment"]
    experiment_tags = {tag["key"]: tag["value"] for tag in experiment.get("tags", [])}
    assert experiment_tags.get("mlflow.experimentKind") == "custom_model_development", experiment_tags

    runs = rest(tracking_uri, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                              "max_results": 1000})["runs"]
    assert runs, f"no runs in {experiment_name}"
    commit = expected_git_commit()
    finished_training_runs = 0
    for run in runs:
        name = run["info"].get("run_name")
        tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        assert tags.get("mlflow.source.name", "").startswith("knetlab "), (name, tags.get("mlflow.source.name"))
        assert tags.get("mlflow.source.type") == "LOCAL", (name, tags.get("mlflow.source.type"))
        assert tags.get("mlflow.source.git.commit") == commit, (name, tags.get("mlflow.source.git.commit"), commit)
        assert tags.get("mlflow.user"), name

        inputs = run.get("inputs", {}).get("dataset_inputs", [])
        contexts = set()
        for dataset_input in inputs:
            dataset = dataset_input["dataset"]
            assert dataset["name"] and len(dataset["digest"]) == 16, (name, dataset)
            assert json.loads(dataset["source"])["uri"], (name, dataset)
            assert dataset["source_type"] in ("local", "s3"), (name, dataset)
            contexts |= {tag["value"] for tag in dataset_input.get("tags", []) if tag["key"] == "mlflow.data.context"}
        assert {"training", "validation"} <= contexts, (name, inputs)
        if tags.get("knetlab.kind") != "sweep":
            assert {d["dataset"]["name"] for d in inputs} == {tags["dataset"]}, (name, inputs, tags["dataset"])

        metrics = {metric["key"]: metric for metric in run["data"].get("metrics", [])}
        if tags.get("knetlab.kind") == "sweep" or run["info"]["status"] != "FINISHED":
            continue  # a parent run trains nothing; a stopped trial's last sample may not have been taken
        finished_training_runs += 1
        for key in SYSTEM_METRICS:
            assert key in metrics and metrics[key]["value"] > 0, (name, key, sorted(metrics))
            history = rest(tracking_uri, "metrics/get-history", run_id=run["info"]["run_id"], metric_key=key)
            assert history["metrics"], (name, key)
    assert finished_training_runs, f"no finished training run in {experiment_name}"
