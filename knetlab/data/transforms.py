"""The reference ADE20K training and test pipelines (mmseg 1.x `_base_/datasets/ade20k.py`) as small picklable steps
on uint8 images, and the reference's data preprocessor (normalise, then pad) as `normalize_images` on the device.

Every step is called as `step(image, label, rng) -> (image, label)`: `image` uint8 (H, W, 3) RGB, `label` (H, W)
training labels (255 = ignore) or None, `rng` a `numpy.random.Generator` (the only source of randomness, so a
loop that seeds it per item, worker and epoch gets reproducible augmentation). `ToTensor` ends every pipeline.

    train: RandomResize((2048, 512), (0.5, 2.0)) -> RandomCrop(crop, cat_max_ratio=0.75) -> RandomFlip(0.5)
           -> PhotoMetricDistortion -> ToTensor(label padded to the crop with 255)
    test:  Resize((2048, 512)) of the image only -> ToTensor (the label stays at its original size; evaluation
           resizes the logits to it)
    device (training step, evaluation): normalize_images: (x - mean) / std in float32, then zero-padding at the
           bottom and right to the label's size (the crop), as mmseg's SegDataPreProcessor pads after normalising.

Images stay uint8 on the CPU until the device (the reference also keeps them uint8 up to its data preprocessor);
labels stay uint8 too and become int64 on the device. The label is padded on the CPU because its padding value
(255) is a label value, while the image's padding (0 after normalisation) has no uint8 value.

The work is OpenCV's, as in the reference (mmcv's cv2 backend): bilinear resizing is cv2 INTER_LINEAR (mmcv
`imrescale(..., 'bilinear')`), label resizing cv2 INTER_NEAREST, flips cv2.flip, and the photometric distortion's
HSV round trips cv2.cvtColor on 8-bit images, so these steps give the reference's pixels exactly with the same
OpenCV (`scripts/check_reference_data.py`; cv2's HSV->RGB itself changed by a grey level in the last columns of
rows between OpenCV 4.11 and 5.1). mmseg's
`convert` (float32 affine, clip, truncate to uint8) depends on the input value only, so it is applied as a 256-entry
table computed with the same float32 arithmetic (`convert_table`), identical to converting every pixel.

The reference works on BGR images; here they are RGB. Every step treats the channels alike except the HSV
conversion, where cv2's RGB2HSV/HSV2RGB on RGB equal its BGR2HSV/HSV2BGR on BGR, so the result is the same image in
the other channel order (mmseg's preprocessor swaps to RGB before normalising)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

IMAGENET_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)  # RGB, 0..255
IMAGENET_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255
# dtypes cv2.resize(INTER_NEAREST) and cv2.flip take; other label dtypes (int64) go through numpy
_CV2_LABEL_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32)


def size_pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """(h, w) from one positive int or an (h, w) pair of positive ints (crop, scale, stride); a ValueError names
    `name` otherwise. Also used by the evaluation's sliding window."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r}")
    return int(pair[0]), int(pair[1])


def init_loader_worker(worker_id: int = 0) -> None:
    """One OpenCV thread per loader process (DataLoader `worker_init_fn`): parallelism comes from the processes, and
    cv2's own threads would oversubscribe the CPUs, as mmengine also prevents."""
    cv2.setNumThreads(1)


def rescale_size(hw: Sequence[int], scale: Sequence[int]) -> tuple[int, int]:
    """mmcv's keep-ratio `rescale_size` (the training resize, the test resize and the evaluation's scales): the (h, w)
    that fits (h, w) inside `scale`, a (long, short) edge pair in any order:
    factor = min(long / max(h, w), short / min(h, w)); edge = int(edge * factor + 0.5)."""
    h, w = int(hw[0]), int(hw[1])
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * float(factor) + 0.5), int(w * float(factor) + 0.5)


def resize_image(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize of a uint8 (H, W, C) image to `size` (h, w): cv2 INTER_LINEAR, as mmcv's `imresize`."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == image.shape[:2]:
        return image
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)


