"""ADE20K in its released layout (`ADEChallengeData2016/{images,annotations}/{training,validation}`), which a dataset
of your own may use too: the 150 class names and palette, listing a split's pairs (or reading them from a list file),
reading images and annotations, and the torch Dataset whose items the train loop and the evaluation consume (`image`
uint8 (3, H, W) RGB, `label` (H, W) with 255 = ignore, `path`; normalised on the device by
`knetlab.data.transforms.normalize_images`).

mmsegmentation's `ADE20KDataset` is the reference: `.jpg` images, `.png` annotations of the same stem, label 0 is
"other" and `reduce_zero_label` maps it to the ignore index 255 and every class k (1..150) to k - 1."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from knetlab.data.errors import DatasetError, describe_error, raise_problems  # shared with the cache, COCO, lists
from knetlab.data.list_file import Pair, list_file_pairs

NUM_CLASSES = 150
IGNORE_INDEX = 255
DATASET_DIRNAME = "ADEChallengeData2016"
IMAGE_SUFFIX = ".jpg"  # ADE20K's images; a dataset of your own may also use the others of IMAGE_SUFFIXES
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_SUFFIX = ".png"
SPLITS = ("training", "validation")
SPLIT_ALIASES = {"training": "training", "train": "training", "validation": "validation", "val": "validation"}
LABEL_MODES = ("L", "P", "I;16", "I")  # single-channel modes an annotation may use; ADE20K's own are "L"

# mmsegmentation's ADE20KDataset.METAINFO, in label order (raw label k is class k - 1). mmseg spells class 8 'bed '
# with a trailing space; it is stripped here so that names can be used as metric and column names.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk", "rock",
    "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers",
    "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent",
    "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal",
    "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light",
    "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)

# RGB colour of each class, same order as ADE20K_CLASSES (mmseg's METAINFO palette).
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140),
    (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70),
    (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200),
    (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220),
    (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140),
    (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255), (255, 71, 0),
    (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255),
    (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255),
    (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10),
    (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255),
    (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0),
    (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122),
    (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255),
    (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255),
    (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194),
    (102, 255, 0), (92, 0, 255),
)

# transform(image uint8 (H, W, 3) RGB, label (H, W) after reduce_zero_label, rng) -> (image tensor, label tensor)
Transform = Callable[[np.ndarray, np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


def split_dir_name(split: str) -> str:
    """`training` / `validation` (also accepted: `train`, `val`)."""
    try:
        return SPLIT_ALIASES[split]
    except KeyError:
        raise DatasetError(f"unknown ADE20K split {split!r}; valid: {', '.join(sorted(SPLIT_ALIASES))}") from None


def find_dataset_dir(root: str | os.PathLike) -> Path:
    """The directory holding `images/` and `annotations/`: `root` itself or `root/ADEChallengeData2016`."""
    root = Path(root).expanduser()
    if str(root).startswith("s3:/"):
        raise DatasetError(f"{root}: an s3:// dataset must be resolved to a local copy first "
                           "(knetlab.data.resolve_dataset_root)")
    for candidate in (root, root / DATASET_DIRNAME):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    if not root.exists():
        raise DatasetError(f"{root}: dataset root does not exist")
    raise DatasetError(f"{root}: not an ADE20K dataset root; expected images/ and annotations/ in it or in "
                       f"{root / DATASET_DIRNAME} (or list files of image/label pairs: data.train_list, "
                       f"data.val_list)")


def list_pairs(root: str | os.PathLike, split: str) -> list[Pair]:
    """(image, annotation) pairs of a split, sorted by name, after the layout checks that need no decoding:
    both split directories exist, the split is not empty, every image has its annotation and vice versa."""
    pairs, problems = find_pairs(root, split)
    raise_problems(problems)
    return pairs


def find_pairs(root: str | os.PathLike, split: str) -> tuple[list[Pair], list[str]]:
    """`list_pairs` without raising: the pairs found and every layout problem (a missing split directory, an empty
    split, an image without annotation or the reverse, two images of one name)."""
    dataset_dir = find_dataset_dir(root)
    split = split_dir_name(split)
    image_dir = dataset_dir / "images" / split
    label_dir = dataset_dir / "annotations" / split
    missing = [f"{directory}: split directory does not exist" for directory in (image_dir, label_dir)
               if not directory.is_dir()]
    if missing:
        return [], missing
    images: dict[str, Path] = {}
    problems = []
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in images:
                problems.append(f"{path}: two images named {path.stem} ({images[path.stem].name}, {path.name})")
            images.setdefault(path.stem, path)
    labels = {p.stem: p for p in label_dir.iterdir() if p.suffix == LABEL_SUFFIX and not p.name.startswith(".")}
    if not images:
        return [], [f"{image_dir}: empty split, no images ({', '.join(IMAGE_SUFFIXES)})"]
    problems += [f"{images[stem]}: image has no annotation (expected {label_dir / (stem + LABEL_SUFFIX)})"
                 for stem in sorted(images.keys() - labels.keys())]
    problems += [f"{labels[stem]}: annotation has no image (expected {image_dir / (stem + IMAGE_SUFFIX)})"
                 for stem in sorted(labels.keys() - images.keys())]
    return [(images[stem], labels[stem]) for stem in sorted(images.keys() & labels.keys())], problems


def split_pairs(root: str | os.PathLike, split: str, list_file: str | os.PathLike | None = None) -> list[Pair]:
    """The pairs of a split: from its list file when one is given (`knetlab.data.list_file`), else ADE20K's folders."""
    if list_file:
        return list_file_pairs(list_file, root)
    return list_pairs(root, split)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 (H, W, 3) RGB (grayscale and CMYK JPEGs are converted, as cv2's colour read does).
    EXIF orientation is not applied: the annotation is stored in the file's pixel order.

    Complete JPEGs (ending with the end-of-image marker) are decoded by OpenCV straight to RGB, as the reference
    decodes them (mmcv's cv2 backend); anything else by PIL, which gives the same pixels and names what is wrong with
    a truncated or broken file."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: unreadable image ({describe_error(error)})") from error
    if data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9":
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION)
        if image is not None:
            return image
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as error:
        raise DatasetError(f"{path}: unreadable image ({describe_error(error)})") from error


