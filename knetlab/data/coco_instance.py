"""COCO instance segmentation in its released layout (`annotations/instances_{split}2017.json`): the records of a split,
the up-front checks, and the dataset whose items instance K-Net trains on (the evaluator reads the JSON itself).

Targets follow mmdet 2.28.2's `CocoDataset._parse_ann_info` + `LoadAnnotations(with_mask=True, poly2mask=True)`: an
annotation flagged `ignore`, whose bbox does not overlap the image, whose area is <= 0 or whose bbox is under one pixel
wide or high is skipped; crowd annotations are no targets; every other one becomes a mask (polygons, uncompressed or
compressed RLE, decoded with pycocotools as mmdet's `_poly2mask` does) with its contiguous thing label, in the JSON's
order. For training (`test_mode=False`, mmdet's default for the train split) images without any annotation (crowd
ones count) or with a side under 32 pixels are dropped (`filter_empty_gt=True`, `_filter_imgs`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from knetlab.data.ade20k import DatasetError
from knetlab.data.coco import (
    CocoDatasetBase,
    CocoImage,
    _short,
    check_coco_split,
    check_image_file,
    coco_split_dir,
    image_record,
    index_images,
    load_coco_image,
    read_annotation_json,
)
from knetlab.data.coco_categories import COCO_INSTANCE_CLASSES, COCO_LABEL_OF_ID, NUM_THING_CLASSES
from knetlab.data.det_transforms import DetSample


def instance_json_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"instances_{coco_split_dir(split)}.json"


def read_instance_records(root: Path, split: str) -> tuple[Path, list[CocoImage]]:
    """(the JSON's path, one record per image in the JSON's `images` order with its annotations), after the JSON
    checks: annotation ids unique, every annotation's image listed, every category one of COCO's 80 instance
    categories, every segmentation a polygon list or an RLE of the image's size, every bbox four numbers."""
    split_dir = coco_split_dir(split)
    json_path = instance_json_path(root, split)
    data = read_annotation_json(json_path, "instance")
    images = index_images(data, json_path)
    for position, category in enumerate(data["categories"]):
        category_id = category.get("id") if isinstance(category, dict) else None
        if not _is_thing_id(category_id):
            raise DatasetError(f"{json_path}: categories[{position}] {_short(category)} is not one of COCO's 80 "
                               "instance categories (see knetlab.data.coco_categories)")
    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    seen_ids = set()
    for position, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise DatasetError(f"{json_path}: annotations[{position}] is not an object: {_short(annotation)}")
        annotation_id = annotation.get("id")
        where = f"{json_path}: annotation {annotation_id if annotation_id is not None else f'[{position}]'}"
        if annotation_id is not None and annotation_id in seen_ids:
            raise DatasetError(f"{where} is listed twice (annotation ids must be unique)")
        seen_ids.add(annotation_id)
        image_id = annotation.get("image_id")
        if image_id not in images:
            raise DatasetError(f"{where} has image_id {_short(image_id)}, which is not in 'images'")
        category_id = annotation.get("category_id")
        if not _is_thing_id(category_id):
            raise DatasetError(f"{where} has category_id {_short(category_id)}, not one of COCO's 80 instance "
                               "category ids")
        bbox = annotation.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            raise DatasetError(f"{where} needs a bbox [x, y, w, h], got {_short(bbox)}")
        problem = segmentation_problem(annotation.get("segmentation"), images[image_id])
        if problem:
            raise DatasetError(f"{where}: {problem}")
        per_image[image_id].append(annotation)
    return json_path, [image_record(root, split_dir, image_id, entry, per_image[image_id])
                       for image_id, entry in images.items()]


def _is_thing_id(category_id: object) -> bool:
    return isinstance(category_id, int) and COCO_LABEL_OF_ID.get(category_id, NUM_THING_CLASSES) < NUM_THING_CLASSES


