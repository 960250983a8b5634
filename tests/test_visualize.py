"""Evaluation artifacts: the overlay's pixels are checked exactly, the confusion matrix renders a real PNG, the CSV
round-trips."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image

from knetlab.evaluation import SegEvaluator, confusion_matrix_png, overlay_png, per_class_csv

MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def normalised(rgb: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> the normalised (B, 3, H, W) float the data pipeline produces."""
    return torch.from_numpy(((rgb - MEAN) / STD).astype(np.float32)).permute(0, 3, 1, 2)


def test_overlay_pixels_are_image_blend_and_untouched_ignore(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(2, 6, 8, 3), dtype=np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)
    preds = torch.from_numpy(rng.integers(0, 3, size=(2, 6, 8)))
    labels = torch.from_numpy(rng.integers(0, 3, size=(2, 6, 8)))
    labels[0, 0, :] = 255
    path = overlay_png(normalised(rgb), preds, labels, palette, tmp_path / "overlay.png", alpha=0.5)
    grid = np.asarray(Image.open(path).convert("RGB"))
    gap = 4
    assert grid.shape == (2 * 6 + gap, 3 * 8 + 2 * gap, 3)
    for i in range(2):
        y = i * (6 + gap)
        image_panel = grid[y : y + 6, 0:8]
        label_panel = grid[y : y + 6, 8 + gap : 16 + gap]
        pred_panel = grid[y : y + 6, 16 + 2 * gap : 24 + 2 * gap]
        np.testing.assert_array_equal(image_panel, rgb[i])  # denormalisation recovers the image exactly
        expected_pred = np.rint(0.5 * rgb[i] + 0.5 * palette[preds[i].numpy()]).astype(np.uint8)
        np.testing.assert_array_equal(pred_panel, expected_pred)
        lab = labels[i].numpy()
        expected_label = rgb[i].copy()
        valid = lab != 255
        expected_label[valid] = np.rint(0.5 * rgb[i][valid] + 0.5 * palette[lab[valid]]).astype(np.uint8)
        np.testing.assert_array_equal(label_panel, expected_label)
    assert np.all(grid[6 : 6 + gap] == 255)  # the white gap between rows


def test_overlay_resizes_the_image_to_the_prediction_and_checks_inputs(tmp_path):
    images = normalised(np.zeros((1, 12, 16, 3), dtype=np.uint8))
    preds = torch.zeros(1, 6, 8, dtype=torch.long)
    path = overlay_png(images, preds, None, [[10, 20, 30]], tmp_path / "sub" / "o.png")
    assert Image.open(path).size == (2 * 8 + 4, 6)  # image + prediction panels, no ground-truth column
    with pytest.raises(ValueError, match=r"preds has class ids in \[3, 3\] but the palette has 1 colours"):
        overlay_png(images, torch.full((1, 6, 8), 3), None, [[10, 20, 30]], tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"palette must be \(num_classes, 3\)"):
        overlay_png(images, preds, None, [1, 2, 3], tmp_path / "bad.png")


def test_confusion_matrix_png_renders(tmp_path):
    rng = np.random.default_rng(1)
    evaluator = SegEvaluator(40)
    labels = torch.from_numpy(rng.integers(0, 40, size=(2, 32, 32)))
    preds = labels.clone()
    preds[torch.from_numpy(rng.random((2, 32, 32)) < 0.3)] = 0
    evaluator.update(preds, labels)
    names = [f"class{i}" for i in range(40)]
    path = confusion_matrix_png(evaluator.confusion_matrix, names, tmp_path / "cm.png", top_k=12)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 300 and img.size[1] > 300
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 10  # not a blank canvas
    with pytest.raises(ValueError, match=r"cm must be square"):
        confusion_matrix_png(np.zeros((3, 4)), None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="39 class names for a 40-class matrix"):
        confusion_matrix_png(evaluator.confusion_matrix, names[:-1], tmp_path / "x.png")


def test_per_class_csv_round_trips(tmp_path):
    evaluator = SegEvaluator(4)
    evaluator.update(torch.tensor([[[0, 1, 1, 2], [1, 2, 0, 1]]]), torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 255]]]))
    result = evaluator.compute()
    path = per_class_csv(result, ["wall", "building", "sky", "floor"], tmp_path / "iou.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["wall", "building", "sky", "floor"]
    assert [r["class_id"] for r in rows] == ["0", "1", "2", "3"]
    assert float(rows[0]["IoU"]) == pytest.approx(66.6667, abs=1e-4)
    assert float(rows[1]["IoU"]) == pytest.approx(50.0)
    assert float(rows[2]["IoU"]) == 0.0 and rows[2]["Acc"] == "nan" and math.isnan(float(rows[3]["IoU"]))
    with pytest.raises(ValueError, match="2 class names, 4 IoU"):
        per_class_csv(result, ["a", "b"], tmp_path / "bad.csv")
