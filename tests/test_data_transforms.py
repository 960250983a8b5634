"""The reference training/test pipelines: image and label stay aligned through every step, the crop's category
ratio rule (mmseg semantics), photometric distortion's order of draws and its value tables against mmseg's per-pixel
arithmetic, cv2 colour conversions and label resizing (golden values computed with opencv-python 4.10), keep-ratio
sizes, uint8 tensors, the device-side normalisation and padding, reproducibility."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from knetlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    Resize,
    ToTensor,
    build_test_transform,
    build_train_transform,
    category_counts,
    collate_segmentation,
    convert_table,
    flip_horizontal,
    hsv_to_rgb,
    normalize_images,
    rescale_size,
    resize_image,
    resize_label,
    rgb_to_hsv,
)

UNSAFE = 100  # label offset marking pixels next to a class boundary, where bilinear images legitimately blend


def code(classes: np.ndarray) -> np.ndarray:
    """The colour painted for each class: distinct per class and per channel."""
    classes = classes.astype(np.int64)
    return np.stack([(classes * 11 + 7) % 256, 255 - (classes * 11 + 7) % 256, (classes * 37 + 3) % 256],
                    axis=-1).astype(np.uint8)


def painted_pair(height: int, width: int, block: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of random classes 0..19; the image's colour encodes the class; pixels within 2 px of another class
    carry class + UNSAFE in the label (so the mark travels with the label through every transform)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 20, (height // block + 1, width // block + 1))
    classes = np.kron(blocks, np.ones((block, block), dtype=np.int64))[:height, :width]
    padded = np.pad(classes, 2, mode="edge")
    uniform = np.ones_like(classes, dtype=bool)
    for dy in range(5):
        for dx in range(5):
            uniform &= padded[dy:dy + height, dx:dx + width] == classes
    label = np.where(uniform, classes, classes + UNSAFE).astype(np.uint8)
    return code(classes), label


def assert_aligned(image: np.ndarray, label: np.ndarray, step: str, min_checked: float = 0.2) -> None:
    assert image.shape[:2] == label.shape, step
    safe = label < UNSAFE
    assert safe.mean() >= min_checked, f"{step}: too few pixels to check ({safe.mean():.2f})"
    mismatched = (image[safe] != code(label[safe])).any(axis=-1)
    assert not mismatched.any(), f"{step}: {mismatched.sum()} of {safe.sum()} pixels misaligned"


def chw(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def denormalise(image: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("seed", range(12))
def test_train_pipeline_keeps_image_and_label_aligned_after_every_step(seed: int):
    crop = (40, 48)
    transform = build_train_transform(crop, scale=(160, 48), ratio_range=(0.5, 2.0), cat_max_ratio=0.75,
                                      photometric=False)
    image, label = painted_pair(57 + seed, 83 - seed, block=12, seed=seed)
    rng = np.random.default_rng(seed)
    *numpy_steps, to_tensor = transform.steps
    assert [type(s) for s in numpy_steps] == [RandomResize, RandomCrop, RandomFlip]
    for step in numpy_steps:
        image, label = step(image, label, rng)
        assert_aligned(image, label, type(step).__name__)
    image_t, label_t = to_tensor(image, label, rng)
    assert image_t.dtype == torch.uint8 and label_t.dtype == torch.uint8 and tuple(label_t.shape) == crop
    h, w = image_t.shape[-2:]
    assert_aligned(chw(image_t), label_t[:h, :w].numpy(), "ToTensor")
    assert (label_t[h:] == 255).all() and (label_t[:, w:] == 255).all()  # the label is padded to the crop
    # on the device: normalised, then zero-padded to the label's size (mmseg's preprocessor)
    batch = normalize_images([image_t], "cpu", size=label_t.shape)
    assert tuple(batch.shape) == (1, 3, *crop) and batch.dtype == torch.float32
    assert_aligned(denormalise(batch[0, :, :h, :w]), label_t[:h, :w].numpy(), "normalize_images")
    outside = torch.ones(crop, dtype=torch.bool)
    outside[:h, :w] = False
    assert (batch[0][:, outside] == 0).all() and not torch.signbit(batch[0][:, outside]).any()


def test_flip_moves_image_and_label_together():
    image, label = painted_pair(30, 40, block=10, seed=1)
    flip = RandomFlip(1.0)
    flipped_image, flipped_label = flip(image, label, np.random.default_rng(0))
    np.testing.assert_array_equal(flipped_image, image[:, ::-1])
    np.testing.assert_array_equal(flipped_label, label[:, ::-1])
    same_image, same_label = RandomFlip(0.0)(image, label, np.random.default_rng(0))
    assert same_image is image and same_label is label
    flips = [RandomFlip(0.5)(image, label, np.random.default_rng(s))[1][0, 0] != label[0, 0] for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def two_class_label() -> np.ndarray:
    label = np.full((64, 64), 1, dtype=np.uint8)
    label[:, 40:] = 2
    return label


def window_accepted(window: np.ndarray, ratio: float, ignore: int = 255) -> bool:
    values, counts = np.unique(window[window != ignore], return_counts=True)
    return len(values) > 1 and counts.max() / counts.sum() < ratio


@pytest.mark.parametrize("seed", range(60))
def test_crop_follows_mmseg_cat_max_ratio_rule(seed: int):
    """The first of up to 10 windows with >= 2 classes and none >= 75% is taken, else an 11th unchecked window."""
    label = two_class_label()
    crop = RandomCrop((32, 32), cat_max_ratio=0.75)
    box = crop.choose_box(label, np.random.default_rng(seed))
    replay = np.random.default_rng(seed)
    candidates = []
    for _ in range(11):
        y, x = int(replay.integers(0, 33)), int(replay.integers(0, 33))
        candidates.append((y, y + 32, x, x + 32))
    accepted = [c for c in candidates[:10] if window_accepted(label[c[0]:c[1], c[2]:c[3]], 0.75)]
    assert box == (accepted[0] if accepted else candidates[10])
    if accepted:
        window = label[box[0]:box[1], box[2]:box[3]]
        assert np.unique(window, return_counts=True)[1].max() / window.size < 0.75


def test_crop_ratio_is_respected_when_possible():
    label = two_class_label()
    image = code(label)
    crop = RandomCrop((32, 32), cat_max_ratio=0.75)
    unconstrained = RandomCrop((32, 32), cat_max_ratio=1.0)
    ratios, free_ratios = [], []
    for seed in range(200):
        cropped_image, window = crop(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(cropped_image, code(window))
        ratios.append(np.unique(window, return_counts=True)[1].max() / window.size)
        window = unconstrained(image, label, np.random.default_rng(seed))[1]
        free_ratios.append(np.unique(window, return_counts=True)[1].max() / window.size)
    # about 45% of windows pass, so 10 tries fail with probability 0.55**10 (~0.25%)
    assert np.mean(np.array(ratios) < 0.75) >= 0.98
    assert np.mean(np.array(free_ratios) < 0.75) < 0.7


def test_crop_ratio_ignores_the_ignore_index():
    label = np.full((64, 64), 255, dtype=np.uint8)
    checker = (np.indices((16, 16)).sum(axis=0) // 4 % 2 + 1).astype(np.uint8)  # classes 1/2 in 4x4 squares
    label[24:40, 24:40] = checker
    crop = RandomCrop((32, 32), cat_max_ratio=0.75)
    for seed in range(30):
        replay = np.random.default_rng(seed)
        first = (int(replay.integers(0, 33)), int(replay.integers(0, 33)))
        box = crop.choose_box(label, np.random.default_rng(seed))
        # >= 75% of every window is 255: counting it would reject every window; excluding it accepts the first
        assert box[0] == first[0] and box[2] == first[1], seed


def test_crop_keeps_the_last_try_when_no_window_passes():
    label = np.full((50, 60), 7, dtype=np.uint8)  # one category: no window can pass
    crop = RandomCrop((20, 20), cat_max_ratio=0.75)
    replay = np.random.default_rng(3)
    draws = [(int(replay.integers(0, 31)), int(replay.integers(0, 41))) for _ in range(11)]
    box = crop.choose_box(label, np.random.default_rng(3))
    assert (box[0], box[2]) == draws[10]


def test_crop_smaller_image_keeps_whole_side_and_pad_fills_it():
    image, label = painted_pair(20, 70, block=10, seed=4)
    cropped_image, cropped_label = RandomCrop((32, 32), cat_max_ratio=1.0)(image, label, np.random.default_rng(0))
    assert cropped_image.shape[:2] == (20, 32) and cropped_label.shape == (20, 32)
    image_t, label_t = ToTensor((32, 32))(cropped_image, cropped_label)
    assert image_t.shape == (3, 20, 32) and label_t.shape == (32, 32) and (label_t[20:] == 255).all()
    batch = normalize_images([image_t], size=label_t.shape)
    assert batch.shape == (1, 3, 32, 32) and (batch[0, :, 20:] == 0).all()
    with pytest.raises(ValueError, match="larger than label_size"):
        ToTensor((16, 32))(cropped_image, cropped_label)


def test_random_resize_scale_and_keep_ratio():
    image = np.zeros((512, 683, 3), dtype=np.uint8)
    label = np.zeros((512, 683), dtype=np.uint8)
    step = RandomResize((2048, 512), (0.5, 2.0))
    for seed in range(20):
        ratio = np.random.default_rng(seed).random() * 1.5 + 0.5
        expected = rescale_size((512, 683), (int(2048 * ratio), int(512 * ratio)))
        out_image, out_label = step(image, label, np.random.default_rng(seed))
        assert out_image.shape[:2] == expected == out_label.shape
    # mmcv rescale_size: factor = min(long/max(h,w), short/min(h,w)); edge = int(edge * factor + 0.5)
    assert rescale_size((512, 683), (2048, 512)) == (512, 683)
    assert rescale_size((375, 500), (2048, 512)) == (512, 683)
    assert rescale_size((300, 2000), (2048, 512)) == (307, 2048)
    assert rescale_size((512, 683), (1024, 256)) == (256, 342)


def test_label_resize_is_cv2_nearest():
    label = np.arange(63, dtype=np.uint8).reshape(7, 9)
    # cv2.resize(label, (5, 4), interpolation=cv2.INTER_NEAREST) with opencv-python 4.10
    expected_down = [[0, 1, 3, 5, 7], [9, 10, 12, 14, 16], [27, 28, 30, 32, 34], [45, 46, 48, 50, 52]]
    np.testing.assert_array_equal(resize_label(label, (4, 5)), expected_down)
    up = resize_label(label, (13, 20))  # cv2 gives rows 0,0,1,1,...,6 and these columns
    np.testing.assert_array_equal(up[:, 0] // 9, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6])
    np.testing.assert_array_equal(up[0], [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8])


def test_image_resize_is_bilinear_without_antialiasing():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    image[:, 1::2] = 200  # columns 0, 200, 0, 200
    half = resize_image(image, (2, 2))
    # half-pixel centres, 2 taps: each output averages a 2x2 block (cv2 INTER_LINEAR / INTER_AREA at exactly 2x)
    assert (half == 100).all()
    upscaled = resize_image(np.array([[[0, 0, 0], [100, 100, 100]]], dtype=np.uint8), (1, 4))
    np.testing.assert_array_equal(upscaled[0, :, 0], [0, 25, 75, 100])


def test_hsv_conversions_match_cv2():
    # cv2.cvtColor(rgb, COLOR_RGB2HSV) and cv2.cvtColor(hsv, COLOR_HSV2RGB) with opencv-python 4.10 (the mmseg
    # reference's conversions; HSV2RGB is not the exact inverse, which the photometric distortion's round trip keeps)
    rgb = [[127, 127, 127], [255, 0, 0], [200, 100, 100], [12, 200, 240], [188, 205, 175], [229, 98, 249],
           [10, 148, 95], [86, 147, 198], [66, 39, 106], [213, 171, 45], [167, 57, 69], [81, 55, 14]]
    hsv = [[0, 0, 127], [0, 255, 255], [0, 127, 200], [95, 242, 240], [47, 37, 205], [146, 155, 249],
           [78, 238, 148], [104, 144, 198], [132, 161, 106], [22, 201, 213], [177, 168, 167], [18, 211, 81]]
    np.testing.assert_array_equal(rgb_to_hsv(np.array([rgb], dtype=np.uint8))[0], hsv)
    hsv_in = [[0, 0, 127], [90, 128, 127], [0, 49, 255], [164, 184, 179], [0, 65, 159], [89, 253, 87],
              [147, 113, 253], [23, 122, 119], [143, 129, 55], [21, 149, 216], [84, 141, 41], [146, 130, 219]]
    # cv2 converts in SIMD blocks of 16 pixels (float32, FMA, truncation) and the last < 16 pixels of a row of
    # pixels with scalar code that rounds instead; these are the SIMD results (the pixels placed at the start of a
    # 64-pixel row), which is what all but at most 15 pixels of a real image get.
    rgb_out = [[127, 127, 127], [63, 126, 127], [255, 205, 205], [179, 49, 118], [159, 118, 118], [0, 87, 84],
               [241, 140, 253], [119, 105, 62], [48, 27, 55], [216, 178, 89], [18, 41, 36], [204, 107, 219]]
    row = np.zeros((1, 64, 3), dtype=np.uint8)
    row[0, :12] = hsv_in
    np.testing.assert_array_equal(hsv_to_rgb(row)[0, :12], rgb_out)


def _mmseg_convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _reference_distortion(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """mmseg PhotoMetricDistortion.transform, written out with `rng` in place of numpy.random."""
    def contrast(img):
        return _mmseg_convert(img, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else img

    if rng.integers(2):
        image = _mmseg_convert(image, beta=rng.uniform(-32, 32))
    mode = rng.integers(2)
    if mode == 1:
        image = contrast(image)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 1] = _mmseg_convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
        image = hsv_to_rgb(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(int) + rng.integers(-18, 18)) % 180
        image = hsv_to_rgb(hsv)
    if mode == 0:
        image = contrast(image)
    return image


def test_photometric_distortion_follows_the_reference_order():
    image = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    label = np.zeros((16, 24), dtype=np.uint8)
    step = PhotoMetricDistortion()
    changed = 0
    for seed in range(40):
        out, out_label = step(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(out, _reference_distortion(image, np.random.default_rng(seed)))
        assert out_label is label and out.dtype == np.uint8 and out.shape == image.shape
        changed += int(not np.array_equal(out, image))
    assert changed > 30


def test_photometric_brightness_and_contrast_bounds_on_grey():
    grey = np.full((4, 4, 3), 128, dtype=np.uint8)
    values = {int(PhotoMetricDistortion()(grey, None, np.random.default_rng(s))[0][0, 0, 0]) for s in range(300)}
    assert min(values) >= int(0.5 * (128 - 32)) - 1 and max(values) <= int(1.5 * (128 + 32)) + 1
    assert len(values) > 50  # brightness and contrast really vary


def test_test_pipeline_resizes_image_only_and_keeps_uint8():
    image = np.full((300, 457, 3), (123, 116, 103), dtype=np.uint8)
    label = np.arange(300 * 457, dtype=np.int64).reshape(300, 457) % 150
    transform = build_test_transform((2048, 512))
    out_image, out_label = transform(image, label.astype(np.uint8), None)
    assert tuple(out_image.shape) == (3, *rescale_size((300, 457), (2048, 512))) == (3, 512, 780)
    assert out_image.dtype == torch.uint8 and (out_image == torch.tensor([123, 116, 103]).view(3, 1, 1)).all()
    assert tuple(out_label.shape) == (300, 457) and out_label.dtype == torch.uint8
    np.testing.assert_array_equal(out_label.numpy(), label)
    expected = (torch.tensor([123.0, 116.0, 103.0]) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.equal(normalize_images([out_image])[0, :, 10, 10], expected)
    unresized, _ = build_test_transform(None)(image, None, None)
    assert tuple(unresized.shape) == (3, 300, 457)
    assert Resize((64, 16))(image, None)[0].shape == (16, 24, 3)


def test_train_transform_is_reproducible_and_picklable():
    image, label = painted_pair(90, 120, block=10, seed=2)
    transform = build_train_transform(48, scale=(256, 64))
    first = transform(image, label, np.random.default_rng(5))
    again = pickle.loads(pickle.dumps(transform))(image, label, np.random.default_rng(5))
    other = transform(image, label, np.random.default_rng(6))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].shape[0] == 3 and max(first[0].shape[1:]) <= 48 and tuple(first[1].shape) == (48, 48)


def test_convert_table_is_mmsegs_per_pixel_convert():
    image = np.random.default_rng(1).integers(0, 256, (19, 23, 3), dtype=np.uint8)
    rng = np.random.default_rng(2)
    for _ in range(200):
        alpha, beta = rng.uniform(0.5, 1.5), rng.uniform(-32, 32)
        for a, b in ((alpha, 0.0), (1.0, beta), (alpha, beta)):
            np.testing.assert_array_equal(convert_table(a, b)[image], _mmseg_convert(image, alpha=a, beta=b))


def test_category_counts_are_np_uniques():
    rng = np.random.default_rng(3)
    label = rng.choice(np.array([0, 3, 7, 149, 255]), size=(61, 70)).astype(np.uint8)
    for window in (label, label[5:40, 9:61], label[:, ::-1]):
        values, counts = np.unique(window, return_counts=True)
        expected = counts[values != 255]
        np.testing.assert_array_equal(category_counts(window), expected)
        np.testing.assert_array_equal(category_counts(window.astype(np.int64)), expected)
    assert len(category_counts(np.full((4, 4), 255, dtype=np.uint8))) == 0


def test_flip_and_nearest_resize_of_labels_that_cv2_does_not_take():
    label = np.random.default_rng(4).integers(0, 300, (7, 9))  # int64
    np.testing.assert_array_equal(flip_horizontal(label), label[:, ::-1])
    small = (label % 200).astype(np.uint8)
    np.testing.assert_array_equal(resize_label(label, (13, 5)) % 200, resize_label(small, (13, 5)))


def test_normalize_images_pads_to_size_and_names_bad_input():
    images = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8), torch.randint(0, 256, (3, 8, 4), dtype=torch.uint8)]
    batch = normalize_images(images)
    assert batch.shape == (2, 3, 8, 7)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(batch[0, :, :5, :7], (images[0].float() - mean) / std)
    assert (batch[0, :, 5:] == 0).all() and (batch[1, :, :, 4:] == 0).all()
    assert normalize_images(images, size=(9, 10)).shape == (2, 3, 9, 10)
    with pytest.raises(ValueError, match="smaller than an image"):
        normalize_images(images, size=(8, 6))
    with pytest.raises(ValueError, match=r"\(3, h, w\)"):
        normalize_images([torch.zeros((5, 7), dtype=torch.uint8)])


def test_collate_segmentation_lists_images_and_stacks_labels():
    items = [{"image": torch.zeros((3, 5, 8), dtype=torch.uint8), "label": torch.zeros((8, 8), dtype=torch.uint8),
              "path": "a.jpg"},
             {"image": torch.ones((3, 8, 6), dtype=torch.uint8), "label": torch.ones((8, 8), dtype=torch.uint8),
              "path": "b.jpg"}]
    batch = collate_segmentation(items)
    assert [tuple(i.shape) for i in batch["image"]] == [(3, 5, 8), (3, 8, 6)] and batch["path"] == ["a.jpg", "b.jpg"]
    assert tuple(batch["label"].shape) == (2, 8, 8)
    items[1]["label"] = torch.ones((8, 6), dtype=torch.uint8)
    with pytest.raises(ValueError, match="labels of different sizes"):
        collate_segmentation(items)


def test_bad_transform_arguments_are_named():
    with pytest.raises(ValueError, match="crop_size"):
        build_train_transform(0)
    with pytest.raises(ValueError, match="ratio_range"):
        build_train_transform(32, ratio_range=(2.0, 0.5))
    with pytest.raises(ValueError, match="cat_max_ratio"):
        build_train_transform(32, cat_max_ratio=1.5)
