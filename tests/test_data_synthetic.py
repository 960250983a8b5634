"""The synthetic ADE20K-format generator: exact layout, determinism, parameters, and that a tiny model learns it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knetlab.data import (
    ADE20KDataset,
    DatasetError,
    build_test_transform,
    build_train_transform,
    check_split,
    collate_segmentation,
    default_class_ids,
    generate_synthetic_ade20k,
    normalize_images,
)


def all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_is_adechallengedata2016s(tmp_path: Path):
    root = generate_synthetic_ade20k(tmp_path, num_train=5, num_val=3, num_classes=8, min_side=40, max_side=90,
                                     seed=4)
    assert root == tmp_path / "ADEChallengeData2016"
    expected = {f"images/training/ADE_train_{i:08d}.jpg" for i in range(1, 6)}
    expected |= {f"annotations/training/ADE_train_{i:08d}.png" for i in range(1, 6)}
    expected |= {f"images/validation/ADE_val_{i:08d}.jpg" for i in range(1, 4)}
    expected |= {f"annotations/validation/ADE_val_{i:08d}.png" for i in range(1, 4)}
    assert set(all_files(root)) == expected
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "ADEChallengeData2016", "knetlab-synthetic.json"]
    class_ids = set(default_class_ids(8))
    assert class_ids == {1, 22, 44, 65, 86, 107, 129, 150}
    seen: set[int] = set()
    sizes = set()
    for image_path in sorted(root.rglob("*.jpg")):
        label_path = Path(str(image_path).replace("/images/", "/annotations/")).with_suffix(".png")
        with Image.open(image_path) as image, Image.open(label_path) as label:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert label.format == "PNG" and label.mode == "L" and label.size == image.size
            assert 40 <= min(image.size) and max(image.size) <= 90
            sizes.add(image.size)
            values = set(np.unique(np.array(label)).tolist())
        assert values <= class_ids | {0}
        seen |= values
    assert len(sizes) > 4  # random sizes and aspect ratios
    assert len(seen & class_ids) >= 6 and 0 in seen  # most classes appear, and some "other" (0)
    assert len(check_split(tmp_path, "training")) == 5 and len(check_split(tmp_path, "validation")) == 3


def test_generation_is_deterministic(tmp_path: Path):
    args = dict(num_train=3, num_val=2, num_classes=5, min_side=32, max_side=64)
    first = all_files(generate_synthetic_ade20k(tmp_path / "a", seed=7, **args))
    second = all_files(generate_synthetic_ade20k(tmp_path / "b", seed=7, **args))
    other = all_files(generate_synthetic_ade20k(tmp_path / "c", seed=8, **args))
    assert first == second
    assert first.keys() == other.keys() and all(first[k] != other[k] for k in first)


def test_parameters(tmp_path: Path):
    root = generate_synthetic_ade20k(tmp_path / "fixed", num_train=2, num_val=1, num_classes=3, class_ids=[3, 5, 7],
                                     image_size=(24, 40), jpeg_quality=90, seed=1)
    for path in root.rglob("*.png"):
        with Image.open(path) as label:
            assert label.size == (40, 24)
            assert set(np.unique(np.array(label)).tolist()) <= {0, 3, 5, 7}
    params = json.loads((tmp_path / "fixed" / "knetlab-synthetic.json").read_text())
    assert params["class_ids"] == [3, 5, 7] and params["image_size"] == [24, 40]


def test_existing_output_and_bad_parameters(tmp_path: Path):
    args = dict(num_train=1, num_val=1, num_classes=2, image_size=(16, 16), seed=0)
    root = generate_synthetic_ade20k(tmp_path, **args)
    before = all_files(root)
    assert generate_synthetic_ade20k(tmp_path, exist_ok=True, **args) == root
    assert all_files(root) == before
    with pytest.raises(DatasetError, match="already exists"):
        generate_synthetic_ade20k(tmp_path, **args)
    with pytest.raises(DatasetError, match="generated with other arguments"):
        generate_synthetic_ade20k(tmp_path, exist_ok=True, **{**args, "seed": 1})
    bad = [
        (dict(num_train=0), "num_train must be >= 1"),
        (dict(num_classes=151), "num_classes must be in 1..150"),
        (dict(num_classes=2, class_ids=[0, 3]), "class_ids must be distinct ADE20K labels"),
        (dict(min_side=100, max_side=50), "min_side <= max_side"),
        (dict(image_size=(4, 4)), "image_size"),
        (dict(label_mode="RGB"), "label_mode"),
        (dict(jpeg_quality=0), "jpeg_quality"),
    ]
    for kwargs, fragment in bad:
        with pytest.raises(DatasetError, match=fragment):
            generate_synthetic_ade20k(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad" / "ADEChallengeData2016").exists()


class TinySegmenter(torch.nn.Module):
    """A few convolutions: enough to learn colour and texture, nothing like K-Net."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 24, 3, padding=1), torch.nn.BatchNorm2d(24), torch.nn.ReLU(),
            torch.nn.Conv2d(24, 32, 3, padding=2, dilation=2), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, padding=4, dilation=4), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, num_classes, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_tiny_model_learns_the_synthetic_data_on_cpu(tmp_path: Path):
    """Through the real pipeline (dataset, reference train transform, DataLoader): 150 iterations of a
    tiny CNN reach an mIoU far above what a constant or chance prediction gets."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is as fast, and immune to a busy shared machine
    try:
        miou, accuracy, majority = _train_and_evaluate_tiny_model(tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert miou > 0.5 and accuracy > majority + 0.3


def _train_and_evaluate_tiny_model(tmp_path: Path) -> tuple[float, float, float]:
    class_ids = default_class_ids(8)
    generate_synthetic_ade20k(tmp_path, num_train=24, num_val=8, num_classes=8, min_side=64, max_side=128, seed=0)
    transform = build_train_transform(48, scale=(192, 72), ratio_range=(0.75, 1.5))
    train = ADE20KDataset(tmp_path, "training", transform, seed=0)
    to_compact = torch.full((256,), 255, dtype=torch.int64)
    to_compact[torch.tensor(class_ids) - 1] = torch.arange(8)  # 150-way labels -> the 8 classes in use
    model = TinySegmenter(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    iteration = 0
    for epoch in range(100):
        train.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, num_workers=0,
                                                 collate_fn=collate_segmentation):
            images = normalize_images(batch["image"], size=batch["label"].shape[-2:])
            loss = torch.nn.functional.cross_entropy(model(images), to_compact[batch["label"].long()],
                                                     ignore_index=255)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            iteration += 1
            if iteration == 150:
                break
        if iteration == 150:
            break
    model.eval()
    confusion = torch.zeros(8, 8, dtype=torch.int64)
    with torch.no_grad():
        for item in ADE20KDataset(tmp_path, "validation", build_test_transform(None)):
            prediction = model(normalize_images([item["image"]]))[0].argmax(0)
            target = to_compact[item["label"].long()]
            valid = target != 255
            confusion += torch.bincount(target[valid] * 8 + prediction[valid], minlength=64).view(8, 8)
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp(min=1)
    present = confusion.sum(1) > 0
    miou = iou[present].mean().item()
    accuracy = (confusion.diag().sum() / confusion.sum()).item()
    majority = (confusion.sum(1).max() / confusion.sum()).item()
    print(f"tiny model after {iteration} iterations: mIoU {miou:.3f}, accuracy {accuracy:.3f} "
          f"(majority class {majority:.3f}, constant-prediction mIoU <= {1 / present.sum().item():.3f})")
    return miou, accuracy, majority
