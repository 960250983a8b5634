"""The panoptic and instance task families (COCO layout): their datasets, the matched-mask losses of one batch, the
validation the training loop runs (PQ/SQ/RQ with per-category PQ, or mask AP) with prediction overlays, and their
tables in `knetlab compare` (the K-Net README's panoptic and instance tables)."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from knetlab.data.coco_categories import (
    COCO_PANOPTIC_PALETTE,
    category_id_to_label,
    coco_json_categories,
    label_to_category_id,
)
from knetlab.data.coco_instance import CocoInstanceDataset
from knetlab.data.coco_panoptic import CocoPanopticDataset
from knetlab.data.det_transforms import (
    batch_images,
    build_det_test_transform,
    build_det_train_transform,
    collate_detection,
)
from knetlab.evaluation.instance import InstanceEvaluator
from knetlab.evaluation.panoptic import PanopticEvaluator
from knetlab.platform.task_family import BENCH_COLUMNS, ResultTable, TaskFamily, Validation

PANOPTIC_METRICS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")
INSTANCE_METRICS = ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "segm_mAP_s", "segm_mAP_m", "segm_mAP_l")
OVERLAYS = 4  # validation images drawn per evaluation (rank 0)
IGNORE = 255
OVERLAY_MIN_SCORE = 0.3  # instance overlays draw masks scored at least this (the panoptic fusion's thing threshold)
BACKBONE_NAMES = {"r50": "R-50", "r101": "R-101", "r101-dcn": "R-101-DCN", "swin-l": "Swin-L"}  # the K-Net README's


def train_scales(cfg: DictConfig) -> Any:
    """One (long, short) scale, or the two ends of the ms-3x range (`data.multiscale`)."""
    if cfg.data.multiscale:
        return [tuple(pair) for pair in cfg.data.multiscale]
    return tuple(cfg.data.scale)


def train_dataset(cfg: DictConfig) -> CocoPanopticDataset | CocoInstanceDataset:
    dataset_class = CocoPanopticDataset if task_name(cfg) == "panoptic" else CocoInstanceDataset
    return dataset_class(cfg.data.root, "train", build_det_train_transform(train_scales(cfg)), seed=cfg.trainer.seed,
                         cache_dir=cfg.data.cache_dir)


def val_dataset(cfg: DictConfig) -> CocoPanopticDataset | CocoInstanceDataset:
    dataset_class = CocoPanopticDataset if task_name(cfg) == "panoptic" else CocoInstanceDataset
    return dataset_class(cfg.data.root, "val", build_det_test_transform(tuple(cfg.eval.test_scale)),
                         max_images=cfg.data.val_max_images, cache_dir=cfg.data.cache_dir)


def prepare_data(cfg: DictConfig) -> None:
    """Synthesize the demo dataset (COCO layout) when asked and missing, then check both splits up front."""
    from knetlab.data.synthetic_coco import generate_synthetic_coco

    task, root = task_name(cfg), cfg.data.root
    if cfg.data.synthesize and "://" not in root and not Path(root).exists():
        print(f"[knetlab] generating the synthetic COCO {task} dataset at {root}", flush=True)
        generate_synthetic_coco(root, task=task)
    for split in ("train", "val"):
        check_split(cfg, split)


def check_split(cfg: DictConfig, split: str) -> None:
    from knetlab.data.coco_instance import check_coco_instance_split
    from knetlab.data.coco_panoptic import check_coco_panoptic_split

    check = check_coco_panoptic_split if task_name(cfg) == "panoptic" else check_coco_instance_split
    check(cfg.data.root, split, cache_dir=cfg.data.cache_dir)


def check_layout(root: str) -> None:
    """A local COCO root: its annotations folder is there (the driver checked the files themselves)."""
    from knetlab.data.coco import find_coco_root

    find_coco_root(root)


def data_splits(cfg: DictConfig) -> dict[str, list[Path]]:
    """Each split's annotation JSON (and panoptic PNG folder) and image folder (in the local copy of an s3:// root)."""
    from knetlab.data.cache import resolve_dataset_root
    from knetlab.data.coco import coco_split_dir, find_coco_root

    root = find_coco_root(resolve_dataset_root(cfg.data.root, cfg.data.cache_dir, progress=False))
    task = task_name(cfg)
    splits = {}
    for context, split in (("training", "train"), ("validation", "val")):
        folder = coco_split_dir(split)
        annotations = ([root / "annotations" / f"panoptic_{folder}.json", root / "annotations" / f"panoptic_{folder}"]
                       if task == "panoptic" else [root / "annotations" / f"instances_{folder}.json"])
        splits[context] = [*annotations, root / folder]
    return splits


