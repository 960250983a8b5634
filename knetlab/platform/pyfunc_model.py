"""The knetlab MLflow model (an MLflow pyfunc): `mlflow.pyfunc.load_model(uri).predict(images)` runs the same
inference as `knetlab predict` (knetlab.platform.predictor) on the checkpoint stored among the model's artifacts.

Input: uint8 RGB images (B, H, W, 3) of one size (a single (H, W, 3) image is taken as a batch of one).
Output: {"labels": int32 (B, H, W)} class index per pixel; panoptic and instance models add "segment_ids" (B, H, W)
(segments / instances; 0 = none) and use 255 in "labels" for unlabelled pixels."""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np

BATCH = 4  # images per forward pass inside one predict call


class KnetlabModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from knetlab.platform.predictor import load_predictor

        self.predictor = load_predictor(context.artifacts["checkpoint"])

    # model_input has no type hint: MLflow would take one for a signature of its own instead of the logged one
    def predict(self, context, model_input, params=None) -> dict[str, np.ndarray]:
        return predict_arrays(self.predictor, model_input)


def predict_arrays(predictor: Any, model_input: Any) -> dict[str, np.ndarray]:
    from knetlab.platform.predictor import predict_images

    if isinstance(model_input, dict) and len(model_input) == 1:  # {"inputs": images} as a served request has it
        model_input = next(iter(model_input.values()))
    images = np.asarray(model_input)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"knetlab model: images must be uint8 (B, H, W, 3) RGB, got {images.dtype} "
                         f"{tuple(images.shape)}")
    results = []
    for start in range(0, len(images), BATCH):
        results += predict_images(predictor, list(images[start:start + BATCH]))
    out = {"labels": np.stack([r["labels"].astype(np.int32) for r in results])}
    if predictor.task != "semantic":
        out["segment_ids"] = np.stack([r["segment_ids"].astype(np.int32) for r in results])
    return out
