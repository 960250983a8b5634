"""The semantic segmentation task family (ADE20K layout): its datasets, the per-pixel losses of one batch, and the
validation (mIoU/mAcc/aAcc, per-class IoU, confusion matrix and overlays) that the training loop runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from knetlab.data.ade20k import ADE20KDataset
from knetlab.data.transforms import (
    build_test_transform,
    build_train_transform,
    collate_segmentation,
    normalize_images,
)
from knetlab.evaluation.inference import predict, predict_settings
from knetlab.evaluation.metrics import SegEvaluator
from knetlab.platform.task_family import TaskFamily, Validation


def train_dataset(cfg: DictConfig) -> ADE20KDataset:
    data_cfg = cfg.data
    return ADE20KDataset(
        data_cfg.root, "training",
        build_train_transform(data_cfg.crop_size, scale=tuple(data_cfg.scale), ratio_range=tuple(data_cfg.ratio_range),
                              cat_max_ratio=data_cfg.cat_max_ratio),
        num_classes=cfg.model.num_classes, seed=cfg.trainer.seed, cache_dir=data_cfg.cache_dir,
    )


def val_dataset(cfg: DictConfig) -> ADE20KDataset:
    return ADE20KDataset(cfg.data.root, "validation", build_test_transform(tuple(cfg.eval.test_scale)),
                         num_classes=cfg.model.num_classes, max_images=cfg.data.val_max_images,
                         cache_dir=cfg.data.cache_dir)


def prepare_data(cfg: DictConfig) -> None:
    root = cfg.data.root
    if cfg.data.synthesize and "://" not in root and not Path(root).exists():
        from knetlab.data.synthetic import generate_synthetic_ade20k

        print(f"[knetlab] generating the synthetic ADE20K-format dataset at {root}", flush=True)
        generate_synthetic_ade20k(root)
    for split in ("training", "validation"):
        check_split(cfg, split)


def check_split(cfg: DictConfig, split: str) -> None:
    from knetlab.data.ade20k import check_split as check_ade20k_split

    check_ade20k_split(cfg.data.root, split, num_classes=cfg.model.num_classes, cache_dir=cfg.data.cache_dir)


def check_layout(root: str) -> None:
    from knetlab.data.ade20k import list_pairs

    for split in ("training", "validation"):
        list_pairs(root, split)


def data_splits(cfg: DictConfig) -> dict[str, list[Path]]:
    """Each split's image and annotation folders (in the local copy of an s3:// data.root)."""
    from knetlab.data.ade20k import find_dataset_dir, split_dir_name
    from knetlab.data.cache import resolve_dataset_root

    root = find_dataset_dir(resolve_dataset_root(cfg.data.root, cfg.data.cache_dir, progress=False))
    return {split: [root / "images" / split_dir_name(split), root / "annotations" / split_dir_name(split)]
            for split in ("training", "validation")}


def batch_losses(model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    """The batch (`collate_segmentation`: uint8 images, labels padded to the crop) reaches the device here; the
    images are normalised and zero-padded to the crop on it, as the reference's data preprocessor does."""
    labels = batch["label"].to(device, non_blocking=True).long()
    images = normalize_images(batch["image"], device, size=labels.shape[-2:])
    return model(images, labels)


@torch.no_grad()
def validate(model: torch.nn.Module, dataset: ADE20KDataset, cfg: DictConfig, device: torch.device,
             rank: int, world_size: int, artifact_dir: Path | None) -> Validation:
    """mIoU/mAcc/aAcc on the validation split, each worker taking every world_size-th image, counts summed over
    workers. Rank 0 also writes the per-class CSV, confusion-matrix PNG and prediction overlays into artifact_dir."""
    from knetlab.evaluation import visualize

    model.eval()
    evaluator = SegEvaluator(cfg.model.num_classes)
    settings = predict_settings(cfg.eval)
    settings["test_scale"] = None  # the test transform already resized the image to eval.test_scale
    overlays: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for index in range(rank, len(dataset), world_size):
        item = dataset[index]
        image = normalize_images([item["image"]], device)
        label = item["label"][None].to(device).long()
        pred = predict(model, image, label.shape[-2:], **settings)
        evaluator.update(pred, label)
        if artifact_dir is not None and len(overlays) < 4:
            size = image.shape[-2:]
            resize = torch.nn.functional.interpolate
            overlays.append((
                image[0].cpu(),
                resize(pred[None].float(), size=size, mode="nearest")[0, 0].long().cpu(),
                resize(label[None].float(), size=size, mode="nearest")[0, 0].long().cpu(),
            ))
    evaluator.all_reduce()
    result = evaluator.compute()
    names = dataset.classes or [f"class_{i}" for i in range(cfg.model.num_classes)]
    if artifact_dir is not None:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        visualize.per_class_csv(result, dataset.classes, artifact_dir / "per_class_iou.csv")
        visualize.confusion_matrix_png(evaluator.confusion_matrix.cpu(), dataset.classes,
                                       artifact_dir / "confusion_matrix.png")
        palette = dataset.palette if dataset.palette is not None else _palette(cfg.model.num_classes)
        for i, (img, pred, label) in enumerate(overlays):  # images of different sizes: one PNG per image
            visualize.overlay_png(img[None], pred[None], label[None], palette, artifact_dir / f"overlay_{i}.png")
    return Validation(
        metrics={"val/mIoU": result["mIoU"], "val/mAcc": result["mAcc"], "val/aAcc": result["aAcc"]},
        summary=f"mIoU {result['mIoU']:.2f} mAcc {result['mAcc']:.2f} aAcc {result['aAcc']:.2f}",
        details={f"val/IoU/{n}": v for n, v in zip(names, result["IoU"]) if not math.isnan(v)},
    )


def _palette(num_classes: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(num_classes, 3), dtype=np.uint8)


def bench_image_size(cfg: DictConfig) -> tuple[int, int]:
    """The image size `trainer.bench_images` times inference at: a typical ADE20K image rescaled to eval.test_scale."""
    from knetlab.evaluation.bench import TYPICAL_ADE20K_IMAGE
    from knetlab.evaluation.inference import rescale_size

    return rescale_size(TYPICAL_ADE20K_IMAGE, tuple(cfg.eval.test_scale))


FAMILY = TaskFamily(name="semantic", score_metric="val/mIoU", train_dataset=train_dataset, val_dataset=val_dataset,
                    batch_losses=batch_losses, validate=validate, bench_image_size=bench_image_size,
                    prepare_data=prepare_data, check_split=check_split, check_layout=check_layout,
                    collate=collate_segmentation, data_splits=data_splits)
