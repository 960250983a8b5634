"""`knetlab eval`: a checkpoint (local or s3://) evaluated on the validation split, single scale and optionally
multi-scale + flip, printed as the table's metrics and a per-class table (and logged to MLflow when asked)."""

from __future__ import annotations

import sys
import time
from typing import Any

import torch
from omegaconf import DictConfig

from knetlab.data.ade20k import ADE20KDataset, check_split
from knetlab.data.transforms import build_test_transform
from knetlab.evaluation.inference import predict, predict_settings
from knetlab.evaluation.metrics import SegEvaluator, format_table
from knetlab.platform.checkpoint import load_model_from_checkpoint


def evaluate_checkpoint(cfg: DictConfig, checkpoint_uri: str, ms_flip: bool = False) -> dict[str, Any]:
    """Evaluate the checkpoint's model on `cfg.data.root`'s validation split with `cfg.eval` settings."""
    check_split(cfg.data.root, "validation", num_classes=cfg.model.num_classes, cache_dir=cfg.data.cache_dir)
    model, trained_cfg = load_model_from_checkpoint(checkpoint_uri)
    if trained_cfg.model.num_classes != cfg.model.num_classes:
        raise ValueError(f"checkpoint {checkpoint_uri} predicts {trained_cfg.model.num_classes} classes but "
                         f"model.num_classes={cfg.model.num_classes}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    # The original images: single scale resizes to eval.test_scale itself, ms+flip resizes per ratio.
    dataset = ADE20KDataset(cfg.data.root, "validation", build_test_transform(None),
                            num_classes=cfg.model.num_classes, max_images=cfg.data.val_max_images,
                            cache_dir=cfg.data.cache_dir)
    passes = {"val/": predict_settings(cfg.eval)}
    if ms_flip:
        passes["val/msflip/"] = predict_settings(cfg.eval, ms_flip=True)
    evaluators = {prefix: SegEvaluator(cfg.model.num_classes) for prefix in passes}
    start = time.perf_counter()
    with torch.no_grad():
        for index in range(len(dataset)):
            item = dataset[index]
            image, label = item["image"][None].to(device), item["label"][None].to(device)
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
    print(format_table(single, dataset.classes))
    print("  ".join(f"{k} {v:.2f}" for k, v in metrics.items()))
    return {"metrics": metrics, "results": results}
