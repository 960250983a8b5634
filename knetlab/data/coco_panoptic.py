"""COCO panoptic segmentation in its released layout (`annotations/panoptic_{split}2017.json` + PNGs): the records of a
split, the up-front checks, and the dataset whose items panoptic K-Net trains and is evaluated on.

Targets follow mmdet 2.28.2's `CocoPanopticDataset._parse_ann_info` + `LoadPanopticAnnotations`: the PNG is decoded to
segment ids (id = R + 256 G + 256^2 B, panopticapi's `rgb2id`; 0 = VOID); a segment whose JSON area is <= 0 or whose
bbox is under one pixel wide or high is skipped (VOID); each other segment paints its contiguous label into
`sem_seg` (things 0..79, stuff 80..132, VOID 255); non-crowd things also become instance masks, in the JSON's order;
crowd things are no instances but keep their thing label in `sem_seg`. For training (`test_mode=False`, mmdet's
default for the train split) images without any thing segment (crowd ones count) or with a side under 32 pixels are
dropped, as mmdet's `_filter_imgs` does. Validation items (`test_mode=True`) also carry `gt_pan` int64 (H0, W0), the
segment-id map at the original size, and `gt_segments`, the JSON's `segments_info`.

Unlike mmdet, which pairs `annotations[i]` with `images[i]` and derives the PNG name from the image's, annotations are
matched to images by `image_id` and the PNG is the annotation's `file_name` (the same for COCO's own files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from knetlab.data.ade20k import DatasetError, describe_error
from knetlab.data.coco import (
    VOID,
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
from knetlab.data.coco_categories import (
    COCO_LABEL_OF_ID,
    COCO_PANOPTIC_CATEGORIES,
    COCO_PANOPTIC_CLASSES,
    NUM_STUFF_CLASSES,
    NUM_THING_CLASSES,
)
from knetlab.data.det_transforms import DetSample

PNG_MODES = ("RGB", "RGBA", "P")  # what decodes to colours; mmcv's 'color' read drops alpha and expands palettes


def rgb2id(color: np.ndarray) -> np.ndarray:
    """panopticapi's `rgb2id`: uint8 (H, W, 3) RGB -> int64 (H, W) segment ids R + 256 G + 256^2 B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """panopticapi's `id2rgb`: segment ids (H, W) -> uint8 (H, W, 3) RGB."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536 % 256], axis=-1).astype(np.uint8)


def panoptic_json_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"panoptic_{coco_split_dir(split)}.json"


def read_panoptic_records(root: Path, split: str) -> tuple[Path, list[CocoImage]]:
    """(the JSON's path, one record per image in the JSON's `images` order), after the JSON checks: every image has
    one annotation and vice versa; segment ids are unique integers >= 1 per image; every category is one of COCO's
    133 panoptic categories (and agrees with it on isthing)."""
    split_dir = coco_split_dir(split)
    json_path = panoptic_json_path(root, split)
    data = read_annotation_json(json_path, "panoptic")
    images = index_images(data, json_path)
    for position, category in enumerate(data["categories"]):
        category_id = category.get("id") if isinstance(category, dict) else None
        known = COCO_LABEL_OF_ID.get(category_id) if isinstance(category_id, int) else None
        if known is None:
            raise DatasetError(f"{json_path}: categories[{position}] {_short(category)} is not one of COCO's 133 "
                               "panoptic categories (see knetlab.data.coco_categories)")
        if "isthing" in category and bool(category["isthing"]) != COCO_PANOPTIC_CATEGORIES[known].isthing:
            raise DatasetError(f"{json_path}: category id {category_id} has isthing={category['isthing']}, but "
                               f"COCO's {COCO_PANOPTIC_CATEGORIES[known].name!r} has "
                               f"isthing={int(COCO_PANOPTIC_CATEGORIES[known].isthing)}")
    annotations: dict[int, dict] = {}
    for position, annotation in enumerate(data["annotations"]):
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if image_id not in images:
            raise DatasetError(f"{json_path}: annotations[{position}] has image_id {_short(image_id)}, which is not "
                               "in 'images'")
        if image_id in annotations:
            raise DatasetError(f"{json_path}: image id {image_id} has two entries in 'annotations'")
        if not isinstance(annotation.get("file_name"), str) or not isinstance(annotation.get("segments_info"), list):
            raise DatasetError(f"{json_path}: the annotation of image id {image_id} needs a file_name and a "
                               "segments_info list")
        _check_segments(annotation["segments_info"], image_id, json_path)
        annotations[image_id] = annotation
    missing = [image_id for image_id in images if image_id not in annotations]
    if missing:
        raise DatasetError(f"{json_path}: image id(s) {', '.join(map(str, missing[:5]))}"
                           f"{', ...' if len(missing) > 5 else ''} have no entry in 'annotations'")
    png_dir = root / "annotations" / f"panoptic_{split_dir}"
    records = [image_record(root, split_dir, image_id, entry, annotations[image_id]["segments_info"],
                            png_dir / annotations[image_id]["file_name"])
               for image_id, entry in images.items()]
    return json_path, records


