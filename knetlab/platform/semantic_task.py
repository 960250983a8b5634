"""The semantic segmentation task family (ADE20K, or a dataset of your own in its folder layout or list files): its
datasets, the per-pixel losses of one batch, the validation (mIoU/mAcc/aAcc, per-class IoU, confusion matrix and
overlays, named with the dataset's classes) that the training loop runs, the multi-scale + flip evaluation after
training, and its table in `knetlab compare` (the K-Net ADE20K table)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from omegaconf import DictConfig

from knetlab.data.ade20k import ADE20KDataset
from knetlab.data.classes import DatasetClasses, dataset_classes
from knetlab.data.transforms import (
    build_test_transform,
    build_train_transform,
    collate_segmentation,
    normalize_images,
)
from knetlab.evaluation.inference import predict, predict_settings
from knetlab.evaluation.metrics import SegEvaluator
from knetlab.platform.task_family import BENCH_COLUMNS, ResultTable, TaskFamily, Validation
from knetlab.redact import redact

# The table's names for the zoo's head and backbone tags.
METHOD_NAMES = {"fcn": "KNet + FCN", "psp": "KNet + PSPNet", "pspnet": "KNet + PSPNet", "aspp": "KNet + DeepLabV3",
                "deeplabv3": "KNet + DeepLabV3", "upernet": "KNet + UperNet"}
BACKBONE_NAMES = {"r50-d8": "R-50-D8", "resnet50-d8": "R-50-D8", "swin-t": "Swin-T", "swin_t": "Swin-T",
                  "swin-l": "Swin-L", "swin_l": "Swin-L"}


def classes_of(cfg: DictConfig) -> DatasetClasses:
    """The dataset's class names and palette (settled in the config when it was loaded)."""
    return dataset_classes(cfg.data, cfg.model.num_classes, look_beside_data=False)


def dataset_options(cfg: DictConfig, split: str) -> dict:
    """What the training and validation datasets share: classes, label encoding, list file, cache."""
    classes = classes_of(cfg)
    return {"num_classes": cfg.model.num_classes, "reduce_zero_label": cfg.data.reduce_zero_label,
            "list_file": list_file(cfg, split), "classes": classes.names, "palette": classes.palette,
            "cache_dir": cfg.data.cache_dir}


def list_file(cfg: DictConfig, split: str) -> str | None:
    return cfg.data.train_list if split == "training" else cfg.data.val_list


def train_dataset(cfg: DictConfig) -> ADE20KDataset:
    data_cfg = cfg.data
    return ADE20KDataset(
        data_cfg.root, "training",
        build_train_transform(data_cfg.crop_size, scale=tuple(data_cfg.scale), ratio_range=tuple(data_cfg.ratio_range),
                              cat_max_ratio=data_cfg.cat_max_ratio),
        seed=cfg.trainer.seed, **dataset_options(cfg, "training"),
    )


def val_dataset(cfg: DictConfig, transform=None) -> ADE20KDataset:
    """The validation split, resized to eval.test_scale (or by `transform`, e.g. `build_test_transform(None)`)."""
    return ADE20KDataset(cfg.data.root, "validation", transform or build_test_transform(tuple(cfg.eval.test_scale)),
                         max_images=cfg.data.val_max_images, **dataset_options(cfg, "validation"))


def prepare_data(cfg: DictConfig) -> None:
    root = cfg.data.root
    if cfg.data.synthesize and "://" not in root and not Path(root).exists():
        from knetlab.data.synthetic import generate_synthetic_ade20k

        print(f"[knetlab] generating the synthetic ADE20K-format dataset at {root}", flush=True)
        generate_synthetic_ade20k(root)
    for split in ("training", "validation"):
        check_split(cfg, split)
    check_classes_beside_data(cfg)
    classes = classes_of(cfg)
    print(f"[knetlab] dataset {redact(cfg.data.root)}: {len(classes.names)} classes from {redact(classes.source)}, "
          f"reduce_zero_label={str(cfg.data.reduce_zero_label).lower()}", flush=True)


def check_split(cfg: DictConfig, split: str) -> None:
    from knetlab.data.check import check_split as check_dataset_split

    check_dataset_split(cfg.data.root, split, num_classes=cfg.model.num_classes,
                        reduce_zero_label=cfg.data.reduce_zero_label, cache_dir=cfg.data.cache_dir,
                        list_file=list_file(cfg, split))


def check_classes_beside_data(cfg: DictConfig) -> None:
    """A dataset that names its classes in a file the config did not read (an s3:// dataset's classes.txt is only
    seen in its local copy) would be trained and reported under ADE20K's or class_<id> names: refused."""
    from knetlab.data import DatasetError
    from knetlab.data.cache import cache_path
    from knetlab.data.classes import find_classes_file, read_classes_file

    classes = classes_of(cfg)
    if classes.own:
        return
    root = cfg.data.root
    found = find_classes_file(cache_path(root, cfg.data.cache_dir) if root.startswith("s3://") else root)
    if found is not None:
        names = read_classes_file(found).names
        raise DatasetError(f"{found}: the dataset names its {len(names)} classes here, but the config uses "
                           f"{classes.source}'s {len(classes.names)}; set data.classes_file to this file's "
                           f"{'s3:// URI' if root.startswith('s3://') else 'path'} (or the names in data.classes)")


def check_layout(root: str, list_files: tuple[str | None, str | None] = (None, None)) -> None:
    """A local root has both splits: ADE20K's folders, or the (training, validation) list files given."""
    from knetlab.data.ade20k import split_pairs

    for split, split_list in zip(("training", "validation"), list_files):
        split_pairs(root, split, split_list)


