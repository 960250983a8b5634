"""The reference K-Net COCO pipelines (mmdet 2.28.2 `Resize` keep_ratio + `RandomFlip`, as the K-Net configs use them)
on uint8 samples, and the batching that runs on the device: `collate_detection` (no padding on the CPU side) and
`batch_images` (normalise, then zero-pad to a multiple of 32, mmdet's `Normalize` + `Pad` + collate).

    1x train:    Resize(img_scale=(1333, 800), keep_ratio) -> RandomFlip(0.5)
    ms-3x train: Resize(img_scale=[(1333, 640), (1333, 800)], multiscale_mode='range', keep_ratio) -> RandomFlip(0.5)
    test:        Resize((1333, 800), keep_ratio)

Scale rule (mmdet `Resize._random_scale` / `random_sample`, then mmcv `imrescale`): 'range' draws the long edge
uniformly among the integers between the scales' long edges and the short edge among those between their short
edges, both ends included (numpy `randint(lo, hi + 1)`); one scale is used as it is. The image is then rescaled
keeping its ratio by factor = min(long / max(h, w), short / min(h, w)), each side int(side * factor + 0.5)
(`knetlab.data.transforms.rescale_size`). The image is resized bilinearly (cv2 INTER_LINEAR up to one grey level, see
`knetlab.data.transforms`); masks and the semantic map with cv2's INTER_NEAREST rule exactly, as mmdet's
`BitmapMasks.rescale` and `_resize_seg` do. Flips are horizontal and apply to image, masks and semantic map alike.

Every step is `step(sample, rng) -> sample` with a `numpy.random.Generator` as the only source of randomness, so a
dataset that seeds it per (seed, epoch, index) gets the same augmentation whichever worker loads the item."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from knetlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, nearest_indices, rescale_size, resize_image

SCALE_1X: tuple[tuple[int, int], ...] = ((1333, 800),)
SCALE_MS_3X: tuple[tuple[int, int], ...] = ((1333, 640), (1333, 800))
TEST_SCALE: tuple[int, int] = (1333, 800)
SCHEDULE_SCALES = {"1x": SCALE_1X, "ms-3x": SCALE_MS_3X}
MULTISCALE_MODES = ("range", "value")


@dataclass(frozen=True)
class DetSample:
    """One image and its targets between pipeline steps: `image` uint8 (H, W, 3) RGB, `masks` bool (G, H, W),
    `sem_seg` uint8 (H, W) contiguous labels with 255 = VOID (None for instance data); `scale_factor` is the keep-ratio
    factor applied so far and `flip` whether the sample was flipped."""

    image: np.ndarray
    masks: np.ndarray
    sem_seg: np.ndarray | None = None
    scale_factor: float = 1.0
    flip: bool = False


def rescale_factor(hw: Sequence[int], scale: Sequence[int]) -> float:
    """mmcv's keep-ratio factor for fitting (h, w) into `scale`, a (long, short) edge pair in any order."""
    h, w = int(hw[0]), int(hw[1])
    return float(min(max(scale) / max(h, w), min(scale) / min(h, w)))


def resize_sample(sample: DetSample, size: Sequence[int], factor: float) -> DetSample:
    """Resize to `size` (h, w): image bilinear, masks and semantic map nearest (cv2 INTER_NEAREST indices)."""
    h, w = int(size[0]), int(size[1])
    if (h, w) == sample.image.shape[:2]:
        return replace(sample, scale_factor=sample.scale_factor * factor)
    rows = nearest_indices(sample.image.shape[0], h)
    cols = nearest_indices(sample.image.shape[1], w)
    masks = np.take(np.take(sample.masks, rows, axis=1), cols, axis=2)  # twice as fast as one 2-D fancy index
    sem_seg = None if sample.sem_seg is None else np.take(np.take(sample.sem_seg, rows, axis=0), cols, axis=1)
    return DetSample(resize_image(sample.image, (h, w)), masks, sem_seg, sample.scale_factor * factor, sample.flip)


def sample_scale(scales: Sequence[tuple[int, int]], mode: str, rng: np.random.Generator | None) -> tuple[int, int]:
    """mmdet `Resize._random_scale` without ratio_range: one scale as it is; 'range' long and short edges drawn
    uniformly among the integers between the two scales' edges (inclusive); 'value' one of the scales."""
    if len(scales) == 1:
        return tuple(scales[0])
    if rng is None:
        raise ValueError("a multi-scale resize needs a random generator")
    if mode == "value":
        return tuple(scales[int(rng.integers(len(scales)))])
    longs = [max(s) for s in scales]
    shorts = [min(s) for s in scales]
    return int(rng.integers(min(longs), max(longs) + 1)), int(rng.integers(min(shorts), max(shorts) + 1))


@dataclass(frozen=True)
class DetResize:
    """mmdet `Resize(img_scale=scales, multiscale_mode=mode, keep_ratio=True)` of image, masks and semantic map."""

    scales: tuple[tuple[int, int], ...] = SCALE_1X
    mode: str = "range"

    def __call__(self, sample: DetSample, rng: np.random.Generator | None = None) -> DetSample:
        scale = sample_scale(self.scales, self.mode, rng)
        hw = sample.image.shape[:2]
        return resize_sample(sample, rescale_size(hw, scale), rescale_factor(hw, scale))


