"""The K-Net COCO pipelines: mmdet's keep-ratio scale rule against hand-computed sizes, the ms-3x 'range' sampling,
nearest resizing and flipping of masks and semantic maps alike with the image, per-item repeatability, and the
device-side batching (normalise, zero-pad to 32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from knetlab.data.det_transforms import (
    SCALE_MS_3X,
    DetRandomFlip,
    DetResize,
    DetSample,
    batch_images,
    build_det_test_transform,
    build_det_train_transform,
    collate_detection,
    sample_scale,
)
from knetlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD


def make_sample(h: int, w: int, seed: int = 0) -> DetSample:
    """An image whose pixels encode their own position, two masks and a semantic map built from the masks."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    masks = np.stack([(xx < w // 3) & (yy < h // 2), (xx >= w // 2) & (yy >= h // 3)])
    sem_seg = np.full((h, w), 255, dtype=np.uint8)
    sem_seg[masks[0]] = 7
    sem_seg[masks[1]] = 90
    return DetSample(image, masks, sem_seg)


@pytest.mark.parametrize(("hw", "scale", "expected"), [
    # factor = min(long / max(h, w), short / min(h, w)); side = int(side * factor + 0.5)
    ((480, 640), (1333, 800), (800, 1067)),   # 1.6667: 640 * 1.6667 = 1066.67
    ((427, 640), (1333, 800), (800, 1199)),   # 800 / 427 = 1.8735: 640 * 1.8735 = 1199.06
    ((1000, 300), (1333, 800), (1333, 400)),  # long side bound: 1.333 (300 * 1.333 = 399.9)
    ((300, 2000), (1333, 800), (200, 1333)),  # 0.6665: 300 * 0.6665 = 199.95
    ((480, 640), (128, 64), (64, 85)),        # the tiny demo's scale: 640 / 7.5 = 85.33
    ((64, 48), (800, 1333), (1067, 800)),     # the pair may come in any order
])
def test_keep_ratio_resize_matches_hand_computed_sizes(hw, scale, expected):
    out = build_det_test_transform(scale)(make_sample(*hw), None)
    assert out.image.shape == (*expected, 3) and out.image.dtype == np.uint8
    assert out.masks.shape == (2, *expected) and out.masks.dtype == bool
    assert out.sem_seg.shape == expected
    assert out.scale_factor == pytest.approx(min(max(scale) / max(hw), min(scale) / min(hw)))
    assert not out.flip


