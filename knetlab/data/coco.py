"""COCO's released layout and what the panoptic and instance datasets share: the split names, finding the root, reading
an annotation JSON with one-line errors, the per-image records, mmdet's training-image filter, the seeded per-item
generator and the item every K-Net detector consumes.

Layout (COCO 2017 as downloaded; `root` may also be its parent holding `coco/`):

    root/train2017/*.jpg  root/val2017/*.jpg
    root/annotations/panoptic_{train,val}2017.json  root/annotations/panoptic_{train,val}2017/*.png
    root/annotations/instances_{train,val}2017.json

An item (`CocoPanopticDataset` / `CocoInstanceDataset` `__getitem__`) is a dict: `image` uint8 (3, h, w) RGB after the
pipeline (not normalised, not padded), `masks` bool (G, h, w) one per non-crowd thing, `labels` int64 (G,) contiguous
thing labels, `sem_seg` int64 (h, w) contiguous labels with 255 = VOID (panoptic; None for instance data) and `meta`
{image_id, file_name, ori_shape (H0, W0), img_shape (h, w), flip, scale_factor (mmcv's keep-ratio factor)}."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from knetlab.data.ade20k import DatasetError, describe_error, load_image, raise_problems
from knetlab.data.det_transforms import DetSample

SPLIT_DIRS = {"train": "train2017", "train2017": "train2017", "val": "val2017", "val2017": "val2017"}
COCO_DIRNAME = "coco"
MIN_SIZE = 32  # mmdet's _filter_imgs(min_size=32): training images with a shorter side are dropped
VOID = 255

# transform(sample, rng) -> sample (knetlab.data.det_transforms)
DetTransform = Callable[[DetSample, np.random.Generator | None], DetSample]


@dataclass(frozen=True)
class CocoImage:
    """One image of a split as its annotation JSON lists it. `annotations` holds the panoptic `segments_info` or the
    instance annotations of the image; `png_path` is the panoptic PNG (None for instance data)."""

    image_id: int
    file_name: str
    height: int
    width: int
    image_path: Path
    annotations: tuple[dict, ...]
    png_path: Path | None = None


def coco_split_dir(split: str) -> str:
    """`train2017` / `val2017` (also accepted: `train`, `val`)."""
    try:
        return SPLIT_DIRS[split]
    except KeyError:
        raise DatasetError(f"unknown COCO split {split!r}; valid: {', '.join(SPLIT_DIRS)}") from None


def find_coco_root(root: str | os.PathLike) -> Path:
    """The directory holding `annotations/`: `root` itself or `root/coco`."""
    root = Path(root).expanduser()
    if str(root).startswith("s3:/"):
        raise DatasetError(f"{root}: an s3:// dataset must be resolved to a local copy first "
                           "(knetlab.data.resolve_dataset_root)")
    for candidate in (root, root / COCO_DIRNAME):
        if (candidate / "annotations").is_dir():
            return candidate
    if not root.exists():
        raise DatasetError(f"{root}: dataset root does not exist")
    raise DatasetError(f"{root}: not a COCO dataset root; expected annotations/ in it or in {root / COCO_DIRNAME}")


def resolve_coco_root(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local COCO root; an `s3://bucket/prefix` root is first copied once per node into `cache_dir`."""
    if str(root).startswith("s3://"):
        from knetlab.data.cache import resolve_dataset_root

        root = resolve_dataset_root(str(root), cache_dir)
    return find_coco_root(root)


def read_annotation_json(path: Path, kind: str) -> dict:
    """A COCO annotation file as a dict with `images`, `annotations` and `categories` lists; `kind` names the file
    in errors ("panoptic", "instance")."""
    if not path.is_file():
        raise DatasetError(f"{path}: {kind} annotation file does not exist")
    try:
        with open(path, "rb") as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: malformed JSON ({describe_error(error)})") from error
    except OSError as error:
        raise DatasetError(f"{path}: unreadable annotation file ({describe_error(error)})") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: not a COCO {kind} annotation file (the top level is not an object)")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: not a COCO {kind} annotation file (no {key!r} list)")
    return data


def index_images(data: dict, json_path: Path) -> dict[int, dict]:
    """The `images` entries by id, each checked: integer id (unique), file_name, positive height and width."""
    images: dict[int, dict] = {}
    for position, entry in enumerate(data["images"]):
        try:
            image_id = entry["id"]
            ok = (isinstance(image_id, int) and isinstance(entry["file_name"], str)
                  and all(isinstance(entry[k], int) and entry[k] > 0 for k in ("height", "width")))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise DatasetError(f"{json_path}: images[{position}] must have an integer id, a file_name and positive "
                               f"integer height and width, got {_short(entry)}")
        if image_id in images:
            raise DatasetError(f"{json_path}: image id {image_id} is listed twice in 'images'")
        images[image_id] = entry
    return images


def image_record(root: Path, split_dir: str, image_id: int, entry: dict, annotations: Sequence[dict],
                 png_path: Path | None = None) -> CocoImage:
    """The record of an `images` entry (as `index_images` checked it) of the split in `root/split_dir`."""
    return CocoImage(image_id, entry["file_name"], entry["height"], entry["width"],
                     root / split_dir / entry["file_name"], tuple(annotations), png_path)