def nearest_indices(src: int, dst: int) -> np.ndarray:
    """cv2 INTER_NEAREST's source index of each output index: floor(x / (dst / src)), clipped."""
    inverse_scale = 1.0 / (dst / src)  # computed as cv2 does (1. / fx), so ties fall the same way
    return np.minimum(np.floor(np.arange(dst) * inverse_scale).astype(np.int64), src - 1)


def resize_label(label: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to `size` (h, w): cv2's INTER_NEAREST (its index rule in numpy for
    dtypes cv2 does not take)."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == label.shape[:2]:
        return label
    if label.dtype in _CV2_LABEL_DTYPES:
        return cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    rows = nearest_indices(label.shape[0], h)
    cols = nearest_indices(label.shape[1], w)
    return label[rows[:, None], cols[None, :]]


def flip_horizontal(array: np.ndarray) -> np.ndarray:
    """A contiguous left-right mirror (cv2.flip; a numpy copy for dtypes cv2 does not take)."""
    if array.dtype in _CV2_LABEL_DTYPES:
        return cv2.flip(array, 1)
    return np.ascontiguousarray(array[:, ::-1])


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


def category_counts(window: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """The pixel count of each category present in a label window, the ignore index left out (np.unique's counts)."""
    if window.dtype == np.uint8:
        counts = cv2.calcHist([window], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    else:
        counts = np.bincount(window.ravel().astype(np.int64))
    if ignore_index < len(counts):
        counts[ignore_index] = 0
    return counts[counts > 0]


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
        counts = category_counts(window, self.ignore_index)
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
            return flip_horizontal(image), None if label is None else flip_horizontal(label)
        return image, label


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV (H in 0..179): cv2's COLOR_RGB2HSV (COLOR_BGR2HSV of the BGR image)."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2HSV)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV (H in 0..179) -> uint8 RGB: cv2's COLOR_HSV2RGB (COLOR_HSV2BGR, channels reversed)."""
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


_IDENTITY = np.arange(256, dtype=np.uint8)


def convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """mmseg PhotoMetricDistortion's `convert` of every uint8 value: float32 `v * alpha + beta`, clipped to
    [0, 255], truncated to uint8 (the same numpy float32 arithmetic as on the image itself)."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def _channel_table(channel: int, table: np.ndarray) -> np.ndarray:
    tables = [_IDENTITY, _IDENTITY, _IDENTITY]
    tables[channel] = table
    return np.stack(tables, axis=-1)[:, None, :]  # (256, 1, 3): cv2.LUT's per-channel form


@dataclass(frozen=True)
class PhotoMetricDistortion:
    """mmseg `PhotoMetricDistortion`: brightness (+-32), contrast (0.5-1.5) either second or last (a coin decides),
    saturation (0.5-1.5) and hue (+-18 in cv2's 0..179 hue units) in HSV; each applied with probability 0.5.
    Random draws happen in the reference's order; the hue shift is drawn from [-18, 18) as numpy's
    `randint(-18, 18)` there does. Brightness and contrast are value tables, composed before they are applied."""

    brightness_delta: int = 32
    contrast_range: tuple[float, float] = (0.5, 1.5)
    saturation_range: tuple[float, float] = (0.5, 1.5)
    hue_delta: int = 18

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator):
        table = None  # brightness/contrast drawn but not yet applied to the image
        if rng.integers(2):
            table = _then(table, convert_table(beta=rng.uniform(-self.brightness_delta, self.brightness_delta)))
        contrast_first = rng.integers(2) == 1
        if contrast_first and rng.integers(2):
            table = _then(table, convert_table(alpha=rng.uniform(*self.contrast_range)))
        if rng.integers(2):  # saturation
            hsv = rgb_to_hsv(_apply(image, table))
            saturation = convert_table(alpha=rng.uniform(*self.saturation_range))
            image, table = hsv_to_rgb(cv2.LUT(hsv, _channel_table(1, saturation))), None
        if rng.integers(2):  # hue
            hsv = rgb_to_hsv(_apply(image, table))
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))
            hue = ((np.arange(256) + shift) % 180).astype(np.uint8)
            image, table = hsv_to_rgb(cv2.LUT(hsv, _channel_table(0, hue))), None
        if not contrast_first and rng.integers(2):
            table = _then(table, convert_table(alpha=rng.uniform(*self.contrast_range)))
        return _apply(image, table), label