def test_masks_and_sem_seg_are_resized_nearest_with_the_same_indices():
    sample = make_sample(2, 3)
    sample = DetSample(sample.image, np.array([[[1, 0, 0], [0, 1, 1]]], dtype=bool),
                       np.array([[1, 2, 3], [4, 5, 255]], dtype=np.uint8))
    out = DetResize(((6, 4),))(sample)  # exactly 2x: cv2 INTER_NEAREST repeats every pixel twice
    assert out.masks[0].astype(int).tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                                 [0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert out.sem_seg.tolist() == [[1, 1, 2, 2, 3, 3], [1, 1, 2, 2, 3, 3], [4, 4, 5, 5, 255, 255],
                                    [4, 4, 5, 5, 255, 255]]
    big = make_sample(37, 53)
    out = DetResize(((41, 29),))(big)  # a downscale by a non-integer factor
    rebuilt = np.full(out.sem_seg.shape, 255, dtype=np.uint8)
    rebuilt[out.masks[0]] = 7
    rebuilt[out.masks[1]] = 90
    assert np.array_equal(rebuilt, out.sem_seg)  # masks and map picked the same source pixels


def test_ms3x_range_draws_every_short_edge_from_640_to_800_and_keeps_the_long_edge():
    rng = np.random.default_rng(0)
    draws = [sample_scale(SCALE_MS_3X, "range", rng) for _ in range(3000)]
    assert {long for long, _ in draws} == {1333}
    assert {short for _, short in draws} == set(range(640, 801))  # both ends included, as randint(lo, hi + 1)
    draws = [sample_scale(((100, 50), (120, 60)), "range", rng) for _ in range(500)]
    assert {long for long, _ in draws} == set(range(100, 121)) and {s for _, s in draws} == set(range(50, 61))
    assert {sample_scale(((100, 50), (120, 60)), "value", rng) for _ in range(100)} == {(100, 50), (120, 60)}


def test_ms3x_resize_gives_the_drawn_short_side():
    transform = build_det_train_transform("ms-3x", flip_prob=0.0)
    for seed in range(3):
        scale = sample_scale(SCALE_MS_3X, "range", np.random.default_rng(seed))
        out = transform(make_sample(48, 64), np.random.default_rng(seed))
        short = scale[1]  # 64 / 48 * 800 < 1333: the short edge binds
        assert out.image.shape[:2] == (short, int(64 * short / 48 + 0.5)), (scale, out.image.shape)


def test_flip_moves_image_masks_and_sem_seg_alike():
    sample = make_sample(20, 30)
    out = DetRandomFlip(1.0)(sample, None)
    assert out.flip
    assert np.array_equal(out.image, sample.image[:, ::-1])
    assert np.array_equal(out.masks, sample.masks[:, :, ::-1])
    assert np.array_equal(out.sem_seg, sample.sem_seg[:, ::-1])
    assert np.array_equal(out.masks[0, 0], sample.masks[0, 0][::-1])  # the left block is now on the right
    assert out.masks[0, 0, -1] and not out.masks[0, 0, 0]
    flips = [DetRandomFlip(0.5)(sample, np.random.default_rng(i)).flip for i in range(200)]
    assert 60 < sum(flips) < 140
    assert not DetRandomFlip(0.0)(sample, np.random.default_rng(0)).flip


def test_training_augmentation_depends_only_on_the_generator():
    transform = build_det_train_transform(((64, 32), (96, 48)))
    sample = make_sample(40, 60)
    outcomes = set()
    for key in ([1, 0, 0], [1, 0, 1], [1, 1, 0], [2, 0, 0], [1, 0, 2], [1, 0, 3]):
        first = transform(sample, np.random.default_rng(key))
        again = transform(sample, np.random.default_rng(key))
        assert first.flip == again.flip and first.scale_factor == again.scale_factor
        for a, b in ((first.image, again.image), (first.masks, again.masks), (first.sem_seg, again.sem_seg)):
            assert np.array_equal(a, b)
        outcomes.add((first.image.shape, first.flip))
    assert len(outcomes) > 2  # different keys, different scales and flips


def test_builders_reject_bad_scales():
    with pytest.raises(ValueError, match="unknown scale schedule '2x'"):
        build_det_train_transform("2x")
    with pytest.raises(ValueError, match="positive edges"):
        build_det_train_transform((1333, 0))
    with pytest.raises(ValueError, match="one scale or two"):
        build_det_train_transform([(1, 2), (3, 4), (5, 6)])
    with pytest.raises(ValueError, match="one"):
        build_det_test_transform([(1333, 640), (1333, 800)])
    assert build_det_train_transform((1333, 800)).steps[0].scales == ((1333, 800),)
    assert build_det_train_transform("ms-3x").steps[0].scales == SCALE_MS_3X


def test_batch_images_normalises_then_zero_pads_to_32():
    torch.manual_seed(0)
    images = [torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8), torch.randint(0, 256, (3, 64, 33),
                                                                                   dtype=torch.uint8)]
    batch = batch_images(images, "cpu")
    assert batch.shape == (2, 3, 64, 96) and batch.dtype == torch.float32
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(batch[0, :, :50, :70], (images[0].float() - mean) / std)
    assert torch.allclose(batch[1, :, :64, :33], (images[1].float() - mean) / std)
    assert batch[0, :, 50:].abs().sum() == 0 and batch[0, :, :, 70:].abs().sum() == 0
    assert batch[1, :, :, 33:].abs().sum() == 0
    assert batch_images([torch.zeros((3, 64, 32), dtype=torch.uint8)]).shape == (1, 3, 64, 32)
    assert batch_images(images, size_divisor=1).shape == (2, 3, 64, 70)
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        batch_images([torch.zeros((64, 32), dtype=torch.uint8)])


def test_collate_keeps_sizes_and_lists_extra_keys():
    items = []
    for h, w in ((10, 12), (14, 9)):
        items.append({"image": torch.zeros((3, h, w), dtype=torch.uint8), "masks": torch.zeros((2, h, w),
                      dtype=torch.bool), "labels": torch.tensor([1, 2]), "sem_seg": None,
                      "meta": {"image_id": h}, "gt_pan": torch.zeros((h, w), dtype=torch.int64),
                      "gt_segments": [{"id": 1}]})
    batch = collate_detection(items)
    assert set(batch) == {"images", "targets", "metas", "gt_pan", "gt_segments"}
    assert [tuple(i.shape) for i in batch["images"]] == [(3, 10, 12), (3, 14, 9)]
    assert batch["targets"][1]["masks"].shape == (2, 14, 9) and batch["targets"][0]["sem_seg"] is None
    assert set(batch["targets"][0]) == {"masks", "labels", "sem_seg"}
    assert [m["image_id"] for m in batch["metas"]] == [10, 14] and batch["gt_segments"][0] == [{"id": 1}]
