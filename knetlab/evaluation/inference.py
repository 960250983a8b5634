"""Test-time inference as mmsegmentation does it: whole-image, sliding-window, multi-scale + flip (0.x definition),
and `predict`, the single entry point the validation loop and `knetlab eval` use.

The model is any callable `model(images) -> logits (B, C, H, W)` at the input size, in eval mode. Images are
normalised float tensors (B, 3, H, W).

Resizing differs from mmcv in one respect, which matters only for exact numbers. mmcv resizes the *uint8* image with
cv2 (INTER_LINEAR) before normalising; here the *normalised float* image is resized with
`F.interpolate(mode="bilinear", align_corners=False)`. Both use half-pixel centres and no antialiasing, and
normalisation is per-channel affine, so the two agree up to cv2's rounding: cv2 computes uint8 bilinear resizes in
fixed point (11-bit weights) and rounds the result to integers, i.e. up to about one grey level (≈ 0.017 after
dividing by std ≈ 58) per pixel. Expect mIoU to differ from mmseg's by a few hundredths, not to match to the digit.
Logit resizes (bilinear, align_corners=False on float tensors) are the same operation as mmseg's `resize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from knetlab.data.transforms import rescale_size, size_pair  # one home: the data pipeline's resize rules

Model = Callable[[torch.Tensor], torch.Tensor]

# Above this many elements (classes x output pixels) `upsample_argmax` resizes the scores band by band: a 12-megapixel
# photo's 150 class maps at full size would take 7 GB.
UPSAMPLE_BAND_ELEMENTS = 1 << 26

# mmseg 0.x `tools/test.py --aug-test` ratios, applied to the (2048, 512) test scale.
MS_RATIOS: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def _check_images(images: torch.Tensor, fn: str) -> None:
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(
            f"{fn}: images must be a float tensor (B, 3, H, W), got {images.dtype} of shape {tuple(images.shape)}"
        )


def _forward(model: Model, images: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    logits = model(images)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4 or logits.shape[0] != images.shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model(images) must return logits (B, C, H, W) for B={images.shape[0]}, got {got}")
    if logits.shape[-2:] != images.shape[-2:]:
        raise ValueError(
            f"model(images) returned logits of size {tuple(logits.shape[-2:])} for an input of size "
            f"{tuple(images.shape[-2:])}; the segmentor must return logits at the input size (eval mode)"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
    return logits


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, align_corners=False (mmseg's `resize` for K-Net); a no-op when the size already matches."""
    size = (int(size[0]), int(size[1]))
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def ms_test_scales(test_scale: Sequence[int], ratios: Sequence[float]) -> list[tuple[int, int]]:
    """mmseg 0.x `MultiScaleFlipAug(img_scale, img_ratios)`: each ratio scales the target, truncated to int."""
    return [(int(test_scale[0] * r), int(test_scale[1] * r)) for r in ratios]


@torch.no_grad()
def inference_whole(model: Model, images: torch.Tensor, *, out_size: Sequence[int] | None = None) -> torch.Tensor:
    """The whole image in one forward; logits resized to `out_size` (h, w) when given."""
    _check_images(images, "inference_whole")
    logits = _forward(model, images)
    return resize_logits(logits, out_size) if out_size is not None else logits