def check_label_mode(image: Image.Image, path: str | os.PathLike) -> None:
    if image.mode not in LABEL_MODES:
        raise DatasetError(f"{path}: annotation must be a single-channel PNG (mode L or P, as ADE20K's), "
                           f"got mode {image.mode}")


def _decode_grey_png(data: bytes) -> np.ndarray | None:
    """An 8- or 16-bit greyscale PNG (ADE20K's annotations) decoded by OpenCV, else None (PIL reads the rest: palette
    indices, and the errors it names)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 26 or data[25] != 0 or data[24] not in (8, 16):
        return None  # IHDR: byte 24 bit depth, byte 25 colour type (0 = greyscale)
    label = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return label if label is not None and label.ndim == 2 else None


def read_raw_label(path: str | os.PathLike) -> np.ndarray:
    """An annotation PNG's values as stored (H, W), unchecked: 8- or 16-bit grey, or a palette PNG's indices."""
    try:
        data = Path(path).read_bytes()
        label = _decode_grey_png(data)
        if label is None:
            with Image.open(io.BytesIO(data)) as image:
                check_label_mode(image, path)
                label = np.asarray(image)  # palette images give their indices, as mmseg's pillow read does
    except DatasetError:
        raise
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: unreadable annotation (not an image file PIL can identify)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable annotation ({describe_error(error)})") from error
    return label


def valid_label_values(num_classes: int, reduce_zero_label: bool) -> tuple[int, str]:
    """(the largest class value an annotation file may hold, the valid values in words); with reduce_zero_label
    nothing above it is valid, without it 255 (ignore) is too."""
    if reduce_zero_label:
        return num_classes, f"0 (other) or 1..{num_classes}"
    return num_classes - 1, f"0..{num_classes - 1} or {IGNORE_INDEX} (ignore)"


def out_of_range_values(label: np.ndarray, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """The distinct values of a raw annotation that are no class and not the ignore value (empty when none)."""
    limit, _ = valid_label_values(num_classes, reduce_zero_label)
    if label.size == 0 or int(label.max()) <= limit:  # one pass over the map in the usual case
        return np.empty(0, dtype=label.dtype)
    bad = label > limit if reduce_zero_label else (label > limit) & (label != IGNORE_INDEX)
    return np.unique(label[bad])


def out_of_range_message(path: str | os.PathLike, values: np.ndarray, num_classes: int,
                         reduce_zero_label: bool) -> str:
    shown = ", ".join(str(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
    valid = valid_label_values(num_classes, reduce_zero_label)[1]
    return f"{path}: label value(s) {shown} out of range; valid: {valid}"


def load_label(path: str | os.PathLike, *, num_classes: int = NUM_CLASSES, reduce_zero_label: bool = True
               ) -> np.ndarray:
    """An annotation PNG as a (H, W) array of training labels (uint8 when they fit), values checked:
    with `reduce_zero_label` the file holds 0 (other) and 1..num_classes and the result 255 and 0..num_classes-1;
    without, the file already holds 0..num_classes-1 and 255 (ignore)."""
    label = read_raw_label(path)
    values = out_of_range_values(label, num_classes, reduce_zero_label)
    if len(values):
        raise DatasetError(out_of_range_message(path, values, num_classes, reduce_zero_label))
    if label.dtype != np.uint8 and num_classes < 255:
        label = label.astype(np.uint8)
    return reduce_zero_label_map(label) if reduce_zero_label else np.array(label)


# reduce_zero_label of every uint8 value: 0 -> 255, k -> k - 1, 255 -> 255
_REDUCE_ZERO_TABLE = np.concatenate([[IGNORE_INDEX], np.arange(254), [IGNORE_INDEX]]).astype(np.uint8)


def reduce_zero_label_map(label: np.ndarray) -> np.ndarray:
    """mmseg's `reduce_zero_label`: 0 (other) -> 255 (ignore), k -> k - 1, 255 stays 255."""
    if label.dtype == np.uint8:
        return cv2.LUT(label, _REDUCE_ZERO_TABLE) if label.ndim == 2 and label.size else _REDUCE_ZERO_TABLE[label]
    out = label.astype(np.int64) - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