def _check_segments(segments: list, image_id: int, json_path: Path) -> None:
    seen = set()
    for segment in segments:
        segment_id = segment.get("id") if isinstance(segment, dict) else None
        if not isinstance(segment_id, int) or segment_id < 1 or segment_id in seen:
            raise DatasetError(f"{json_path}: image id {image_id} has a segment with a missing, duplicate or "
                               f"non-positive id: {_short(segment)}")
        seen.add(segment_id)
        category_id = segment.get("category_id")
        if not isinstance(category_id, int) or category_id not in COCO_LABEL_OF_ID:
            raise DatasetError(f"{json_path}: image id {image_id} segment {segment_id} has category_id "
                               f"{_short(category_id)}, not one of COCO's 133 panoptic category ids")


def segment_is_valid(segment: dict) -> bool:
    """mmdet's rule: a segment whose area is <= 0 or whose bbox is under one pixel wide or high is skipped (files
    without area or bbox keep every segment)."""
    bbox = segment.get("bbox")
    if segment.get("area", 1) <= 0:
        return False
    return bbox is None or (bbox[2] >= 1 and bbox[3] >= 1)


def segment_is_thing(segment: dict) -> bool:
    return COCO_PANOPTIC_CATEGORIES[COCO_LABEL_OF_ID[segment["category_id"]]].isthing


def has_thing_segment(record: CocoImage) -> bool:
    """mmdet's training filter: the image has a thing segment (crowd or not)."""
    return any(segment_is_thing(segment) for segment in record.annotations)


def load_panoptic_png(path: Path, image_id: int | None = None) -> np.ndarray:
    """A panoptic PNG as int64 (H, W) segment ids."""
    if not path.is_file():
        where = f" (image id {image_id})" if image_id is not None else ""
        raise DatasetError(f"{path}: panoptic PNG does not exist{where}")
    try:
        with Image.open(path) as image:
            if image.mode not in PNG_MODES:
                raise DatasetError(f"{path}: panoptic PNG must be RGB (id = R + 256 G + 256^2 B), got mode "
                                   f"{image.mode}")
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    except DatasetError:
        raise
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: unreadable panoptic PNG ({describe_error(error)})") from error
    return rgb2id(rgb)


