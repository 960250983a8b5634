"""The reference ADE20K training and test pipelines (mmseg 1.x `_base_/datasets/ade20k.py` plus the data
preprocessor), as small picklable steps.

Every step is called as `step(image, label, rng) -> (image, label)`: `image` uint8 (H, W, 3) RGB, `label` (H, W)
training labels (255 = ignore) or None, `rng` a `numpy.random.Generator` (the only source of randomness, so a
loop that seeds it per item, worker and epoch gets reproducible augmentation). `Normalize` turns the pair into
tensors; `Pad` works on those.

    train: RandomResize((2048, 512), (0.5, 2.0)) -> RandomCrop(crop, cat_max_ratio=0.75) -> RandomFlip(0.5)
           -> PhotoMetricDistortion -> Normalize -> Pad(crop; image 0, label 255)
    test:  Resize((2048, 512)) of the image only -> Normalize (the label stays at its original size; evaluation
           resizes the logits to it)

Resizing. The reference resizes with cv2. Labels here use cv2's INTER_NEAREST rule exactly (source index
floor(dst * src / dst_size), no half-pixel centre), so a label map resized here is the one mmseg trains on.
Images are resized bilinearly with half-pixel centres and no antialiasing, like cv2's INTER_LINEAR, through
`torch.nn.functional.interpolate` on the uint8 values, rounded back to uint8. cv2 computes that in fixed point (11-bit
weights), so pixels can differ by one grey level (and cv2's exact 2x downscale, which it routes to INTER_AREA,
gives the same 2x2 average). PIL's `Image.resize(BILINEAR)` is *not* used: when downscaling it widens the filter
with the scale factor (antialiasing), so a 0.5x rescale would average about 4x4 source pixels where cv2 averages
2x2, giving visibly softer training images than the reference. Bit-exact reproduction of mmseg's inputs is
therefore not promised (differences of <= 1 grey level before normalisation); label maps, crops and flips are exact.

Photometric distortion follows mmseg's `PhotoMetricDistortion` step by step, with cv2's 8-bit HSV conversions
reproduced exactly (integer tables for RGB->HSV; float32 with FMA and truncation for HSV->RGB, as cv2 4.x's SIMD
path). The reference applies it to BGR images; images here are RGB, and brightness/contrast act on all channels
alike while the HSV conversion is written for RGB input, so the result is the same image in the other channel
order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255


def size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from one positive int or an (h, w) pair of positive ints (crop, scale, stride); a ValueError names
    `name` otherwise. Also used by the evaluation's sliding window."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio `rescale_size` (the training resize, the test resize and the evaluation's scales): the (h, w)
    that fits (h, w) inside `scale`, a (long, short) edge pair in any order. factor = min(long / max(h, w), short / min(h, w)); edge = int(edge * factor + 0.5)."""
    h, w = int(hw[0]), int(hw[1])
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, C) image to `size` (h, w), as cv2's INTER_LINEAR up to rounding."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == image.shape[:2]:
        return image
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=False)
    return resized[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """cv2 INTER_NEAREST's source index of each output index: floor(x / (dst / src)), clipped."""
    inverse_scale = 1.0 / (dst / src)  # computed as cv2 does (1. / fx), so ties fall the same way
    return np.minimum(np.floor(np.arange(dst) * inverse_scale).astype(np.int64), src - 1)


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to `size` (h, w), exactly cv2's INTER_NEAREST."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == label.shape[:2]:
        return label
    rows = nearest_indices(label.shape[0], h)
    cols = nearest_indices(label.shape[1], w)
    return label[rows[:, None], cols[None, :]]


@dataclass(frozen=True)
class RandomResize:
    """mmcv `RandomResize(scale, ratio_range, keep_ratio=True)`: target = (int(scale[0] * r), int(scale[1] * r)) for
    r uniform in `ratio_range`, then the keep-ratio rescale of image (bilinear) and label (nearest) into it."""

    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        low, high = self.ratio_range
        ratio = rng.random() * (high - low) + low
        target = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        size = rescale_size(image.shape[:2], target)
        return resize_image(image, size), None if label is None else resize_label(label, size)


@dataclass(frozen=True)
class Resize:
    """mmcv `Resize(scale, keep_ratio=True)` of the image only (the test pipeline keeps the original label)."""

    scale: tuple[int, int] = (2048, 512)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        return resize_image(image, rescale_size(image.shape[:2], self.scale)), label


@dataclass(frozen=True)
class RandomCrop:
    """mmseg `RandomCrop(crop_size, cat_max_ratio)`: a random (h, w) window (the whole side where the image is
    smaller); with `cat_max_ratio` < 1 a window is accepted when it holds at least two categories and none covers
    `cat_max_ratio` or more of its non-ignored pixels. Up to 10 windows are checked; if none passes, an 11th,
    unchecked one is used (mmseg keeps the last draw)."""

    crop_size: tuple[int, int] = (512, 512)
    cat_max_ratio: float = 0.75
    ignore_index: int = IGNORE_INDEX
    max_tries: int = 10

    def random_box(self, shape: Sequence[int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        margin_h = max(shape[0] - self.crop_size[0], 0)
        margin_w = max(shape[1] - self.crop_size[1], 0)
        y = int(rng.integers(0, margin_h + 1))
        x = int(rng.integers(0, margin_w + 1))
        return y, y + self.crop_size[0], x, x + self.crop_size[1]

    def accepts(self, window: np.ndarray) -> bool:
        labels, counts = np.unique(window, return_counts=True)
        counts = counts[labels != self.ignore_index]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def choose_box(self, label: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int, int]:
        box = self.random_box(label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                y1, y2, x1, x2 = box
                if self.accepts(label[y1:y2, x1:x2]):
                    break
                box = self.random_box(label.shape, rng)
        return box

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        y1, y2, x1, x2 = self.choose_box(label, rng)
        return image[y1:y2, x1:x2], label[y1:y2, x1:x2]


@dataclass(frozen=True)
class RandomFlip:
    """Horizontal flip of image and label together with probability `prob`."""

    prob: float = 0.5

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        if rng.random() < self.prob:
            return image[:, ::-1], None if label is None else label[:, ::-1]
        return image, label


# cv2's 8-bit RGB->HSV tables (hsv_shift = 12, hue range 180): s = diff * 255 / v, h = (...) * 30 / diff, rounded.
_HSV_SHIFT = 12
_SDIV = np.array([0] + [round((255 << _HSV_SHIFT) / i) for i in range(1, 256)], dtype=np.int64)
_HDIV = np.array([0] + [round((180 << _HSV_SHIFT) / (6 * i)) for i in range(1, 256)], dtype=np.int64)
# cv2 HSV2RGB: which of (v, v(1-s), v(1-s*f), v(1-s(1-f))) is (b, g, r) in each 60-degree sector.
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV (H in 0..179), cv2's integer algorithm (COLOR_RGB2HSV; COLOR_BGR2HSV on BGR)."""
    rgb = image.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (H in 0..179) -> uint8 RGB as cv2 4.x's vectorised COLOR_HSV2RGB computes it: float32 with fused
    multiply-adds for 1 - s*f, truncated to uint8: bit-exact with opencv-python 4.10 and 5.0 on x86-64 over all
    inputs. (cv2 rounds instead of truncating in the scalar code that converts the last < 16 pixels of an image.)"""
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * f32(6.0 / 180.0)
    s = hsv[..., 1].astype(f32) * f32(1.0 / 255.0)
    v = hsv[..., 2].astype(f32) * f32(1.0 / 255.0)
    sector = np.trunc(h)
    f = h - sector
    s64 = s.astype(np.float64)  # a float32 product is exact in float64: one rounding, as in an FMA
    table = np.stack([
        v,
        v * (f32(1.0) - s),
        v * (1.0 - s64 * f).astype(f32),
        v * (1.0 - s64 * (f32(1.0) - f)).astype(f32),
    ], axis=-1)
    order = _SECTOR_BGR[sector.astype(np.int64) % 6]  # (..., 3) indices of b, g, r
    bgr = np.take_along_axis(table, order, axis=-1)
    bgr = np.where((s == 0)[..., None], v[..., None], bgr)
    return np.clip(np.trunc(bgr[..., ::-1] * f32(255.0)), 0, 255).astype(np.uint8)


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    # mmseg's convert: float32 affine, clip, then astype(uint8), which truncates.
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg `PhotoMetricDistortion`: brightness (+-32), contrast (0.5-1.5) either second or last (a coin decides),
    saturation (0.5-1.5) and hue (+-18 in cv2's 0..179 hue units) in HSV; each applied with probability 0.5.
    Random draws happen in the reference's order; the hue shift is drawn from [-18, 18) as numpy's
    `randint(-18, 18)` there does."""

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def brightness(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        return image

    def contrast(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            return _convert(image, alpha=rng.uniform(*self.contrast_range))
        return image

    def saturation(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = rgb_to_hsv(image)
            hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            return hsv_to_rgb(hsv)
        return image

    def hue(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.integers(2):
            hsv = rgb_to_hsv(image)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            return hsv_to_rgb(hsv)
        return image

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        image = self.brightness(image, rng)
        contrast_first = rng.integers(2) == 1
        if contrast_first:
            image = self.contrast(image, rng)
        image = self.saturation(image, rng)
        image = self.hue(image, rng)
        if not contrast_first:
            image = self.contrast(image, rng)
        return image, label


@dataclass(frozen=True)
class Normalize:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) tensor (x - mean) / std; label -> int64 tensor."""

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        tensor = (tensor - mean) / std
        label_tensor = None if label is None else torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return tensor, label_tensor


@dataclass(frozen=True)
class Pad:
    """Pad the normalised image (with `image_value`) and the label (with `label_value`) at the bottom and right up
    to `size` (h, w), as mmseg's data preprocessor does to training batches."""

    size: tuple[int, int] = (512, 512)
    image_value: float = 0.0
    label_value: int = IGNORE_INDEX

    def __call__(self, image: torch.Tensor, label: torch.Tensor | None, rng: np.random.Generator | None = None):
        pad_h = max(self.size[0] - image.shape[-2], 0)
        pad_w = max(self.size[1] - image.shape[-1], 0)
        if pad_h == 0 and pad_w == 0:
            return image, label
        image = F.pad(image, (0, pad_w, 0, pad_h), value=self.image_value)
        if label is not None:
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.label_value)
        return image, label


@dataclass(frozen=True)
class Compose:
    """Steps applied in order with one shared generator."""

    steps: tuple = field(default_factory=tuple)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        for step in self.steps:
            image, label = step(image, label, rng)
        return image, label


def build_train_transform(
    crop_size: int | Sequence[int] = 512,
    *,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    ignore_index: int = IGNORE_INDEX,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The reference training pipeline; `crop_size` is an int or (h, w); `scale` is (long, short) edges."""
    crop = size_pair(crop_size, "crop_size")
    scale_pair = size_pair(scale, "scale")
    low, high = (float(r) for r in ratio_range)
    if not 0 < low <= high:
        raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {tuple(ratio_range)!r}")
    if not 0 < cat_max_ratio <= 1:
        raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio!r}")
    steps: list = [
        RandomResize(scale_pair, (low, high)),
        RandomCrop(crop, float(cat_max_ratio), ignore_index),
        RandomFlip(flip_prob),
    ]
    if photometric:
        steps.append(PhotoMetricDistortion())
    steps += [Normalize(tuple(mean), tuple(std)), Pad(crop, 0.0, ignore_index)]
    return Compose(tuple(steps))


def build_test_transform(
    scale: Sequence[int] | None = (2048, 512),
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Compose:
    """The reference test pipeline: keep-ratio resize of the image into `scale` (None: keep the original size, e.g.
    for multi-scale testing, which resizes itself), then normalise; the label keeps its original size."""
    steps: list = [] if scale is None else [Resize(size_pair(scale, "scale"))]
    steps.append(Normalize(tuple(mean), tuple(std)))
    return Compose(tuple(steps))