def data_splits(cfg: DictConfig) -> dict[str, list[Path]]:
    """Each split's files (in the local copy of an s3:// data.root): its list file and the pairs it names, else
    ADE20K's image and annotation folders."""
    from knetlab.data.ade20k import find_dataset_dir, split_dir_name, split_pairs
    from knetlab.data.cache import resolve_dataset_root
    from knetlab.data.list_file import list_file_path

    root = resolve_dataset_root(cfg.data.root, cfg.data.cache_dir, progress=False)
    splits = {}
    for split in ("training", "validation"):
        listed = list_file(cfg, split)
        if listed:
            pairs = split_pairs(root, split, listed)
            splits[split] = [list_file_path(listed, root), *(path for pair in pairs for path in pair)]
        else:
            folder = find_dataset_dir(root)
            splits[split] = [folder / "images" / split_dir_name(split), folder / "annotations" / split_dir_name(split)]
    return splits


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
    classes = classes_of(cfg)
    if artifact_dir is not None:
        artifact_dir.mkdir(parents=True, exist_ok=True)
        visualize.per_class_csv(result, classes.names, artifact_dir / "per_class_iou.csv")
        visualize.confusion_matrix_png(evaluator.confusion_matrix.cpu(), classes.names,
                                       artifact_dir / "confusion_matrix.png")
        for i, (img, pred, label) in enumerate(overlays):  # images of different sizes: one PNG per image
            visualize.overlay_png(img[None], pred[None], label[None], classes.palette,
                                  artifact_dir / f"overlay_{i}.png", class_names=classes.names)
    return Validation(
        metrics={"val/mIoU": result["mIoU"], "val/mAcc": result["mAcc"], "val/aAcc": result["aAcc"]},
        summary=f"mIoU {result['mIoU']:.2f} mAcc {result['mAcc']:.2f} aAcc {result['aAcc']:.2f}",
        details={f"val/IoU/{n}": v for n, v in zip(metric_names(classes.names), result["IoU"]) if not math.isnan(v)},
    )


def metric_names(names: tuple[str, ...]) -> list[str]:
    """Class names as MLflow metric-name parts (letters, digits, `_-. :/`; others become `_`), kept distinct: a
    name MLflow refuses would make it drop the whole batch of metrics it came with."""
    safe: list[str] = []
    for index, name in enumerate(names):
        part = re.sub(r"[^\w.\- :/]", "_", name).replace("..", "_").strip("/") or f"class_{index}"
        safe.append(part if part not in safe else f"{part}_{index}")
    return safe


@torch.no_grad()
def validate_ms_flip(model: torch.nn.Module, cfg: DictConfig, device: torch.device, rank: int,
                     world_size: int) -> dict[str, float]:
    """mIoU with multi-scale + flip (eval.ms_ratios, eval.flip: the table's mIoU(ms+flip) column) on the validation
    split, as `knetlab eval --ms-flip` computes it: the original images, rescaled per ratio; each worker takes every
    world_size-th image and the counts are summed over workers."""
    model.eval()
    dataset = val_dataset(cfg, build_test_transform(None))
    evaluator = SegEvaluator(cfg.model.num_classes)
    settings = predict_settings(cfg.eval, ms_flip=True)
    for index in range(rank, len(dataset), world_size):
        item = dataset[index]
        label = item["label"][None].to(device).long()
        evaluator.update(predict(model, normalize_images([item["image"]], device), label.shape[-2:], **settings), label)
    evaluator.all_reduce()
    return {"val/mIoU_msflip": evaluator.compute()["mIoU"]}


def table_labels(tags: Mapping[str, str], params: Mapping[str, str]) -> tuple[str, ...]:
    """A run's Method, Backbone, Crop Size and Lr schd (its iterations) from the tags the trainer sets."""
    head, backbone, crop = tags.get("head"), tags.get("backbone"), tags.get("crop")
    return (METHOD_NAMES.get((head or "").lower(), head or "-"),
            BACKBONE_NAMES.get((backbone or "").lower(), backbone or "-"),
            f"{crop}x{crop}" if crop else "-", params.get("trainer.max_iters") or "-")


TABLE = ResultTable(label_columns=("Method", "Backbone", "Crop Size", "Lr schd"), labels=table_labels,
                    metric_columns=(*BENCH_COLUMNS, ("mIoU", "val/mIoU"), ("mIoU(ms+flip)", "val/mIoU_msflip")),
                    score_column="mIoU")


def bench_image_size(cfg: DictConfig) -> tuple[int, int]:
    """The image size `trainer.bench_images` times inference at: a typical ADE20K image rescaled to eval.test_scale."""
    from knetlab.evaluation.bench import TYPICAL_ADE20K_IMAGE
    from knetlab.evaluation.inference import rescale_size

    return rescale_size(TYPICAL_ADE20K_IMAGE, tuple(cfg.eval.test_scale))


FAMILY = TaskFamily(name="semantic", score_metric="val/mIoU", train_dataset=train_dataset, val_dataset=val_dataset,
                    batch_losses=batch_losses, validate=validate, bench_image_size=bench_image_size,
                    prepare_data=prepare_data, check_split=check_split, check_layout=check_layout, table=TABLE,
                    collate=collate_segmentation, validate_ms_flip=validate_ms_flip, fixed_crop=True,
                    data_splits=data_splits)