def panoptic_targets(pan: np.ndarray, segments: tuple[dict, ...], png_path: Path, json_name: str = "the JSON",
                     image_id: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(masks bool (G, H, W) of the non-crowd things, their labels int64 (G,), sem_seg uint8 (H, W)) from a segment-id
    map and its `segments_info`; an id in the PNG that the JSON does not list is an error."""
    sem_seg = np.full(pan.shape, VOID, dtype=np.uint8)
    listed = pan == 0  # pixels whose id is VOID or listed in the JSON
    instance_ids, labels = [], []
    for segment in segments:  # one comparison per segment: faster than np.unique's sort on COCO-sized images
        pixels = pan == segment["id"]
        listed |= pixels
        if not segment_is_valid(segment):
            continue
        label = COCO_LABEL_OF_ID[segment["category_id"]]
        sem_seg[pixels] = label
        if segment_is_thing(segment) and not segment.get("iscrowd", 0):
            instance_ids.append(segment["id"])
            labels.append(label)
    if not listed.all():
        unknown = np.unique(pan[~listed]).tolist()
        shown = ", ".join(map(str, unknown[:5])) + (", ..." if len(unknown) > 5 else "")
        raise DatasetError(f"{png_path}: segment id(s) {shown} in the PNG are not in {json_name}'s segments_info "
                           f"for image id {image_id}")
    masks = pan[None] == np.asarray(instance_ids, dtype=np.int64)[:, None, None]
    return masks, np.asarray(labels, dtype=np.int64), sem_seg


def load_panoptic_gt(record: CocoImage, json_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 (H, W, 3), segment ids int64 (H, W)) of a record, sizes checked against each other and the
    JSON."""
    image = load_coco_image(record, json_path)
    pan = load_panoptic_png(record.png_path, record.image_id)
    if pan.shape != image.shape[:2]:
        raise DatasetError(f"{record.png_path}: PNG is {pan.shape[1]}x{pan.shape[0]} (WxH) but its image "
                           f"{record.image_path.name} is {image.shape[1]}x{image.shape[0]}")
    return image, pan


class CocoPanopticDataset(CocoDatasetBase):
    """One split of COCO panoptic (or a dataset in its layout); items as `knetlab.data.coco` describes them.

    `root`: a local COCO root (or its parent holding `coco/`) or an `s3://bucket/prefix` URI, copied once per node
    into `cache_dir`. `transform(sample, rng)`: a `knetlab.data.det_transforms` pipeline (None: the original size).
    `seed`: the generator of item `index` is `default_rng([seed, epoch, index])` (call `set_epoch` before each pass).
    `test_mode` (default: True for val, False for train): False drops training images as mmdet does; True keeps
    every image and adds `gt_pan` and `gt_segments` to the items. Construction checks the JSON; loading raises
    `DatasetError` naming the file for a missing or unreadable image or PNG, a segment id the JSON does not list or
    a size mismatch (`check_coco_panoptic_split` finds them all up front)."""

    num_thing_classes = NUM_THING_CLASSES
    num_stuff_classes = NUM_STUFF_CLASSES
    classes = COCO_PANOPTIC_CLASSES

    read_records = staticmethod(read_panoptic_records)
    has_gt = staticmethod(has_thing_segment)

    def load_sample(self, record: CocoImage) -> tuple[DetSample, np.ndarray, dict]:
        image, pan = load_panoptic_gt(record, self.json_path)
        masks, labels, sem_seg = panoptic_targets(pan, record.annotations, record.png_path, self.json_path.name,
                                                  record.image_id)
        extra = {}
        if self.test_mode:
            extra = {"gt_pan": torch.from_numpy(pan), "gt_segments": [dict(s) for s in record.annotations]}
        return DetSample(image, masks, sem_seg), labels, extra


def check_coco_panoptic_split(
    root: str | os.PathLike,
    split: str,
    *,
    deep: bool = True,
    max_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[CocoImage]:
    """The up-front checks of one split, run by the driver before any worker starts; returns its records (every image,
    unfiltered). The JSON (see `read_panoptic_records`), then for each image: the image and its PNG exist and open,
    the PNG is RGB, both have the JSON's size; with `deep`, both are decoded and every segment id in the PNG must be
    listed in the JSON. Raises `DatasetError` naming the file(s). An `s3://` root is first copied to this node's
    cache (`cache_dir`), as the dataset would be."""
    return check_coco_split(root, split, read_panoptic_records, _check_panoptic_record, deep=deep,
                            max_workers=max_workers, cache_dir=cache_dir)


def _check_panoptic_record(record: CocoImage, json_path: Path, deep: bool) -> list[str]:
    problems = check_image_file(record, json_path, deep)
    try:
        if deep:
            pan = load_panoptic_png(record.png_path, record.image_id)
            size = (pan.shape[1], pan.shape[0])
            panoptic_targets(pan, record.annotations, record.png_path, json_path.name, record.image_id)
        else:
            if not record.png_path.is_file():
                raise DatasetError(f"{record.png_path}: panoptic PNG does not exist (image id {record.image_id})")
            with Image.open(record.png_path) as png:
                if png.mode not in PNG_MODES:
                    raise DatasetError(f"{record.png_path}: panoptic PNG must be RGB, got mode {png.mode}")
                size = png.size
    except DatasetError as error:
        return [*problems, str(error)]
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        return [*problems, f"{record.png_path}: unreadable panoptic PNG ({describe_error(error)})"]
    if size != (record.width, record.height):
        problems.append(f"{record.png_path}: PNG is {size[0]}x{size[1]} (WxH) but {json_path.name} gives "
                        f"{record.width}x{record.height} for image id {record.image_id}")
    return problems
