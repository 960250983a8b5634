"""What MLflow's UI reads about a knetlab run beyond its params and metrics: the experiment's kind (model
development, not GenAI), MLflow's standard source tags (entry point, git commit) and the run's dataset as MLflow
dataset inputs (one per split: name, digest, source URI), so the runs view fills its Source and Dataset columns and
its dataset filters work. Everything here runs on the driver, where the run is created."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from knetlab.redact import redact

# MLflow 3's UI reads the experiment tag `mlflow.experimentKind` (its experiment-kind selector writes the same tag).
# Without it the UI infers a kind, and an experiment of knetlab's opens as a GenAI one (traces, "Evaluations").
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
KIND_TAGS = {EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT}  # a new experiment's tags
# Kinds knetlab replaces with MODEL_DEVELOPMENT: none, the GenAI one and the UI's inferred ones. Any other kind was
# chosen by a user for a model-development experiment (e.g. "finetuning") and is kept.
REPLACED_KINDS = ("", "genai_development", "genai_development_inferred", "custom_model_development_inferred",
                  "no_inferred_type")
DATASET_CONTEXT_TAG = "mlflow.data.context"  # the split: "training" or "validation"
SOURCE_TYPE_LOCAL = "LOCAL"  # mlflow.entities.SourceType: a command run on a machine (not a notebook, job or project)
# The dataset names of the task families (tracking.tags.dataset overrides; a synthetic dataset says so).
DATASET_NAMES = {"semantic": "ADE20K", "panoptic": "COCO-panoptic", "instance": "COCO"}


# -- the experiment -----------------------------------------------------------------------------------------------
def mark_model_development(mlflow_client: Any, experiment: Any) -> None:
    """Tag an active experiment as model development unless it already has a kind of that family; a failure is
    reported, not raised (the tag only changes how the UI opens the experiment)."""
    kind = (experiment.tags or {}).get(EXPERIMENT_KIND_TAG, "")
    if experiment.lifecycle_stage != "active" or kind not in REPLACED_KINDS:
        return
    try:
        mlflow_client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)
    except Exception as error:
        print(f"[knetlab] could not tag MLflow experiment {experiment.name!r} as model development: "
              f"{' '.join(redact(str(error)).split())[:200]}", flush=True)


def ui_link(tracking_uri: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment (or run) in its "Model training" view: MLflow 3.17's UI opens every
    experiment in the view of its global GenAI / Model training switch (GenAI until the user picks the other; the
    experiment kind tag does not change it), and the `workflowType` query parameter picks it. A non-HTTP store's
    page is the one `mlflow ui` serves on 127.0.0.1:5000."""
    base = redact(tracking_uri).rstrip("/") if tracking_uri.startswith(("http://", "https://")) else \
        "http://127.0.0.1:5000"
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base}/{page}?workflowType=machine_learning"


# -- source tags ----------------------------------------------------------------------------------------------------
def entry_point(argv: Sequence[str] | None = None) -> str:
    """`knetlab COMMAND FILE` when the process is the knetlab command (console script or `python -m knetlab`), else
    the main file, as MLflow records it; redacted (overrides are params, not part of it)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv or not argv[0]:
        return "<console>"
    program = Path(argv[0])
    if program.name == "knetlab" or (program.name == "__main__.py" and program.parent.name == "knetlab"):
        files = [arg for arg in argv[2:] if arg.endswith((".yaml", ".yml"))][:1]
        return redact(" ".join(["knetlab", *argv[1:2], *files]))
    return redact(argv[0])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def source_tags(argv: Sequence[str] | None = None) -> dict[str, str]:
    """MLflow's standard run tags for where a run comes from: user, entry point and source type, and the git commit,
    branch and remote of knetlab's own checkout (left out outside a git checkout, e.g. an installed package or a
    `ray job submit` working directory without .git)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    tags = {"mlflow.user": user, "mlflow.source.name": entry_point(argv), "mlflow.source.type": SOURCE_TYPE_LOCAL}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = redact(remote)
    return tags


# -- dataset inputs -------------------------------------------------------------------------------------------------
def dataset_name(cfg: DictConfig, task: str) -> str:
    """The run's dataset: `tracking.tags.dataset` when set, else the task's dataset (`synthetic-...` when knetlab
    generates it), or for a semantic dataset of your own (data.classes) its folder's name; the `dataset` tag and the
    MLflow dataset input carry the same name."""
    name = DATASET_NAMES[task]
    if task == "semantic" and cfg.data.get("classes"):
        name = str(cfg.data.root).rstrip("/").rsplit("/", 1)[-1]
    return str(cfg.tracking.tags.get("dataset") or (f"synthetic-{name.lower()}" if cfg.data.synthesize else name))


def files_digest(paths: Iterable[Path], root: Path) -> dict[str, Any]:
    """{"digest", "files", "bytes"} of the files under `paths` (files or folders, walked): the digest is a hash of
    every file's path (relative to the dataset's `root` when inside it) and size, so it changes when a file is added,
    removed, renamed or changes size, without reading the images."""
    def name(file: Path) -> str:
        return file.relative_to(root).as_posix() if file.is_relative_to(root) else file.as_posix()

    entries = set()
    for path in paths:
        path = Path(path)
        files = [path] if path.is_file() else [Path(folder) / f for folder, _, names in os.walk(path) for f in names]
        entries |= {(name(file), file.stat().st_size) for file in files}
    entries = sorted(entries)
    digest = hashlib.sha256("\n".join(f"{name}\t{size}" for name, size in entries).encode()).hexdigest()
    return {"digest": digest[:16], "files": len(entries), "bytes": sum(size for _, size in entries)}


def dataset_inputs(cfg: DictConfig) -> list[dict[str, Any]]:
    """The run's dataset as one MLflow dataset input per split (plain dicts: they travel to a sweep's trials): name,
    digest, source (data.root, redacted: a local path or s3:// URI) and profile (files, bytes), with the split as the
    input's context. Called on the driver after the up-front data checks: an s3:// dataset is in the local cache."""
    from knetlab.data.cache import resolve_dataset_root
    from knetlab.platform.tasks import task_family

    family = task_family(cfg)
    root = str(cfg.data.root)
    source = json.dumps({"uri": redact(root)})
    source_type = "s3" if root.startswith("s3://") else "local"
    local_root = resolve_dataset_root(root, cfg.data.cache_dir, progress=False).resolve()
    splits = family.data_splits(cfg) if family.data_splits is not None else {"training": [local_root]}
    inputs = []
    for context, paths in splits.items():
        listing = files_digest(paths, local_root)
        inputs.append({"name": dataset_name(cfg, family.name), "digest": listing["digest"], "context": context,
                       "source_type": source_type, "source": source,
                       "profile": json.dumps({"files": listing["files"], "bytes": listing["bytes"]})})
    return inputs


def log_dataset_inputs(mlflow_client: Any, run_id: str, inputs: Sequence[Mapping[str, Any]]) -> None:
    """Log the inputs `dataset_inputs` made to a run (MLflow keeps one input per dataset and run: logging the same
    again is a no-op)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    mlflow_client.log_inputs(run_id, datasets=[
        DatasetInput(Dataset(name=item["name"], digest=item["digest"], source_type=item["source_type"],
                             source=item["source"], profile=item.get("profile")),
                     tags=[InputTag(DATASET_CONTEXT_TAG, item["context"])])
        for item in inputs])