def slide_windows(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's `slide_inference` grid: (y1, y2, x1, x2) windows of at most `crop`, every `stride`, the last window
    of a row/column shifted back to end at the border (never padded). Covers every pixel for any size."""
    h_crop, w_crop = size_pair(crop, "crop")
    h_stride, w_stride = size_pair(stride, "stride")
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@torch.no_grad()
def inference_slide(
    model: Model,
    images: torch.Tensor,
    *,
    num_classes: int | None = None,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sliding-window logits at the input size (or `out_size`): overlapping windows' logits are averaged by a count
    map, as mmseg's `slide_inference`. `num_classes` is checked against the model's output when given."""
    _check_images(images, "inference_slide")
    crop_hw, stride_hw = size_pair(crop, "eval.crop"), size_pair(stride, "eval.stride")
    if stride_hw[0] > crop_hw[0] or stride_hw[1] > crop_hw[1]:
        raise ValueError(f"inference_slide: eval.stride {stride_hw} larger than eval.crop {crop_hw} would leave gaps")
    b, _, h, w = images.shape
    preds: torch.Tensor | None = None
    count = images.new_zeros((1, 1, h, w))
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        window_logits = _forward(model, images[:, :, y1:y2, x1:x2], num_classes)
        if preds is None:
            preds = images.new_zeros((b, window_logits.shape[1], h, w), dtype=window_logits.dtype)
        preds[:, :, y1:y2, x1:x2] += window_logits
        count[:, :, y1:y2, x1:x2] += 1
    if bool((count == 0).any()):  # cannot happen with slide_windows; guards the averaging below
        raise RuntimeError(f"inference_slide: windows left pixels uncovered for image {h}x{w}, crop {crop}")
    logits = preds / count
    return resize_logits(logits, out_size) if out_size is not None else logits


def _infer(
    model: Model,
    images: torch.Tensor,
    mode: str,
    crop: int | Sequence[int] | None,
    stride: int | Sequence[int] | None,
    num_classes: int | None,
) -> torch.Tensor:
    if mode == "whole":
        return _forward(model, images, num_classes)
    if mode == "slide":
        if crop is None or stride is None:
            raise ValueError("eval.mode='slide' needs eval.crop and eval.stride (e.g. 512 and 341)")
        return inference_slide(model, images, num_classes=num_classes, crop=crop, stride=stride)
    raise ValueError(f"eval.mode={mode!r} is not supported; valid modes: 'whole', 'slide'")


@torch.no_grad()
def inference_ms_flip(
    model: Model,
    image: torch.Tensor,
    *,
    num_classes: int | None = None,
    test_scale: Sequence[int] = (2048, 512),
    ratios: Sequence[float] = MS_RATIOS,
    flip: bool = True,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Multi-scale + flip test as mmseg 0.x `--aug-test` (the README's ms+flip column).

    `image` is the image at its ORIGINAL size. For each ratio r the (test_scale * r) target is applied with a
    keep-ratio resize (mmcv `imrescale`); with `flip`, also the horizontally flipped image. Every pass's logits are
    resized to `out_size` (default: the original size), soft-maxed, flipped back, and the probabilities averaged.
    Returns these averaged softmax scores (B, C, H, W) at the original size; their argmax is the prediction.
    """
    _check_images(image, "inference_ms_flip")
    if not ratios:
        raise ValueError("inference_ms_flip: ratios is empty; give at least one, e.g. (1.0,)")
    orig_hw = tuple(image.shape[-2:])
    out_hw = tuple(out_size) if out_size is not None else orig_hw
    total: torch.Tensor | None = None
    passes = 0
    for scale in ms_test_scales(test_scale, ratios):
        new_hw = rescale_size(orig_hw, scale)
        scaled = image if new_hw == orig_hw else F.interpolate(image, size=new_hw, mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            inputs = scaled.flip(dims=(3,)) if flipped else scaled
            logits = _infer(model, inputs, mode, crop, stride, num_classes)
            probs = F.softmax(resize_logits(logits, out_hw), dim=1)
            if flipped:
                probs = probs.flip(dims=(3,))
            total = probs if total is None else total + probs
            passes += 1
    return total / passes


@torch.no_grad()
def predict(
    model: Model,
    image: torch.Tensor,
    label_size: Sequence[int],
    *,
    test_scale: Sequence[int] | None = (2048, 512),
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    ms_ratios: Sequence[float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Class ids (B, *label_size) int64 for images at their original size, as the reference test pipeline:
    keep-ratio resize to `test_scale` (skipped when None, e.g. when the data transform already did it) ->
    whole or slide inference -> bilinear resize of the logits to the label's size -> argmax.
    With `ms_ratios` or `flip`, the multi-scale/flip average of `inference_ms_flip` is used instead
    (`test_scale` is then required)."""
    _check_images(image, "predict")
    label_hw = (int(label_size[0]), int(label_size[1]))
    if ms_ratios or flip:
        if test_scale is None:
            raise ValueError("predict: multi-scale/flip testing needs test_scale (e.g. (2048, 512))")
        scores = inference_ms_flip(
            model,
            image,
            test_scale=test_scale,
            ratios=ms_ratios or (1.0,),
            flip=flip,
            mode=mode,
            crop=crop,
            stride=stride,
            out_size=label_hw,
        )
        return scores.argmax(dim=1)
    if test_scale is not None:
        new_hw = rescale_size(image.shape[-2:], test_scale)
        if new_hw != tuple(image.shape[-2:]):
            image = F.interpolate(image, size=new_hw, mode="bilinear", align_corners=False)
    logits = _infer(model, image, mode, crop, stride, None)
    return resize_logits(logits, label_hw).argmax(dim=1)


def predict_settings(eval_cfg: object, *, ms_flip: bool = False) -> dict:
    """`predict` keyword arguments from the config's `eval` section (mode, crop, stride, test_scale, ms_ratios,
    flip). Single-scale (the table's mIoU) unless `ms_flip`, which uses `eval.ms_ratios` and `eval.flip`
    (the mIoU(ms+flip) column)."""
    settings = {
        "mode": str(eval_cfg.mode),
        "crop": tuple(int(v) for v in eval_cfg.crop),
        "stride": tuple(int(v) for v in eval_cfg.stride),
        "test_scale": tuple(int(v) for v in eval_cfg.test_scale),
        "ms_ratios": None,
        "flip": False,
    }
    if ms_flip:
        settings["ms_ratios"] = tuple(float(r) for r in eval_cfg.ms_ratios)
        settings["flip"] = bool(eval_cfg.flip)
    return settings


@torch.no_grad()
def input_scores(
    model: Model,
    images: torch.Tensor,
    *,
    mode: str = "whole",
    crop: int | Sequence[int] | None = None,
    stride: int | Sequence[int] | None = None,
    test_scale: Sequence[int] | None = (2048, 512),
    ms_ratios: Sequence[float] | None = None,
    flip: bool = False,
) -> torch.Tensor:
    """Class scores (B, C, h, w) at the size of `images` (already resized to the test scale, as the test pipeline
    does): whole/slide logits, or with `ms_ratios`/`flip` the averaged softmax of `inference_ms_flip` (its scales
    relative to `test_scale`). `upsample_argmax` turns them into labels at the original size."""
    _check_images(images, "input_scores")
    if ms_ratios or flip:
        if test_scale is None:
            raise ValueError("input_scores: multi-scale/flip testing needs test_scale (e.g. (2048, 512))")
        return inference_ms_flip(model, images, test_scale=test_scale, ratios=ms_ratios or (1.0,), flip=flip,
                                 mode=mode, crop=crop, stride=stride)
    return _infer(model, images, mode, crop, stride, None)


@torch.no_grad()
def upsample_argmax(scores: torch.Tensor, size: Sequence[int], band_elements: int | None = None) -> torch.Tensor:
    """argmax over classes of the scores bilinearly resized (align_corners=False) to `size`: int64 (B, H, W).
    Large outputs are computed in bands of rows, each with the source rows and weights `F.interpolate` uses, so the
    memory stays within about `band_elements` (default UPSAMPLE_BAND_ELEMENTS) floats whatever the image size."""
    band_elements = band_elements or UPSAMPLE_BAND_ELEMENTS
    height, width = int(size[0]), int(size[1])
    batch, channels, src_h, _ = scores.shape
    if batch * channels * height * width <= band_elements:
        return resize_logits(scores, (height, width)).argmax(dim=1)
    labels = torch.empty((batch, height, width), dtype=torch.long, device=scores.device)
    rows = max(1, band_elements // (batch * channels * width))
    scale = src_h / height
    for start in range(0, height, rows):
        stop = min(height, start + rows)
        # PyTorch's source index for align_corners=False: (dst + 0.5) * scale - 0.5, clamped at 0.
        source = ((torch.arange(start, stop, device=scores.device, dtype=torch.float32) + 0.5) * scale - 0.5)
        source = source.clamp(min=0)
        top = source.floor().long().clamp(max=src_h - 1)
        bottom = (top + 1).clamp(max=src_h - 1)
        weight = (source - top).view(1, 1, -1, 1).to(scores.dtype)
        band = scores[:, :, top] * (1 - weight) + scores[:, :, bottom] * weight  # rows first, then columns
        labels[:, start:stop] = resize_logits(band, (stop - start, width)).argmax(dim=1)
    return labels
