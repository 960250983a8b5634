"""A trained model ready for inference on plain images, as `knetlab predict` and the MLflow model run it: the
checkpoint's model and config, the experiment's test settings (eval.test_scale, whole/slide, multi-scale + flip),
the device and AMP, and one function per task family that turns uint8 RGB images into results at their original
size. Every image is resized into eval.test_scale first, as the test pipeline does (so a large image costs no more
than a small one), and brought back to its original size at the end (in bands of rows for the class scores).

Results per image (numpy, original size H x W):
    semantic  {"labels": (H, W) class index}
    panoptic  {"labels": (H, W) category index (255 = VOID), "segment_ids": (H, W) int32 (0 = VOID),
               "segments": [{"id", "category", "isthing", "score", "area"}]}
    instance  {"labels": (H, W) category of the top instance (255 = none), "segment_ids": (H, W) int32 instance
               ids (0 = none, 1 = the highest score; masks under score_threshold left out), "segments": [...]}
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from knetlab.data.transforms import nearest_indices, normalize_images, rescale_size, resize_image
from knetlab.evaluation.inference import input_scores, predict_settings, upsample_argmax
from knetlab.platform.class_names import class_names, class_palette

IGNORE = 255
INSTANCE_SCORE_THRESHOLD = 0.3  # instance masks drawn into the id map (the panoptic fusion's thing threshold)
# Panoptic/instance masks are fused at the original size (as the reference) while (masks x pixels) stays under this;
# above it at the test scale, and the id maps are enlarged (nearest).
DETECTION_FULL_SIZE_ELEMENTS = 1 << 27


@dataclass
class Predictor:
    model: torch.nn.Module
    cfg: DictConfig
    task: str
    device: torch.device
    settings: dict[str, Any]  # knetlab.evaluation.predict_settings of the experiment's eval section
    amp_dtype: torch.dtype | None = None
    names: list[str] = field(default_factory=list)
    palette: np.ndarray | None = None
    score_threshold: float = INSTANCE_SCORE_THRESHOLD


def load_predictor(model_uri: str, *, device: str | None = None, ms_flip: bool = False, mode: str | None = None,
                   amp: bool = True, work_dir: str | Path | None = None) -> Predictor:
    """The model at `model_uri` (see model_source) on `device` (default: cuda when present), with the checkpoint's
    eval settings; `mode` overrides eval.mode (whole | slide). AMP (bf16 where supported, else fp16) on GPUs only."""
    from knetlab.platform.checkpoint import load_model_from_checkpoint
    from knetlab.platform.model_source import fetch_checkpoint

    directory = fetch_checkpoint(model_uri, work_dir)
    model, cfg = load_model_from_checkpoint(str(directory))
    return make_predictor(model, cfg, device=device, ms_flip=ms_flip, mode=mode, amp=amp)


def make_predictor(model: torch.nn.Module, cfg: DictConfig, *, device: str | None = None, ms_flip: bool = False,
                   mode: str | None = None, amp: bool = True) -> Predictor:
    from knetlab.platform.config import ConfigError
    from knetlab.platform.task_family import task_of

    task = task_of(cfg)
    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible to PyTorch here (use --device cpu)")
    settings = predict_settings(cfg.eval, ms_flip=ms_flip)
    if mode is not None:
        settings["mode"] = mode
    if task != "semantic" and (ms_flip or settings["mode"] != "whole"):
        raise ConfigError(f"multi-scale + flip and slide inference are for semantic models; {cfg.model.name} is a "
                          f"{task} model (it runs on the whole image at eval.test_scale, as the reference)")
    amp_dtype = None
    if amp and target.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Predictor(model=model.eval().to(target), cfg=cfg, task=task, device=target, settings=settings,
                     amp_dtype=amp_dtype, names=class_names(cfg), palette=class_palette(cfg))


def working_size(predictor: Predictor, hw: Sequence[int]) -> tuple[int, int]:
    """The size an image of (h, w) is resized to before the model: keep-ratio into eval.test_scale."""
    return rescale_size(hw, predictor.settings["test_scale"])


def predict_images(predictor: Predictor, images: Sequence[np.ndarray]) -> list[dict[str, Any]]:
    """Results (see the module docstring) for uint8 (H, W, 3) RGB images that share one `working_size`."""
    if not images:
        return []
    sizes = {working_size(predictor, image.shape[:2]) for image in images}
    if len(sizes) != 1:
        raise ValueError(f"predict_images: one batch needs one working size, got {sorted(sizes)}")
    with torch.no_grad(), autocast(predictor):
        return TASK_PREDICTIONS[predictor.task](predictor, list(images), sizes.pop())


def autocast(predictor: Predictor) -> contextlib.AbstractContextManager:
    if predictor.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(predictor.device.type, dtype=predictor.amp_dtype)


def _tensors(images: Sequence[np.ndarray], size: tuple[int, int]) -> list[torch.Tensor]:
    """uint8 (3, h, w) tensors resized (cv2 bilinear on uint8, as the test pipeline) to `size`."""
    return [torch.from_numpy(np.ascontiguousarray(resize_image(image, size))).permute(2, 0, 1) for image in images]


def predict_semantic(predictor: Predictor, images: list[np.ndarray], size: tuple[int, int]) -> list[dict[str, Any]]:
    batch = normalize_images(_tensors(images, size), predictor.device)
    scores = input_scores(predictor.model, batch, **predictor.settings).float()
    dtype = np.uint8 if len(predictor.names) <= IGNORE else np.int32
    return [{"labels": upsample_argmax(scores[i:i + 1], image.shape[:2])[0].cpu().numpy().astype(dtype)}
            for i, image in enumerate(images)]


def predict_detection(predictor: Predictor, images: list[np.ndarray], size: tuple[int, int]) -> list[dict[str, Any]]:
    """Panoptic fusion or instance top-k of the reference at the original size (at the test scale for images too
    large for that, then enlarged), as id maps with their segments."""
    from knetlab.data.det_transforms import batch_images

    model = predictor.model
    masks = model.num_proposals + model.num_stuff_classes if model.task == "panoptic" else 100
    metas = []
    for image in images:
        full = masks * image.shape[0] * image.shape[1] <= DETECTION_FULL_SIZE_ELEMENTS
        metas.append({"img_shape": size, "ori_shape": tuple(image.shape[:2]) if full else size})
    results = model(batch_images(_tensors(images, size), predictor.device), metas)
    convert = panoptic_maps if model.task == "panoptic" else instance_maps
    out = []
    for image, result in zip(images, results):
        maps = convert(result, predictor.score_threshold)
        if maps["labels"].shape != image.shape[:2]:
            rows, cols = nearest_indices(size[0], image.shape[0]), nearest_indices(size[1], image.shape[1])
            for key in ("labels", "segment_ids"):
                maps[key] = maps[key][rows][:, cols]
            areas = np.bincount(maps["segment_ids"].ravel(), minlength=len(maps["segments"]) + 1)
            for segment in maps["segments"]:
                segment["area"] = int(areas[segment["id"]])
        out.append(maps)
    return out


def panoptic_maps(result: dict[str, Any], score_threshold: float) -> dict[str, Any]:
    pan = result["pan_seg"].cpu().numpy().astype(np.int32)
    lookup = np.full(len(result["segments"]) + 1, IGNORE, dtype=np.uint8)
    areas = np.bincount(pan.ravel(), minlength=len(lookup))
    segments = []
    for segment in result["segments"]:
        lookup[segment["id"]] = segment["category"]
        segments.append({"id": int(segment["id"]), "category": int(segment["category"]),
                         "isthing": bool(segment["isthing"]), "score": round(float(segment["score"]), 4),
                         "area": int(areas[segment["id"]])})
    return {"labels": lookup[pan], "segment_ids": pan, "segments": segments}


def instance_maps(result: dict[str, torch.Tensor], score_threshold: float) -> dict[str, Any]:
    """Instances scored at least `score_threshold`, id 1 the best, painted lowest score first (the best on top)."""
    masks, labels, scores = result["masks"].cpu(), result["labels"].cpu(), result["scores"].cpu()
    keep = [i for i in torch.argsort(scores, descending=True).tolist() if scores[i] >= score_threshold]
    ids = np.zeros(masks.shape[-2:], dtype=np.int32)
    category = np.full(masks.shape[-2:], IGNORE, dtype=np.uint8)
    for rank in range(len(keep) - 1, -1, -1):
        mask = masks[keep[rank]].numpy()
        ids[mask], category[mask] = rank + 1, int(labels[keep[rank]])
    areas = np.bincount(ids.ravel(), minlength=len(keep) + 1)
    segments = [{"id": rank + 1, "category": int(labels[index]), "isthing": True,
                 "score": round(float(scores[index]), 4), "area": int(areas[rank + 1])}
                for rank, index in enumerate(keep)]
    return {"labels": category, "segment_ids": ids, "segments": segments}


TASK_PREDICTIONS: dict[str, Callable[[Predictor, list[np.ndarray], tuple[int, int]], list[dict[str, Any]]]] = {
    "semantic": predict_semantic,
    "panoptic": predict_detection,
    "instance": predict_detection,
}
