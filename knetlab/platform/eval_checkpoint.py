"""`knetlab eval`: a checkpoint (local or s3://) evaluated on the validation split, single scale and optionally
multi-scale + flip, printed as the table's metrics and a per-class table; and the MLflow run that an evaluation's
or a benchmark's (`knetlab bench`) figures are logged to when asked (`--log`, `--mlflow-run`)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from knetlab.data.classes import class_names
from knetlab.data.transforms import build_test_transform, normalize_images
from knetlab.evaluation.inference import predict, predict_settings
from knetlab.evaluation.metrics import SegEvaluator, format_table
from knetlab.platform.checkpoint import CheckpointError, load_meta, load_model_from_checkpoint


def evaluate_checkpoint(cfg: DictConfig, checkpoint_uri: str, ms_flip: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint's model on `cfg.data.root`'s validation split with `cfg.eval` settings."""
    from knetlab.platform.tasks import task_family

    family = task_family(cfg)
    if family.name != "semantic":  # panoptic/instance: the family's own validation, as in training
        return evaluate_with_family(cfg, checkpoint_uri, family, ms_flip)
    from knetlab.platform.semantic_task import val_dataset

    family.check_split(cfg, "validation")
    model, trained_cfg = load_model_from_checkpoint(checkpoint_uri)
    if trained_cfg.model.num_classes != cfg.model.num_classes:
        raise CheckpointError(f"checkpoint {checkpoint_uri} predicts {trained_cfg.model.num_classes} classes but "
                         f"model.num_classes={cfg.model.num_classes}")
    names, trained_names = class_names(cfg), class_names(trained_cfg)
    if trained_names != names:
        raise CheckpointError(f"checkpoint {checkpoint_uri} was trained on the classes {_shown(trained_names)} but "
                              f"the dataset's are {_shown(names)} (data.classes, data.classes_file, or the classes "
                              f"file in data.root)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # The original images: single scale resizes to eval.test_scale itself, ms+flip resizes per ratio.
    dataset = val_dataset(cfg, build_test_transform(None))
    passes = {"val/": predict_settings(cfg.eval)}
    if ms_flip:
        passes["val/msflip/"] = predict_settings(cfg.eval, ms_flip=True)
    evaluators = {prefix: SegEvaluator(cfg.model.num_classes) for prefix in passes}
    start = time.perf_counter()
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            image, label = normalize_images([item["image"]], device), item["label"][None].to(device).long()
            for prefix, settings in passes.items():
                evaluators[prefix].update(predict(model, image, label.shape[-2:], **settings), label)
            if (index + 1) % 50 == 0 or index + 1 == len(dataset):
                print(f"[knetlab] evaluated {index + 1}/{len(dataset)} images "
                      f"({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    results = {prefix: evaluator.compute() for prefix, evaluator in evaluators.items()}
    single = results["val/"]
    metrics = {"val/mIoU": single["mIoU"], "val/mAcc": single["mAcc"], "val/aAcc": single["aAcc"]}
    if ms_flip:
        metrics["val/mIoU_msflip"] = results["val/msflip/"]["mIoU"]
    print(format_table(single, names))
    print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return {"metrics": metrics, "results": results, "class_names": names}


def _shown(names: tuple[str, ...], count: int = 6) -> str:
    return "[" + ", ".join(names[:count]) + (f", ... ({len(names)} in all)]" if len(names) > count else "]")


def evaluate_with_family(cfg: DictConfig, checkpoint_uri: str, family: Any, ms_flip: bool) -> dict[str, Any]:
    """A panoptic or instance checkpoint scored by its task family's validation (PQ/SQ/RQ or mask AP), printed with
    the per-category table; the artifacts (per-category CSV, overlays) stay in a folder `log_evaluation` logs."""
    import tempfile

    from knetlab.platform.config import ConfigError

    if ms_flip:
        raise ConfigError(f"--ms-flip: multi-scale + flip testing is for semantic models; {cfg.model.name} is a "
                          f"{family.name} model (tested at eval.test_scale, as the reference)")
    family.check_split(cfg, "val")
    model, trained_cfg = load_model_from_checkpoint(checkpoint_uri)
    if trained_cfg.model.name != cfg.model.name:
        raise CheckpointError(f"checkpoint {checkpoint_uri} holds a {trained_cfg.model.name} model but "
                              f"model.name={cfg.model.name}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = family.val_dataset(cfg)
    artifacts = Path(tempfile.mkdtemp(prefix="knetlab-eval-"))
    start = time.perf_counter()
    print(f"[knetlab] evaluating {len(dataset)} images", file=sys.stderr, flush=True)
    validation = family.validate(model.to(device), dataset, cfg, device, 0, 1, artifacts)
    print(f"[knetlab] evaluated {len(dataset)} images ({time.perf_counter() - start:.0f}s)", file=sys.stderr,
          flush=True)
    per_category = artifacts / "per_category_pq.csv"
    if per_category.is_file():
        print(per_category.read_text().replace(",", "\t"), end="")
    print("  ".join(f"{k} {v:.2f}" for k, v in validation.metrics.items()))
    return {"metrics": validation.metrics, "results": {}, "artifacts": artifacts}


def mlflow_target(cfg: Any, checkpoint_uri: str | None, run_id: str | None) -> tuple[str, str, int]:
    """(tracking URI, run id, step) to log results to: `run_id`, else $MLFLOW_RUN_ID, else the run that trained the
    checkpoint; the step is the checkpoint's iteration (0 without a checkpoint)."""
    from knetlab.platform import tracking

    meta = load_meta(checkpoint_uri) if checkpoint_uri else {}
    run_id = run_id or os.environ.get("MLFLOW_RUN_ID") or meta.get("mlflow_run_id")
    if not run_id:
        raise CheckpointError(f"--log: checkpoint {checkpoint_uri} names no MLflow run; pass --mlflow-run RUN_ID")
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
    tracking.client(tracking_uri).get_run(run_id)  # an unknown run fails here
    return tracking_uri, run_id, int(meta.get("iteration", 0))


def log_evaluation(tracking_uri: str, run_id: str, step: int, outcome: dict[str, Any]) -> None:
    """Log the evaluation's metrics (e.g. val/mIoU_msflip, the table's last column) at `step`, with the per-class
    IoU tables as artifacts. Metrics the run already has at that step are not logged again."""
    import tempfile

    from mlflow.entities import Metric

    from knetlab.evaluation.visualize import per_class_csv
    from knetlab.platform import tracking

    mlflow_client = tracking.client(tracking_uri)
    fresh = {key: value for key, value in outcome["metrics"].items()
             if step not in {s for s, _ in tracking.metric_history(tracking_uri, run_id, key)}}
    timestamp = int(time.time() * 1000)
    if fresh:
        mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), timestamp, step) for k, v in fresh.items()])
    with tempfile.TemporaryDirectory(prefix="knetlab-eval-") as tmp:
        for path in sorted(outcome["artifacts"].iterdir()) if outcome.get("artifacts") else ():
            mlflow_client.log_artifact(run_id, str(path), artifact_path=f"eval/iter_{step:07d}")
        for prefix, result in outcome["results"].items():
            names = outcome.get("class_names")  # the dataset's (evaluate_checkpoint's), else class_<id>
            name = "per_class_iou" + ("_msflip" if "msflip" in prefix else "")
            csv_path = per_class_csv(result, names, Path(tmp) / f"{name}_iter{step}.csv")
            mlflow_client.log_artifact(run_id, str(csv_path), artifact_path="eval")
    skipped = sorted(set(outcome["metrics"]) - set(fresh))
    print(f"[knetlab] logged {', '.join(fresh) or 'no new metrics'} to MLflow run {run_id} at step {step}"
          + (f" ({', '.join(skipped)} already logged there)" if skipped else ""), flush=True)


def log_benchmark(tracking_uri: str, run_id: str, step: int, result: dict[str, Any],
                  artifact_file: str = "bench/bench.json") -> None:
    """The bench/* figures (the table's Mem and fps columns) and the whole result as bench.json, to an MLflow run."""
    import math

    from mlflow.entities import Metric

    from knetlab.platform import tracking

    mlflow_client = tracking.client(tracking_uri)
    timestamp = int(time.time() * 1000)
    figures = {k: float(v) for k, v in result.items()
               if k.startswith("bench/") and isinstance(v, (int, float)) and math.isfinite(v)}
    mlflow_client.log_batch(run_id, metrics=[Metric(k, v, timestamp, step) for k, v in figures.items()])
    if "precision" in result:  # fp32, tf32, bf16 or fp16: which figures these are
        mlflow_client.set_tag(run_id, "bench/precision", result["precision"])
    mlflow_client.log_dict(run_id, result, artifact_file)
    print(f"[knetlab] logged {', '.join(figures)} to MLflow run {run_id}", flush=True)