def _then(first: np.ndarray | None, second: np.ndarray) -> np.ndarray:
    """The value table of `first`, then `second`."""
    return second if first is None else second[first]


def _apply(image: np.ndarray, table: np.ndarray | None) -> np.ndarray:
    return image if table is None else cv2.LUT(image, table)


@dataclass(frozen=True)
class ToTensor:
    """uint8 (H, W, 3) image -> uint8 (3, H, W) tensor; label -> tensor of its dtype, padded at the bottom and right
    with `ignore_index` up to `label_size` (h, w) when given (the crop: the reference's preprocessor pads labels to
    it; the image is padded after normalisation, on the device, by `normalize_images`)."""

    label_size: tuple[int, int] | None = None
    ignore_index: int = IGNORE_INDEX

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        planes = cv2.split(image) if image.ndim == 3 else (image,)  # a planar copy, far quicker than a transpose
        image_tensor = torch.from_numpy(np.stack(planes))
        if label is None:
            return image_tensor, None
        if self.label_size is None:
            return image_tensor, torch.from_numpy(np.ascontiguousarray(label))
        h, w = label.shape
        if h > self.label_size[0] or w > self.label_size[1]:
            raise ValueError(f"label of {h}x{w} is larger than label_size {self.label_size[0]}x{self.label_size[1]}")
        padded = np.full(self.label_size, self.ignore_index, dtype=label.dtype)
        padded[:h, :w] = label
        return image_tensor, torch.from_numpy(padded)


@dataclass(frozen=True)
class Compose:
    """Steps applied in order with one shared generator."""

    steps: tuple = field(default_factory=tuple)

    def __call__(self, image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator | None = None):
        for step in self.steps:
            image, label = step(image, label, rng)
        return image, label


def normalize_images(
    images: Sequence[torch.Tensor] | torch.Tensor,
    device: torch.device | str | None = None,
    size: Sequence[int] | None = None,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (3, h, w) RGB images -> float32 (B, 3, H, W) on `device`, as mmseg's SegDataPreProcessor: each image
    (x - mean) / std, then zero-padded at the bottom and right to `size` (H, W) (default: the largest h and w)."""
    if len(images) == 0:
        raise ValueError("normalize_images needs at least one image")
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i} must be (3, h, w), got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else images[0].device
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    if size is not None:
        if int(size[0]) < height or int(size[1]) < width:
            raise ValueError(f"normalize_images: size {tuple(size)} is smaller than an image ({height}x{width})")
        height, width = int(size[0]), int(size[1])
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=device)
    for i, image in enumerate(images):
        pixels = image.to(device, non_blocking=True).float()
        batch[i, :, : image.shape[1], : image.shape[2]] = (pixels - mean_t) / std_t
    return batch


def collate_segmentation(items: Sequence[dict]) -> dict:
    """Training items -> {"image": [uint8 (3, h, w)] (sizes differ; `normalize_images` pads them on the device),
    "label": the labels stacked (they all have the crop's size), "path": [str]}."""
    if not items:
        raise ValueError("collate_segmentation needs at least one item")
    sizes = {tuple(item["label"].shape) for item in items}
    if len(sizes) > 1:
        raise ValueError(f"collate_segmentation: labels of different sizes {sorted(sizes)}; training labels are "
                         "padded to the crop by the training transform's ToTensor(label_size=crop)")
    return {"image": [item["image"] for item in items], "label": torch.stack([item["label"] for item in items]),
            "path": [item["path"] for item in items]}


def build_train_transform(
    crop_size: int | Sequence[int] = 512,
    *,
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric: bool = True,
    ignore_index: int = IGNORE_INDEX,
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
    steps.append(ToTensor(crop, ignore_index))
    return Compose(tuple(steps))


def build_test_transform(scale: Sequence[int] | None = (2048, 512)) -> Compose:
    """The reference test pipeline: keep-ratio resize of the image into `scale` (None: keep the original size, e.g.
    for multi-scale testing, which resizes itself), then uint8 tensors; the label keeps its original size."""
    steps: list = [] if scale is None else [Resize(size_pair(scale, "scale"))]
    steps.append(ToTensor())
    return Compose(tuple(steps))
