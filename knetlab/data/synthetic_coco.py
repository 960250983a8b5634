"""A small synthetic dataset in COCO 2017's exact layout, for laptops, CI and the demos of panoptic and instance K-Net:
`coco/{train2017,val2017}/NNNNNNNNNNNN.jpg` with either `annotations/panoptic_{split}2017.json` + PNGs (task
"panoptic") or `annotations/instances_{split}2017.json` (task "instance"), written deterministically from a seed.

The JSON files list all of COCO's categories (133 panoptic, 80 instance) as the real ones do; the images use a few.
Each category in use has a signature (`knetlab.data.synthetic`'s idea: two colours of one hue mixed by a texture of
its own period and orientation); each thing category also has a shape (ellipse, rectangle, triangle or diamond).
A scene is one or two stuff regions split by a slanted boundary, sometimes a VOID blob (unlabelled, random colour),
one to four non-overlapping thing instances and sometimes a crowd region (a cluster of small shapes of one thing
category, one segment with iscrowd=1). Instances are polygons rasterised by pycocotools, so the stored polygons
decode to exactly the painted pixels; crowd regions are stored as uncompressed RLE, as COCO stores them. The same
seed gives the same scenes for both tasks."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from knetlab.data.ade20k import DatasetError
from knetlab.data.coco import COCO_DIRNAME
from knetlab.data.coco_categories import COCO_LABEL_OF_ID, COCO_PANOPTIC_CATEGORIES, coco_json_categories
from knetlab.data.coco_panoptic import id2rgb
from knetlab.data.synthetic import (
    _texture,
    check_split_and_size_params,
    class_signatures,
    image_rng_and_size,
    write_dataset_once,
)

PARAMS_FILE = "knetlab-synthetic-coco.json"
TASKS = ("panoptic", "instance")
DEFAULT_THING_IDS = (1, 3, 18, 44)  # person, car, dog, bottle
DEFAULT_STUFF_IDS = (187, 193, 199)  # sky-other-merged, grass-merged, wall-other-merged
THING_SHAPES = ("ellipse", "rectangle", "triangle", "diamond")
SPLITS = (("train2017", 0), ("val2017", 1_000_000))  # (directory, image id offset): ids are unique across splits


def generate_synthetic_coco(
    out_dir: str | os.PathLike,
    *,
    task: str = "panoptic",
    num_train: int = 32,
    num_val: int = 8,
    thing_ids: Sequence[int] = DEFAULT_THING_IDS,
    stuff_ids: Sequence[int] = DEFAULT_STUFF_IDS,
    min_side: int = 64,
    max_side: int = 160,
    image_size: Sequence[int] | None = None,
    seed: int = 0,
    jpeg_quality: int = 95,
    crowd_prob: float = 0.3,
    void_prob: float = 0.3,
    exist_ok: bool = False,
) -> Path:
    """Write a synthetic COCO-format dataset under `out_dir` and return its root, `out_dir/coco`.

    task: "panoptic" (panoptic JSON + PNGs) or "instance" (instances JSON).
    num_train, num_val: images per split (>= 1 each).
    thing_ids, stuff_ids: the COCO category ids drawn in the images (at least one thing and one stuff).
    min_side, max_side: each image's height and width are drawn independently from [min_side, max_side] (>= 32);
    image_size: (height, width) for every image instead.
    seed: everything follows from it; the same arguments give the same bytes.
    crowd_prob, void_prob: the chance that an image holds a crowd region, a VOID blob.
    exist_ok: if the dataset is already there, generated with the same arguments, return it instead of failing.

    Written to a temporary directory renamed into place when complete, under a file lock, so several processes may
    call this at once for the same `out_dir`."""
    params = _check_params(task, num_train, num_val, thing_ids, stuff_ids, min_side, max_side, image_size, seed,
                           jpeg_quality, crowd_prob, void_prob)
    return write_dataset_once(out_dir, COCO_DIRNAME, PARAMS_FILE, params, _write_dataset, exist_ok)


def _check_params(task, num_train, num_val, thing_ids, stuff_ids, min_side, max_side, image_size, seed,
                  jpeg_quality, crowd_prob, void_prob) -> dict:
    if task not in TASKS:
        raise DatasetError(f"unknown synthetic COCO task {task!r}; valid: {', '.join(TASKS)}")
    image_size = check_split_and_size_params(num_train, num_val, min_side, max_side, image_size, jpeg_quality, 32)
    for name, ids, isthing in (("thing_ids", thing_ids, True), ("stuff_ids", stuff_ids, False)):
        ids = [int(i) for i in ids]
        valid = [c.id for c in COCO_PANOPTIC_CATEGORIES if c.isthing == isthing]
        if not ids or len(set(ids)) != len(ids) or not set(ids) <= set(valid):
            kind = "thing" if isthing else "stuff"
            raise DatasetError(f"{name} must be distinct COCO {kind} category ids (at least one; e.g. "
                               f"{valid[:3]}), got {list(ids)}")
    for name, value in (("crowd_prob", crowd_prob), ("void_prob", void_prob)):
        if not 0 <= float(value) <= 1:
            raise DatasetError(f"{name} must be in [0, 1], got {value}")
    return {"task": task, "num_train": int(num_train), "num_val": int(num_val),
            "thing_ids": [int(i) for i in thing_ids], "stuff_ids": [int(i) for i in stuff_ids],
            "min_side": int(min_side), "max_side": int(max_side), "image_size": image_size, "seed": int(seed),
            "jpeg_quality": int(jpeg_quality), "crowd_prob": float(crowd_prob), "void_prob": float(void_prob)}


def category_signatures(thing_ids: Sequence[int], stuff_ids: Sequence[int], seed: int) -> dict[int, dict]:
    """Per category id in use: colours and texture (as the ADE20K generator's), whether it is stuff, and for things
    a shape kind."""
    ids = [*stuff_ids, *thing_ids]
    signatures = class_signatures(ids, seed)
    out = {}
    for i, (category_id, signature) in enumerate(zip(ids, signatures)):
        stuff = i < len(stuff_ids)
        shape = None if stuff else THING_SHAPES[(i - len(stuff_ids)) % len(THING_SHAPES)]
        out[category_id] = {**signature, "label": category_id, "stuff": stuff, "shape": shape}
    return out


def shape_polygon(kind: str, cy: float, cx: float, ry: float, rx: float, angle: float, height: int, width: int
                  ) -> list[float]:
    """A COCO polygon [x1, y1, x2, y2, ...] of a shape kind, vertices clipped to the image and rounded to 0.01."""
    if kind == "ellipse":
        thetas = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        radii = np.ones_like(thetas)
    elif kind == "rectangle":
        thetas = np.array([0.25, 0.75, 1.25, 1.75]) * np.pi
        radii = np.full(4, np.sqrt(2.0))
    elif kind == "triangle":
        thetas = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * np.pi
        radii = np.ones(3)
    else:  # diamond
        thetas = np.array([0.0, 0.5, 1.0, 1.5]) * np.pi
        radii = np.ones(4)
    local_x, local_y = radii * rx * np.cos(thetas), radii * ry * np.sin(thetas)
    xs = np.clip(cx + local_x * np.cos(angle) - local_y * np.sin(angle), 0, width)
    ys = np.clip(cy + local_x * np.sin(angle) + local_y * np.cos(angle), 0, height)
    return [round(float(v), 2) for xy in zip(xs, ys) for v in xy]


def polygon_mask(polygon: list[float], height: int, width: int) -> np.ndarray:
    """The pixels pycocotools assigns to a polygon, bool (H, W)."""
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))).astype(bool)


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a mask: column-major run lengths, starting with a (possibly empty) run of zeros."""
    flat = mask.flatten(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + runs, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def render_scene(signatures: dict[int, dict], height: int, width: int, rng: np.random.Generator,
                 crowd_prob: float, void_prob: float) -> tuple[np.ndarray, list[dict]]:
    """One image uint8 (H, W, 3) and its segments, each {"category_id", "mask" bool (H, W), "iscrowd", and for
    non-crowd things "polygon"}; segments do not overlap; pixels of no segment are VOID."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, 3), dtype=np.float32)
    stuff = [i for i, s in signatures.items() if s["stuff"]]
    things = [i for i, s in signatures.items() if not s["stuff"]]
    free = np.ones((height, width), dtype=bool)  # not yet taken by a thing, a crowd region or VOID

    def paint(category_id: int | None, mask: np.ndarray) -> None:
        if category_id is None:
            image[mask] = rng.uniform(0, 255, 3).astype(np.float32)
        else:
            image[mask] = _texture(signatures[category_id], yy, xx, rng)[mask]

    chosen = [stuff[int(i)] for i in rng.choice(len(stuff), size=min(2, len(stuff)), replace=False)]
    stuff_masks = [np.ones((height, width), dtype=bool)]
    if len(chosen) > 1:  # a slanted boundary, like sky over ground
        lower = yy > rng.uniform(0.3, 0.7) * height + rng.uniform(-0.3, 0.3) * (xx - width / 2)
        stuff_masks = [~lower, lower]
    for category_id, mask in zip(chosen, stuff_masks):
        paint(category_id, mask)
    segments: list[dict] = []
    if rng.random() < void_prob:
        r = rng.uniform(0.06, 0.12) * min(height, width)
        void = ((yy - rng.uniform(0, height)) ** 2 + (xx - rng.uniform(0, width)) ** 2) <= r * r
        paint(None, void)
        free &= ~void
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        category_id = things[int(rng.integers(len(things)))]
        for attempt in range(20):  # place without overlap; shrink after failed attempts
            size = rng.uniform(0.12, 0.25) * side * (0.85 ** (attempt // 5))
            ry, rx = size * rng.uniform(0.7, 1.3), size * rng.uniform(0.7, 1.3)
            cy, cx = rng.uniform(ry, height - ry), rng.uniform(rx, width - rx)
            polygon = shape_polygon(signatures[category_id]["shape"], cy, cx, ry, rx, rng.uniform(0, np.pi),
                                    height, width)
            mask = polygon_mask(polygon, height, width)
            if mask.sum() >= 16 and not (mask & ~free).any():
                paint(category_id, mask)
                free &= ~mask
                segments.append({"category_id": category_id, "mask": mask, "iscrowd": 0, "polygon": polygon})
                break
    if rng.random() < crowd_prob:  # a cluster of small shapes of one thing category, one crowd segment
        category_id = things[int(rng.integers(len(things)))]
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        crowd = np.zeros((height, width), dtype=bool)
        for _ in range(int(rng.integers(3, 6))):
            r = rng.uniform(0.03, 0.06) * side
            crowd |= polygon_mask(shape_polygon(signatures[category_id]["shape"], cy + rng.normal(0, 0.08 * side),
                                                cx + rng.normal(0, 0.08 * side), r, r, rng.uniform(0, np.pi),
                                                height, width), height, width)
        crowd &= free
        if crowd.sum() >= 16:
            paint(category_id, crowd)
            free &= ~crowd
            segments.append({"category_id": category_id, "mask": crowd, "iscrowd": 1})
    stuff_segments = [{"category_id": c, "mask": mask & free, "iscrowd": 0} for c, mask in zip(chosen, stuff_masks)]
    segments = stuff_segments + segments
    image *= rng.uniform(0.85, 1.15)  # per-image lighting
    image += rng.normal(0.0, 4.0, image.shape).astype(np.float32)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), [s for s in segments if s["mask"].any()]


def _bbox(mask: np.ndarray) -> list[int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def _write_dataset(root: Path, params: dict) -> None:
    signatures = category_signatures(params["thing_ids"], params["stuff_ids"], params["seed"])
    task = params["task"]
    (root / "annotations").mkdir(parents=True)
    for split_index, (split_dir, id_offset) in enumerate(SPLITS):
        count = params["num_train"] if split_index == 0 else params["num_val"]
        image_dir = root / split_dir
        png_dir = root / "annotations" / f"panoptic_{split_dir}"
        image_dir.mkdir()
        if task == "panoptic":
            png_dir.mkdir()
        images, annotations = [], []
        for index in range(count):
            rng, height, width = image_rng_and_size(params, split_index, index)
            image, segments = render_scene(signatures, height, width, rng, params["crowd_prob"], params["void_prob"])
            image_id = id_offset + index + 1
            stem = f"{image_id:012d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=params["jpeg_quality"], subsampling=0)
            images.append({"id": image_id, "file_name": f"{stem}.jpg", "height": height, "width": width})
            if task == "panoptic":
                annotations.append(_panoptic_annotation(segments, image_id, stem, png_dir, rng))
            else:
                annotations += _instance_annotations(segments, image_id, first_id=len(annotations))
        kind = "panoptic" if task == "panoptic" else "instances"
        data = {"info": {"description": "knetlab synthetic COCO-format data", "version": "1.0", "year": 2017},
                "licenses": [], "images": images, "annotations": annotations,
                "categories": coco_json_categories(task)}
        (root / "annotations" / f"{kind}_{split_dir}.json").write_text(json.dumps(data))


def _panoptic_annotation(segments: list[dict], image_id: int, stem: str, png_dir: Path,
                         rng: np.random.Generator) -> dict:
    height, width = segments[0]["mask"].shape
    ids = rng.choice(np.arange(1, 256**3), size=len(segments), replace=False)  # any RGB colour but black (VOID)
    pan = np.zeros((height, width), dtype=np.int64)
    segments_info = []
    for segment_id, segment in zip(ids, segments):
        pan[segment["mask"]] = segment_id
        segments_info.append({"id": int(segment_id), "category_id": segment["category_id"],
                              "iscrowd": segment["iscrowd"], "bbox": _bbox(segment["mask"]),
                              "area": int(segment["mask"].sum())})
    Image.fromarray(id2rgb(pan)).save(png_dir / f"{stem}.png")
    return {"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info}


def _instance_annotations(segments: list[dict], image_id: int, first_id: int) -> list[dict]:
    annotations = []
    for segment in segments:
        if not COCO_PANOPTIC_CATEGORIES[COCO_LABEL_OF_ID[segment["category_id"]]].isthing:
            continue
        if segment["iscrowd"]:
            segmentation = uncompressed_rle(segment["mask"])
            rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
        else:
            segmentation = [segment["polygon"]]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, *segment["mask"].shape))
        annotations.append({"id": first_id + len(annotations) + 1, "image_id": image_id,
                            "category_id": segment["category_id"], "segmentation": segmentation,
                            "area": float(mask_utils.area(rle)),
                            "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                            "iscrowd": segment["iscrowd"]})
    return annotations