class ADE20KDataset(torch.utils.data.Dataset):
    """One split of ADE20K (or a dataset in its layout). Items: {"image": uint8 (3, H, W) RGB, "label" (H, W) with
    255 = ignore (uint8 for ADE20K's labels), "path": the image file}; `normalize_images` normalises the images where
    they meet the model.

    `root` is a local directory (holding `ADEChallengeData2016/` or being it) or an `s3://bucket/prefix` URI, which
    is copied once per node into `cache_dir` (see `knetlab.data.cache`); with a `list_file` (relative to `root`) the
    split's pairs are that file's lines instead of ADE20K's folders. `classes`/`palette`: the dataset's names and
    colours (`knetlab.data.classes`; default ADE20K's when num_classes is 150).

    `transform(image, label, rng)` receives the uint8 RGB image, the label after `reduce_zero_label` and a
    `numpy.random.Generator`; without one both only become tensors (`ToTensor`). The generator of item `index` is
    `default_rng([seed, epoch, index])` when `seed` is given (call `set_epoch` before each pass: reproducible
    whichever worker loads the item); without a seed it is seeded from torch's RNG, which
    `torch.utils.data.DataLoader` seeds per worker from the loop's seed.

    Construction runs the layout checks (`list_pairs`); `knetlab.data.check.check_split` runs the deep ones. Loading
    raises `DatasetError` naming the file for an unreadable file, a bad label value or an image/annotation size
    mismatch.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str,
        transform: Transform | None = None,
        reduce_zero_label: bool = True,
        *,
        num_classes: int = NUM_CLASSES,
        seed: int | None = None,
        max_images: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        list_file: str | os.PathLike | None = None,
        classes: Sequence[str] | None = None,
        palette: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if str(root).startswith("s3://"):
            from knetlab.data.cache import resolve_dataset_root

            root = resolve_dataset_root(str(root), cache_dir)
        self.root = Path(root).expanduser() if list_file else find_dataset_dir(root)
        self.split = split_dir_name(split)
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = num_classes
        self.seed = seed
        self.epoch = 0
        self.pairs = split_pairs(self.root, self.split, list_file)
        if max_images is not None:
            self.pairs = self.pairs[:max_images]
        default = num_classes == NUM_CLASSES and classes is None
        self.classes = tuple(classes) if classes is not None else (ADE20K_CLASSES if default else None)
        self.palette = tuple(map(tuple, palette)) if palette is not None else (ADE20K_PALETTE if default else None)

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        if self.seed is not None:
            return np.random.default_rng([self.seed, self.epoch, index])
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    def __getitem__(self, index: int) -> dict:
        image_path, label_path = self.pairs[index]
        image = load_image(image_path)
        label = load_label(label_path, num_classes=self.num_classes, reduce_zero_label=self.reduce_zero_label)
        if image.shape[:2] != label.shape:
            raise DatasetError(f"{label_path}: annotation is {label.shape[1]}x{label.shape[0]} (WxH) but its image "
                               f"{image_path.name} is {image.shape[1]}x{image.shape[0]}")
        if self.transform is None:
            from knetlab.data.transforms import ToTensor

            image_tensor, label_tensor = ToTensor()(image, label, None)
        else:
            image_tensor, label_tensor = self.transform(image, label, self.rng(index))
        return {"image": image_tensor, "label": label_tensor, "path": str(image_path)}