def task_name(cfg: DictConfig) -> str:
    from knetlab.platform.task_family import task_of

    return task_of(cfg)


def batch_losses(model: torch.nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's weighted losses of one batch (images padded to a multiple of 32 on the device, as the reference's
    Pad), named `loss_<part>` (loss_rpn_mask, loss_s0_cls, ...) so that they are logged as `train/loss_<part>`."""
    images = batch_images(batch["images"], device)
    targets = [{key: (value.to(device, non_blocking=True) if value is not None else None)
                for key, value in target.items()} for target in batch["targets"]]
    return {f"loss_{part}": value for part, value in model(images, targets).items()}


def predict_one(model: torch.nn.Module, item: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The model's result for one validation item, at the item's original size."""
    return model(batch_images([item["image"]], device), [item["meta"]])[0]


def category_map(pan: torch.Tensor, segments: list[dict], key: str) -> torch.Tensor:
    """A panoptic id map -> contiguous category per pixel (IGNORE where VOID or unlisted), for overlays."""
    out = torch.full(pan.shape, IGNORE, dtype=torch.long)
    for segment in segments:
        out[pan.cpu() == segment["id"]] = int(segment[key])
    return out


@torch.no_grad()
def validate_panoptic(model: torch.nn.Module, dataset: CocoPanopticDataset, cfg: DictConfig, device: torch.device,
                      rank: int, world_size: int, artifact_dir: Path | None) -> Validation:
    """PQ/SQ/RQ (all, things, stuff) over the validation split, each worker taking every world_size-th image,
    statistics summed over workers; rank 0 writes per-category PQ and overlays into artifact_dir."""
    model.eval()
    evaluator = PanopticEvaluator(coco_json_categories("panoptic"))
    overlays = []
    for index in range(rank, len(dataset), world_size):
        item = dataset[index]
        result = predict_one(model, item, device)
        segments = [{"id": s["id"], "category_id": label_to_category_id(s["category"], "panoptic")}
                    for s in result["segments"]]
        evaluator.update(result["pan_seg"], segments, item["gt_pan"], item["gt_segments"])
        if artifact_dir is not None and len(overlays) < OVERLAYS:
            gt = [{"id": s["id"], "label": category_id_to_label(s["category_id"], "panoptic")}
                  for s in item["gt_segments"]]
            overlays.append((item["image"], category_map(result["pan_seg"], result["segments"], "category"),
                             category_map(item["gt_pan"], gt, "label")))
    evaluator.all_reduce()
    result = evaluator.compute()
    metrics = {f"val/{key}": float(result[key]) for key in PANOPTIC_METRICS}
    details = {f"val/PQ/{name}": float(row["PQ"]) for name, row in result["per_class"].items()
               if not math.isnan(row["PQ"])}
    if artifact_dir is not None:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        with open(artifact_dir / "per_category_pq.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["category", "PQ", "SQ", "RQ"])
            for name, row in result["per_class"].items():
                writer.writerow([name, *(f"{row[k]:.2f}" for k in ("PQ", "SQ", "RQ"))])
        write_overlays(overlays, artifact_dir, "panoptic")
    return Validation(metrics=metrics, details=details,
                      summary=" ".join(f"{key} {result[key]:.2f}" for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st")))


@torch.no_grad()
def validate_instance(model: torch.nn.Module, dataset: CocoInstanceDataset, cfg: DictConfig, device: torch.device,
                      rank: int, world_size: int, artifact_dir: Path | None) -> Validation:
    """Mask AP (COCO's segm evaluation) over the validation split; results gathered on every worker."""
    model.eval()
    evaluator = InstanceEvaluator(dataset.json_path)
    overlays = []
    for index in range(rank, len(dataset), world_size):
        item = dataset[index]
        result = predict_one(model, item, device)
        labels = result["labels"].cpu()
        category_ids = [label_to_category_id(int(label), "instance") for label in labels]
        evaluator.update(item["meta"]["image_id"], result["masks"].cpu(), category_ids, result["scores"].cpu())
        if artifact_dir is not None and len(overlays) < OVERLAYS:
            overlays.append((item["image"], instance_category_map(result, OVERLAY_MIN_SCORE), None))
    evaluator.all_reduce()
    result = evaluator.compute()
    metrics = {f"val/{key}": float(result[key]) for key in INSTANCE_METRICS}
    if artifact_dir is not None:
        write_overlays(overlays, artifact_dir, "instance")
    return Validation(metrics=metrics, summary=" ".join(
        f"{key.replace('segm_', '')} {result[key]:.2f}" for key in ("segm_mAP", "segm_mAP_50", "segm_mAP_75")))


def instance_category_map(result: dict[str, torch.Tensor], min_score: float) -> torch.Tensor:
    """Instance masks above `min_score` painted by category, the highest score on top."""
    masks, labels, scores = result["masks"].cpu(), result["labels"].cpu(), result["scores"].cpu()
    out = torch.full(masks.shape[-2:], IGNORE, dtype=torch.long)
    for index in torch.argsort(scores).tolist():
        if scores[index] >= min_score:
            out[masks[index]] = int(labels[index])
    return out


def write_overlays(overlays: list, artifact_dir: Path, task: str) -> None:
    """One PNG per image (sizes differ): image, ground truth (panoptic), prediction, coloured by category."""
    from knetlab.evaluation import visualize

    palette = np.asarray(COCO_PANOPTIC_PALETTE, dtype=np.uint8)
    for i, (image, pred, label) in enumerate(overlays):
        # overlay_png denormalises ImageNet-normalised images: hand it the uint8 image normalised the same way.
        normalised = batch_images([image], "cpu", size_divisor=1)
        visualize.overlay_png(normalised, pred[None], label[None] if label is not None else None, palette,
                              artifact_dir / f"{task}_overlay_{i}.png")


def panoptic_bench_size(cfg: DictConfig) -> tuple[int, int]:
    """A typical COCO image (480 x 640) resized into eval.test_scale, as the reference benchmark's images are."""
    from knetlab.data.det_transforms import rescale_factor

    factor = rescale_factor((480, 640), tuple(cfg.eval.test_scale))
    return int(480 * factor + 0.5), int(640 * factor + 0.5)


def table_labels(tags: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, ...]:
    """A run's Backbone, Method and Lr Schd: the zoo row's schedule (1x, ms-3x) with the iterations the run trained."""
    from knetlab.models.det_zoo import DET_MODELS

    backbone = tags.get("backbone")
    spec = DET_MODELS.get(params.get("model.name", ""))
    iterations = params.get("trainer.max_iters") or "-"
    return (BACKBONE_NAMES.get(backbone or "", backbone or "-"), "K-Net",
            f"{spec.schedule} ({iterations} it)" if spec is not None else f"{iterations} it")


PANOPTIC_TABLE = ResultTable(
    label_columns=("Backbone", "Method", "Lr Schd"), labels=table_labels, score_column="PQ",
    metric_columns=(*BENCH_COLUMNS, *((key, f"val/{key}") for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st"))))
INSTANCE_TABLE = ResultTable(
    label_columns=("Backbone", "Method", "Lr Schd"), labels=table_labels, score_column="mask AP",
    metric_columns=(*BENCH_COLUMNS, ("mask AP", "val/segm_mAP"), ("AP50", "val/segm_mAP_50"),
                    ("AP75", "val/segm_mAP_75")))

PANOPTIC = TaskFamily(name="panoptic", score_metric="val/PQ",
                      train_dataset=train_dataset, val_dataset=val_dataset, batch_losses=batch_losses,
                      validate=validate_panoptic, bench_image_size=panoptic_bench_size, collate=collate_detection,
                      prepare_data=prepare_data, check_split=check_split, check_layout=check_layout,
                      table=PANOPTIC_TABLE, data_splits=data_splits)
INSTANCE = TaskFamily(name="instance", score_metric="val/segm_mAP",
                      train_dataset=train_dataset, val_dataset=val_dataset, batch_losses=batch_losses,
                      validate=validate_instance, bench_image_size=panoptic_bench_size, collate=collate_detection,
                      prepare_data=prepare_data, check_split=check_split, check_layout=check_layout,
                      table=INSTANCE_TABLE, data_splits=data_splits)