def _short(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def filter_training_images(records: Sequence[CocoImage], has_gt: Callable[[CocoImage], bool],
                           min_size: int = MIN_SIZE) -> list[CocoImage]:
    """mmdet's `_filter_imgs` for training (filter_empty_gt=True): keep images with ground truth (`has_gt`) whose
    shorter side (as the JSON gives it) is at least `min_size`."""
    return [r for r in records if has_gt(r) and min(r.width, r.height) >= min_size]


def load_coco_image(record: CocoImage, json_path: Path) -> np.ndarray:
    """The record's image as uint8 (H, W, 3) RGB; a missing file or a size other than the JSON's is an error."""
    if not record.image_path.is_file():
        raise DatasetError(f"{record.image_path}: image file does not exist (image id {record.image_id} in "
                           f"{json_path.name})")
    image = load_image(record.image_path)
    if image.shape[:2] != (record.height, record.width):
        raise DatasetError(f"{record.image_path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but "
                           f"{json_path.name} gives {record.width}x{record.height} for image id {record.image_id}")
    return image


def check_image_file(record: CocoImage, json_path: Path, deep: bool) -> list[str]:
    """Problems with the record's image: missing, unreadable (decoded with `deep`, JPEGs at 1/8 scale, which still
    reads the whole entropy-coded stream), or a size other than the JSON's."""
    if not record.image_path.is_file():
        return [f"{record.image_path}: image file does not exist (image id {record.image_id} in {json_path.name})"]
    try:
        with Image.open(record.image_path) as image:
            size = image.size
            if deep:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
                image.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        return [f"{record.image_path}: unreadable image ({describe_error(error)})"]
    if size != (record.width, record.height):
        return [f"{record.image_path}: image is {size[0]}x{size[1]} (WxH) but {json_path.name} gives "
                f"{record.width}x{record.height} for image id {record.image_id}"]
    return []


def check_records(records: Sequence[CocoImage], check: Callable[[CocoImage], list[str]],
                  max_workers: int | None = None) -> None:
    """Run `check` on every record in a thread pool (PIL decodes without the GIL); raise the problems found, first
    five named, in one line."""
    workers = max_workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = [problem for result in pool.map(check, records) for problem in result]
    raise_problems(problems)


def check_coco_split(
    root: str | os.PathLike,
    split: str,
    read_records: Callable[[Path, str], tuple[Path, list[CocoImage]]],
    check_record: Callable[[CocoImage, Path, bool], list[str]],
    *,
    deep: bool,
    max_workers: int | None,
    cache_dir: str | os.PathLike | None,
) -> list[CocoImage]:
    """The up-front checks of one split: the root (an `s3://` one first copied to this node's cache), the JSON
    (`read_records`), then `check_record(record, json_path, deep)` on every image; returns the records, unfiltered."""
    coco_root = resolve_coco_root(root, cache_dir)
    json_path, records = read_records(coco_root, split)
    if not records:
        raise DatasetError(f"{json_path}: empty split, no images")
    check_records(records, lambda record: check_record(record, json_path, deep), max_workers)
    return records


def make_item(sample: DetSample, labels: np.ndarray, record: CocoImage) -> dict:
    """The dataset item (see the module docstring): tensors from a transformed sample, plus its meta."""
    h, w = sample.image.shape[:2]
    image = torch.from_numpy(np.ascontiguousarray(sample.image)).permute(2, 0, 1).contiguous()
    masks = torch.from_numpy(np.ascontiguousarray(sample.masks, dtype=bool).reshape(-1, h, w))
    sem_seg = None
    if sample.sem_seg is not None:
        sem_seg = torch.from_numpy(np.ascontiguousarray(sample.sem_seg).astype(np.int64))
    return {
        "image": image,
        "masks": masks,
        "labels": torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1),
        "sem_seg": sem_seg,
        "meta": {"image_id": record.image_id, "file_name": record.file_name,
                 "ori_shape": (record.height, record.width), "img_shape": (int(h), int(w)),
                 "flip": bool(sample.flip), "scale_factor": float(sample.scale_factor)},
    }


class CocoDatasetBase(torch.utils.data.Dataset):
    """What both COCO datasets do alike: the root and split, the JSON's records after mmdet's training filter, the
    per-item generator, the epoch, the transform and the item. Subclasses implement `read_records(root, split) ->
    (json_path, records)`, `has_gt(record)` (the training filter's "has ground truth") and `load_sample(record) ->
    (sample, labels, extra item keys)`. Arguments: see `CocoPanopticDataset`."""

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: DetTransform | None = None,
        *,
        seed: int | None = None,
        test_mode: bool | None = None,
        max_images: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        self.root = resolve_coco_root(root, cache_dir)
        self.split = coco_split_dir(split)
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.test_mode = self.split == "val2017" if test_mode is None else bool(test_mode)
        self.json_path, records = self.read_records(self.root, self.split)
        if not self.test_mode:
            records = filter_training_images(records, self.has_gt)
        if not records:
            raise DatasetError(f"{self.json_path}: no usable images in the split")
        self.records = records[:max_images] if max_images is not None else records

    @staticmethod
    def read_records(root: Path, split: str) -> tuple[Path, list[CocoImage]]:
        raise NotImplementedError

    @staticmethod
    def has_gt(record: CocoImage) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """`default_rng([seed, epoch, index])` with a seed (the same augmentation whichever worker loads the item);
        without one, seeded from torch's RNG, which `DataLoader` seeds per worker from the loop's seed."""
        if self.seed is not None:
            return np.random.default_rng([self.seed, self.epoch, index])
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    def load_sample(self, record: CocoImage) -> tuple[DetSample, np.ndarray, dict]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        sample, labels, extra = self.load_sample(record)
        if self.transform is not None:
            sample = self.transform(sample, self.rng(index))
        item = make_item(sample, labels, record)
        item.update(extra)
        return item