@dataclass(frozen=True)
class DetRandomFlip:
    """Horizontal flip of image, masks and semantic map together with probability `prob`."""

    prob: float = 0.5

    def __call__(self, sample: DetSample, rng: np.random.Generator | None = None) -> DetSample:
        if self.prob <= 0:
            return sample
        if self.prob < 1:
            if rng is None:
                raise ValueError("a random flip needs a random generator")
            if not rng.random() < self.prob:
                return sample
        sem_seg = None if sample.sem_seg is None else sample.sem_seg[:, ::-1]
        return DetSample(sample.image[:, ::-1], sample.masks[:, :, ::-1], sem_seg, sample.scale_factor,
                         not sample.flip)


@dataclass(frozen=True)
class DetCompose:
    """Steps applied in order with one shared generator."""

    steps: tuple = field(default_factory=tuple)

    def __call__(self, sample: DetSample, rng: np.random.Generator | None = None) -> DetSample:
        for step in self.steps:
            sample = step(sample, rng)
        return sample


def _scales(scale: str | Sequence[int] | Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    if isinstance(scale, str):
        try:
            return SCHEDULE_SCALES[scale]
        except KeyError:
            raise ValueError(f"unknown scale schedule {scale!r}; valid: {', '.join(SCHEDULE_SCALES)} or (long, short)"
                             " edge pairs") from None
    items = list(scale)
    pairs = [items] if items and isinstance(items[0], (int, np.integer)) else items
    out = []
    for pair in pairs:
        pair = tuple(int(v) for v in pair)
        if len(pair) != 2 or min(pair) <= 0:
            raise ValueError(f"a scale must be a (long, short) pair of positive edges, got {tuple(pair)!r}")
        out.append(pair)
    if not 1 <= len(out) <= 2:
        raise ValueError(f"give one scale or two (the range's ends), got {len(out)}: {out!r}")
    return tuple(out)


def build_det_train_transform(
    scale: str | Sequence[int] | Sequence[Sequence[int]] = "1x",
    *,
    multiscale_mode: str = "range",
    flip_prob: float = 0.5,
) -> DetCompose:
    """The reference training pipeline: `scale` is "1x" ((1333, 800)), "ms-3x" ((1333, 640) to (1333, 800), short
    side drawn in [640, 800]), one (long, short) pair, or two pairs (the ends of the range, or the values to choose
    from with `multiscale_mode="value"`); small scales serve the tiny demo."""
    if multiscale_mode not in MULTISCALE_MODES:
        raise ValueError(f"unknown multiscale_mode {multiscale_mode!r}; valid: {', '.join(MULTISCALE_MODES)}")
    if not 0 <= flip_prob <= 1:
        raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob!r}")
    return DetCompose((DetResize(_scales(scale), multiscale_mode), DetRandomFlip(float(flip_prob))))


def build_det_test_transform(scale: Sequence[int] | None = TEST_SCALE) -> DetCompose:
    """The reference test pipeline: keep-ratio resize into `scale` ((long, short); None keeps the original size)."""
    if scale is None:
        return DetCompose(())
    scales = _scales(scale)
    if len(scales) != 1:
        raise ValueError(f"the test pipeline takes one (long, short) scale, got {scales!r}")
    return DetCompose((DetResize(scales),))


TARGET_KEYS = ("masks", "labels", "sem_seg")
ITEM_KEYS = ("image", *TARGET_KEYS, "meta")


def collate_detection(items: Sequence[dict]) -> dict:
    """A list of dataset items -> {"images": [uint8 (3, h, w)], "targets": [{"masks", "labels", "sem_seg"}],
    "metas": [dict], and every other key of the items (e.g. "gt_pan", "gt_segments") as a list}; nothing is padded
    or stacked here (`batch_images` does that on the device)."""
    if not items:
        raise ValueError("collate_detection needs at least one item")
    batch = {
        "images": [item["image"] for item in items],
        "targets": [{key: item.get(key) for key in TARGET_KEYS} for item in items],
        "metas": [item["meta"] for item in items],
    }
    extra = [key for key in items[0] if key not in ITEM_KEYS]
    for key in extra:
        batch[key] = [item.get(key) for item in items]
    return batch


def batch_images(
    images: Sequence[torch.Tensor],
    device: torch.device | str | None = None,
    size_divisor: int = 32,
    *,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 (3, h, w) RGB images -> float32 (B, 3, Hp, Wp) on `device`: each normalised ((x - mean) / std) and
    zero-padded at the bottom and right to the batch's largest height and width, rounded up to `size_divisor` (the
    reference pads after Normalize, with 0)."""
    if not images:
        raise ValueError("batch_images needs at least one image")
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image {i} must be (3, h, w), got shape {tuple(image.shape)}")
    device = torch.device(device) if device is not None else images[0].device
    divisor = max(1, int(size_divisor))
    height = -(-max(int(image.shape[1]) for image in images) // divisor) * divisor
    width = -(-max(int(image.shape[2]) for image in images) // divisor) * divisor
    batch = torch.zeros((len(images), 3, height, width), dtype=torch.float32, device=device)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(3, 1, 1)
    for i, image in enumerate(images):
        pixels = image.to(device, non_blocking=True).float()
        batch[i, :, : image.shape[1], : image.shape[2]] = (pixels - mean_t) / std_t
    return batch