def segmentation_problem(segmentation: object, image: dict) -> str | None:
    """What is wrong with an annotation's segmentation, or None: a list of polygons (flat [x1, y1, x2, y2, ...]
    number lists), or an RLE dict whose size is the image's [height, width]."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not (isinstance(polygon, list) and all(isinstance(v, (int, float)) for v in polygon)):
                return f"segmentation polygon must be a flat [x1, y1, x2, y2, ...] number list, got {_short(polygon)}"
        return None
    if isinstance(segmentation, dict):
        counts, size = segmentation.get("counts"), segmentation.get("size")
        if not isinstance(counts, (list, str, bytes)):
            return f"segmentation RLE needs counts (a list or a string), got {_short(counts)}"
        if size != [image["height"], image["width"]]:
            return (f"segmentation RLE size {_short(size)} is not the image's [height, width] "
                    f"[{image['height']}, {image['width']}]")
        return None
    return f"segmentation must be a polygon list or an RLE dict, got {_short(segmentation)}"


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """mmdet's `_poly2mask`: polygons (merged) or an uncompressed/compressed RLE -> uint8 (H, W) mask. Polygons of
    fewer than three points cover no pixel and are dropped first (pycocotools would read a lone 4-number polygon as a
    box, and fails on an empty list)."""
    if isinstance(segmentation, list):
        polygons = [polygon for polygon in segmentation if len(polygon) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def annotation_is_target(annotation: dict, height: int, width: int) -> bool:
    """mmdet's `_parse_ann_info` rules for a non-crowd target (crowd annotations are never targets)."""
    if annotation.get("ignore", False) or annotation.get("iscrowd", 0):
        return False
    x, y, w, h = annotation["bbox"]
    overlap_w = max(0, min(x + w, width) - max(x, 0))
    overlap_h = max(0, min(y + h, height) - max(y, 0))
    if overlap_w * overlap_h == 0:
        return False
    return not (annotation.get("area", 1) <= 0 or w < 1 or h < 1)


def instance_targets(record: CocoImage) -> tuple[np.ndarray, np.ndarray]:
    """(masks bool (G, H, W), labels int64 (G,)) of a record's non-crowd annotations."""
    targets = [a for a in record.annotations if annotation_is_target(a, record.height, record.width)]
    masks = np.zeros((len(targets), record.height, record.width), dtype=bool)
    for i, annotation in enumerate(targets):
        masks[i] = decode_segmentation(annotation["segmentation"], record.height, record.width).astype(bool)
    labels = np.asarray([COCO_LABEL_OF_ID[a["category_id"]] for a in targets], dtype=np.int64)
    return masks, labels


def has_annotation(record: CocoImage) -> bool:
    """mmdet's training filter for instance data: the image has an annotation (crowd or not)."""
    return bool(record.annotations)


class CocoInstanceDataset(CocoDatasetBase):
    """One split of COCO instance segmentation (or a dataset in its layout); items as `knetlab.data.coco` describes
    them, with `sem_seg` None. Arguments as `CocoPanopticDataset`'s; `test_mode` (default: True for val) only decides
    the training filter here: the evaluator reads ground truth from the JSON (`json_path`) by `meta["image_id"]`."""

    num_thing_classes = NUM_THING_CLASSES
    num_stuff_classes = 0
    classes = COCO_INSTANCE_CLASSES

    read_records = staticmethod(read_instance_records)
    has_gt = staticmethod(has_annotation)

    def load_sample(self, record: CocoImage) -> tuple[DetSample, np.ndarray, dict]:
        image = load_coco_image(record, self.json_path)
        masks, labels = instance_targets(record)
        return DetSample(image, masks, None), labels, {}


def check_coco_instance_split(
    root: str | os.PathLike,
    split: str,
    *,
    deep: bool = True,
    max_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[CocoImage]:
    """The up-front checks of one split, run by the driver before any worker starts; returns its records (every image,
    unfiltered): the JSON (see `read_instance_records`), then every image exists, opens (is decoded with `deep`) and
    has the JSON's size. Raises `DatasetError` naming the file. An `s3://` root is first copied to this node's cache
    (`cache_dir`), as the dataset would be."""
    return check_coco_split(root, split, read_instance_records, check_image_file, deep=deep, max_workers=max_workers,
                            cache_dir=cache_dir)
