"""What MLflow's UI reads about knetlab's runs (knetlab/platform/mlflow_context.py, system_metrics.py), against a real
sqlite store: the experiment kind, the source tags, each task family's dataset inputs, and rank 0's system metrics
delivered through the run's spool, also while the server is down. The end-to-end check through a real server's REST
API after a sweep is `mlflow_dashboard.assert_dashboard_ready`, called by tests/test_sweep_e2e.py's ASHA test."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO_ROOT, free_port

from knetlab.platform.config import load_config
from knetlab.platform.mlflow_context import (
    EXPERIMENT_KIND_TAG,
    MODEL_DEVELOPMENT,
    dataset_inputs,
    dataset_name,
    entry_point,
    log_dataset_inputs,
    source_tags,
    ui_link,
)
from knetlab.platform.system_metrics import start_system_metrics
from knetlab.platform.tracking import SPOOL_FILE, RunLogger, client, create_run, ensure_experiment, metric_history

SMOKE = REPO_ROOT / "experiments" / "smoke.yaml"
SMOKE_PANOPTIC = REPO_ROOT / "experiments" / "smoke-panoptic.yaml"
CUSTOM = REPO_ROOT / "experiments" / "custom" / "example.yaml"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store for the module (creating MLflow's tables takes seconds); each test has its experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_knetlab_experiments_are_model_development(store: str) -> None:
    uri = store
    mlflow_client = client(uri)
    created = ensure_experiment("new", uri)
    # Experiments made before knetlab tagged them, or that MLflow's UI took for GenAI ones, are marked when used;
    # a kind a user chose for a model-development experiment is kept.
    older = mlflow_client.create_experiment("older")
    genai = mlflow_client.create_experiment("genai", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    chosen = mlflow_client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "finetuning"})
    for name in ("older", "genai", "chosen"):
        ensure_experiment(name, uri)
    kinds = {experiment_id: mlflow_client.get_experiment(experiment_id).tags.get(EXPERIMENT_KIND_TAG)
             for experiment_id in (created, older, genai, chosen)}
    assert kinds == {created: MODEL_DEVELOPMENT, older: MODEL_DEVELOPMENT, genai: MODEL_DEVELOPMENT,
                     chosen: "finetuning"}


def test_entry_point_names_the_knetlab_command() -> None:
    assert entry_point(["/venv/bin/knetlab", "sweep", "experiments/sweeps/smoke.yaml", "repeats=1"]) == \
        "knetlab sweep experiments/sweeps/smoke.yaml"
    assert entry_point(["/repo/knetlab/__main__.py", "train", "--resume", "run-1", "exp.yml"]) == \
        "knetlab train exp.yml"
    assert entry_point(["/venv/bin/pytest", "-q"]) == "/venv/bin/pytest"  # a library user: the main file, as MLflow
    assert entry_point(["/venv/bin/knetlab", "train", "s3://AKIAABCDEFGHIJKLMNOP:hunter2@bucket/x.yaml"]) == \
        "knetlab train s3://***@bucket/x.yaml"


def test_ui_links_open_the_model_training_view() -> None:
    assert ui_link("http://user:pw@mlflow.internal:5000/", "3", "abc") == \
        "http://***@mlflow.internal:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert ui_link("sqlite:///runs/mlflow.db", "1") == \
        "http://127.0.0.1:5000/#/experiments/1?workflowType=machine_learning"


def test_source_tags_name_the_command_and_the_commit() -> None:
    tags = source_tags(["/venv/bin/knetlab", "train", "experiments/smoke.yaml"])
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    commit = git.stdout.strip() if git.returncode == 0 else None
    assert tags.get("mlflow.source.git.commit") == commit
    assert tags["mlflow.source.name"] == "knetlab train experiments/smoke.yaml"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.user"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from knetlab.data.synthetic import generate_synthetic_ade20k
    from knetlab.data.synthetic_coco import generate_synthetic_coco
    from knetlab.data.synthetic_custom import generate_synthetic_custom

    root = tmp_path_factory.mktemp("datasets")
    generate_synthetic_ade20k(root / "ade", num_train=2, num_val=1)
    generate_synthetic_coco(root / "pan", task="panoptic", num_train=2, num_val=1)
    generate_synthetic_coco(root / "ins", task="instance", num_train=2, num_val=1)
    generate_synthetic_custom(root / "mine", num_train=2, num_val=1)  # classes.txt and train.txt/val.txt lists
    return {"semantic": root / "ade", "panoptic": root / "pan", "instance": root / "ins", "custom": root / "mine"}


@pytest.mark.parametrize(("task", "experiment", "overrides"), [
    ("semantic", SMOKE, ["model.name=tiny"]),
    ("panoptic", SMOKE_PANOPTIC, ["model.name=tiny-panoptic"]),
    ("instance", SMOKE_PANOPTIC, ["model.name=tiny-instance"]),
    ("custom", CUSTOM, ["data.train_list=train.txt", "data.val_list=val.txt"])])
def test_each_task_family_logs_its_splits_as_dataset_inputs(store: str, datasets: dict[str, Path], task: str,
                                                           experiment: Path, overrides: list[str]) -> None:
    root = datasets[task]
    cfg = load_config(experiment, [f"data.root={root}", "data.synthesize=false", *overrides])
    if task == "custom":  # a dataset of your own is named after its folder
        assert dataset_name(cfg, "semantic") == "mine"
        task = "semantic"
    inputs = dataset_inputs(cfg)
    assert [item["context"] for item in inputs] == ["training", "validation"]
    assert inputs[0]["digest"] != inputs[1]["digest"]
    assert {item["name"] for item in inputs} == {dataset_name(cfg, task)}
    assert all(json.loads(item["source"]) == {"uri": str(root)} and item["source_type"] == "local" for item in inputs)

    uri = store
    run_id = create_run(uri, ensure_experiment(f"inputs-{task}", uri), "r", {})
    log_dataset_inputs(client(uri), run_id, inputs)
    logged = client(uri).get_run(run_id).inputs.dataset_inputs
    assert sorted((d.dataset.name, d.dataset.digest, d.dataset.source_type, d.tags[0].key, d.tags[0].value)
                  for d in logged) == sorted((i["name"], i["digest"], "local", "mlflow.data.context", i["context"])
                                             for i in inputs)
    assert json.loads(logged[0].dataset.profile)["files"] > 0

    # The digest follows the split's files: a new training image (or, with list files, a changed training list)
    # changes the training digest only.
    listed = cfg.data.get("train_list")
    image = next(path for path in sorted(root.rglob("*.jpg")) if "train" in str(path.parent))
    changed = root / listed if listed else image.parent / ("extra" + image.suffix)
    before = changed.read_bytes() if listed else None
    changed.write_bytes(before + b"# a comment\n" if listed else image.read_bytes())
    try:
        again = dataset_inputs(cfg)
    finally:
        changed.write_bytes(before) if listed else changed.unlink()
    assert again[0]["digest"] != inputs[0]["digest"] and again[1]["digest"] == inputs[1]["digest"]


def test_dataset_names() -> None:
    from omegaconf import OmegaConf

    cfg = load_config(SMOKE, ["data.synthesize=false"])
    assert dataset_name(cfg, "semantic") == "synthetic-ade20k"  # the experiment's tracking.tags.dataset
    plain = OmegaConf.create({"tracking": {"tags": {}}, "data": {"synthesize": False}})
    assert dataset_name(plain, "semantic") == "ADE20K" and dataset_name(plain, "instance") == "COCO"
    plain.data.synthesize = True
    assert dataset_name(plain, "panoptic") == "synthetic-coco-panoptic"


def test_system_metrics_reach_the_run_through_its_logger(tmp_path: Path, store: str) -> None:
    uri = store
    run_id = create_run(uri, ensure_experiment("system", uri), "r", {})
    logger = RunLogger(uri, run_id, spool_dir=tmp_path / "spool")
    # An hour between samples: the run ends first, and its one point is the last sample, at the run's last step.
    stop = start_system_metrics(logger.log_metrics, lambda: 7, interval_s=3600)
    stop()
    assert logger.close(timeout_s=60)
    for key in ("system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
                "system/disk_usage_megabytes", "system/network_receive_megabytes"):
        assert [step for step, _ in metric_history(uri, run_id, key)] == [7], key
    assert metric_history(uri, run_id, "system/system_memory_usage_megabytes")[0][1] > 0


def test_no_system_metrics_with_interval_zero(tmp_path: Path) -> None:
    logged = []
    stop = start_system_metrics(lambda metrics, step: logged.append(step), lambda: 1, interval_s=0)
    stop()
    assert logged == []


def test_system_metrics_are_spooled_while_mlflow_is_down(tmp_path: Path) -> None:
    """Nothing listens at the URI: sampling and stopping never wait on the server, the samples stay in the spool
    for the next logger of the run."""
    uri = f"http://127.0.0.1:{free_port()}"
    logger = RunLogger(uri, "0" * 32, spool_dir=tmp_path / "spool", max_retry_interval_s=0.5)
    stop = start_system_metrics(logger.log_metrics, lambda: 3, interval_s=3600)
    stop()
    assert not logger.close(timeout_s=0.5)
    records = [json.loads(line) for line in (tmp_path / "spool" / SPOOL_FILE).read_text().splitlines()]
    assert [r["step"] for r in records if "system/cpu_utilization_percentage" in r.get("metrics", {})] == [3]
