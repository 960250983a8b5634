"""The files `knetlab predict` writes per image: a label PNG (class index per pixel: 8-bit, 16-bit beyond 255
classes), COCO's panoptic PNG (segment id = R + 256 G + 256² B), a 16-bit instance-id PNG, and an overlay of the
prediction on the image, the same size as the image, with a legend of the classes present (largest first)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

IGNORE = 255
LEGEND_MAX_ROWS = 24


def write_label_png(path: str | Path, labels: np.ndarray) -> Path:
    """Class indices as a greyscale PNG: 8-bit when they fit, else 16-bit."""
    array = labels.astype(np.uint8 if labels.max(initial=0) <= 255 and labels.min(initial=0) >= 0 else np.uint16)
    return _write(path, array, [cv2.IMWRITE_PNG_COMPRESSION, 1])


def write_panoptic_png(path: str | Path, segment_ids: np.ndarray) -> Path:
    """COCO panoptic format: RGB with id = R + 256 * G + 256^2 * B (0 = VOID)."""
    ids = segment_ids.astype(np.uint32)
    rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)
    return _write(path, rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """The segment ids of a COCO panoptic PNG (int64 (H, W))."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def write_instance_png(path: str | Path, instance_ids: np.ndarray) -> Path:
    """Instance ids (0 = none) as a 16-bit greyscale PNG."""
    return _write(path, instance_ids.astype(np.uint16), [cv2.IMWRITE_PNG_COMPRESSION, 1])


def _write(path: str | Path, array: np.ndarray, params: list[int]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(path.suffix, np.ascontiguousarray(array), params)
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    path.write_bytes(encoded.tobytes())
    return path


def ignore_value(names: Sequence[str]) -> int | None:
    """255 marks unlabelled pixels (VOID) while it is not a class index itself (up to 255 classes)."""
    return IGNORE if len(names) <= IGNORE else None


def classes_present(labels: np.ndarray, names: Sequence[str]) -> list[dict]:
    """[{"id", "name", "pixels", "fraction"}] of the classes in a label map (IGNORE left out), largest first."""
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=len(names))
    total = max(1, labels.size)
    present = [(int(i), int(counts[i])) for i in np.flatnonzero(counts) if i != ignore_value(names) and i < len(names)]
    present.sort(key=lambda item: -item[1])
    return [{"id": i, "name": names[i], "pixels": n, "fraction": round(n / total, 5)} for i, n in present]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, names: Sequence[str], *,
            segment_ids: np.ndarray | None = None, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3) RGB: the class colours blended over the image (IGNORE left as it is), segment boundaries in
    white when `segment_ids` is given, and a legend of the classes present in the top-left corner."""
    if labels.shape != image.shape[:2]:
        raise ValueError(f"overlay: labels {labels.shape} and image {image.shape[:2]} differ in size")
    colours = np.zeros((max(len(palette), IGNORE + 1), 3), dtype=np.uint8)
    colours[: len(palette)] = palette
    painted = colours[labels.astype(np.int64)]
    out = cv2.addWeighted(image, 1.0 - alpha, painted, alpha, 0.0)
    if ignore_value(names) is not None:
        keep = labels == IGNORE
        out[keep] = image[keep]
    if segment_ids is not None:
        edges = np.zeros(labels.shape, dtype=bool)
        edges[:, 1:] |= segment_ids[:, 1:] != segment_ids[:, :-1]
        edges[1:, :] |= segment_ids[1:, :] != segment_ids[:-1, :]
        out[edges] = 255
    return draw_legend(out, classes_present(labels, names), colours)


def draw_legend(image: np.ndarray, classes: list[dict], colours: np.ndarray) -> np.ndarray:
    """A swatch and "name  12.3%" per class on a dark box, as many rows as the image's height allows."""
    if not classes:
        return image
    height, width = image.shape[:2]
    size = int(np.clip(min(height, width) / 32, 9, 22))
    font = ImageFont.load_default(size=size)
    row = size + max(2, size // 3)
    rows = max(1, min(LEGEND_MAX_ROWS, (height - 8) // row))
    shown = classes if len(classes) <= rows else classes[: rows - 1]
    lines = [f"{entry['name']}  {100 * entry['fraction']:.1f}%" for entry in shown]
    if len(shown) < len(classes):
        lines.append(f"+{len(classes) - len(shown)} more")
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas, "RGBA")
    text_width = max(draw.textlength(line, font=font) for line in lines)
    box_w, box_h = int(size * 1.6 + text_width + 8), row * len(lines) + 6
    draw.rectangle((0, 0, min(width, box_w), min(height, box_h)), fill=(0, 0, 0, 150))
    for index, line in enumerate(lines):
        y = 3 + index * row
        if index < len(shown):
            colour = tuple(int(c) for c in colours[shown[index]["id"]])
            draw.rectangle((4, y + 1, 4 + size, y + size), fill=colour, outline=(255, 255, 255))
        draw.text((int(size * 1.6) + 4, y), line, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def write_overlay(path: str | Path, rgb: np.ndarray, quality: int = 90) -> Path:
    """The overlay as JPEG (or PNG, by the path's suffix)."""
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if Path(path).suffix.lower() in (".jpg", ".jpeg") else []
    return _write(path, rgb[..., ::-1], params)
