"""Checking a semantic dataset's files, in ADE20K's folder layout or from list files: the up-front checks before
training or evaluation (`check_split`: every problem of a split named in one DatasetError) and the report of
`knetlab data check` (`check_dataset`: every problem, the class histogram and the image sizes), both on the same
inspection of each image/annotation pair (`inspect_pair`)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from knetlab.data.ade20k import (
    IGNORE_INDEX,
    NUM_CLASSES,
    SPLITS,
    check_label_mode,
    find_dataset_dir,
    find_pairs,
    out_of_range_message,
    out_of_range_values,
    read_raw_label,
    split_pairs,
)
from knetlab.data.classes import DatasetClasses
from knetlab.data.errors import DatasetError, describe_error, raise_problems
from knetlab.data.list_file import Pair, list_file_path, read_list_file

DECODE_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError)


@dataclass
class PairFindings:
    """One pair: the image's (width, height), pixels per class with the ignored ones last (when counted), problems."""

    size: tuple[int, int] | None
    counts: np.ndarray | None
    problems: list[str]


def inspect_pair(pair: Pair, num_classes: int, reduce_zero_label: bool, *, deep: bool = True,
                 histogram: bool = False) -> PairFindings:
    """Both files open as images, the annotation is single-channel and of the image's size; with `deep` both are
    decoded (JPEGs at 1/8 scale, which still reads the whole entropy-coded stream, so truncation is caught) and every
    label value is checked; with `histogram` the annotation's pixels are counted per class."""
    image_path, label_path = pair
    problems: list[str] = []
    image_size = label_size = None
    counts = None
    try:
        with Image.open(image_path) as image:
            image_size = image.size
            if deep:
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.size[0] // 8), max(1, image.size[1] // 8)))
                image.load()
    except DECODE_ERRORS as error:
        problems.append(f"{image_path}: unreadable image ({describe_error(error)})")
    try:
        if deep:
            raw = read_raw_label(label_path)
            label_size = (raw.shape[1], raw.shape[0])
            bad = out_of_range_values(raw, num_classes, reduce_zero_label)
            if len(bad):
                problems.append(out_of_range_message(label_path, bad, num_classes, reduce_zero_label))
            if histogram:
                counts = class_pixel_counts(raw, num_classes, reduce_zero_label)
        else:
            with Image.open(label_path) as label_image:
                check_label_mode(label_image, label_path)
                label_size = label_image.size
    except DatasetError as error:
        problems.append(str(error))
    except DECODE_ERRORS as error:
        problems.append(f"{label_path}: unreadable annotation ({describe_error(error)})")
    if image_size and label_size and image_size != label_size:
        problems.append(f"{label_path}: annotation is {label_size[0]}x{label_size[1]} (WxH) but its image "
                        f"{image_path.name} is {image_size[0]}x{image_size[1]}")
    return PairFindings(image_size, counts, problems)


def class_pixel_counts(raw: np.ndarray, num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """(num_classes + 1,) int64: the pixels of each class in a raw annotation, then the ignored ones (0 with
    reduce_zero_label, else 255); out-of-range values are not counted."""
    values = raw.ravel()
    if values.dtype != np.uint8:
        values = values[(values >= 0) & (values <= IGNORE_INDEX)].astype(np.int64)
    by_value = np.bincount(values, minlength=IGNORE_INDEX + 1)
    counts = np.zeros(num_classes + 1, dtype=np.int64)
    if reduce_zero_label:
        counts[:num_classes] = by_value[1:num_classes + 1]
        counts[num_classes] = by_value[0]
    else:
        counts[:num_classes] = by_value[:num_classes]
        counts[num_classes] = by_value[IGNORE_INDEX]
    return counts


def _pool_map(function, items: list, max_workers: int | None) -> list:
    workers = max_workers or min(8, (os.cpu_count() or 1) + 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        return list(pool.map(function, items))


def check_split(
    root: str | os.PathLike,
    split: str,
    *,
    num_classes: int = NUM_CLASSES,
    reduce_zero_label: bool = True,
    deep: bool = True,
    max_workers: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    list_file: str | os.PathLike | None = None,
) -> list[Pair]:
    """The up-front checks of one split, run by the driver before any worker starts; returns its pairs.

    Layout (`ade20k.list_pairs`, or the split's `list_file` of image/label pairs), then `inspect_pair` on each pair
    (label values: 0..num_classes with reduce_zero_label, else 0..num_classes-1 or 255). Raises `DatasetError` naming
    the files. An `s3://` root is first copied to this node's cache (`cache_dir`), as the dataset would be."""
    if str(root).startswith("s3://"):
        from knetlab.data.cache import resolve_dataset_root

        root = resolve_dataset_root(str(root), cache_dir)
    pairs = split_pairs(root, split, list_file)
    findings = _pool_map(lambda pair: inspect_pair(pair, num_classes, reduce_zero_label, deep=deep), pairs,
                         max_workers)
    raise_problems([problem for found in findings for problem in found.problems])
    return pairs


@dataclass
class SplitReport:
    """What `check_dataset` found in one split."""

    split: str
    source: str  # the split's image folder or its list file
    pairs: int = 0
    sizes: Counter = field(default_factory=Counter)  # (width, height) -> images
    counts: np.ndarray | None = None  # pixels per class, ignored last
    images_with: np.ndarray | None = None  # images containing each class
    problems: list[str] = field(default_factory=list)


@dataclass
class DataReport:
    root: str
    classes: DatasetClasses
    reduce_zero_label: bool
    list_files: dict[str, str | None]
    splits: list[SplitReport]
    dataset_problems: list[str] = field(default_factory=list)  # about the whole dataset (its classes)

    @property
    def problems(self) -> list[str]:
        return [*self.dataset_problems, *(problem for split in self.splits for problem in split.problems)]


def check_dataset(root: str | os.PathLike, classes: DatasetClasses, *, reduce_zero_label: bool,
                  list_files: Mapping[str, str | None] | None = None, cache_dir: str | os.PathLike | None = None,
                  max_workers: int | None = None) -> DataReport:
    """Every problem of both splits (none stops the check), each split's image sizes and the pixels of every class.
    `list_files` maps "training"/"validation" to a list file (relative to the root) or None (ADE20K's folders). A
    root that is no dataset at all is a DatasetError."""
    shown_root = str(root)
    if shown_root.startswith("s3://"):
        from knetlab.data.cache import resolve_dataset_root

        root = resolve_dataset_root(shown_root, cache_dir)
    list_files = {split: (list_files or {}).get(split) for split in SPLITS}
    if not all(list_files.values()):
        find_dataset_dir(root)  # a root without ADE20K's folders: one error, not a report
    num_classes = len(classes.names)
    reports = []
    for split in SPLITS:
        if list_files[split]:
            source = str(list_file_path(list_files[split], root))
            pairs, problems = read_list_file(list_files[split], root)
        else:
            source = str(find_dataset_dir(root) / "images" / split)
            pairs, problems = find_pairs(root, split)
        report = SplitReport(split, source, len(pairs), problems=list(problems),
                             counts=np.zeros(num_classes + 1, dtype=np.int64),
                             images_with=np.zeros(num_classes, dtype=np.int64))
        for found in _pool_map(lambda pair: inspect_pair(pair, num_classes, reduce_zero_label, histogram=True),
                               pairs, max_workers):
            report.problems += found.problems
            if found.size:
                report.sizes[found.size] += 1
            if found.counts is not None:
                report.counts += found.counts
                report.images_with += found.counts[:num_classes] > 0
        reports.append(report)
    return DataReport(shown_root, classes, reduce_zero_label, dict(list_files), reports)


def format_report(report: DataReport) -> str:
    """The report as `knetlab data check` prints it: dataset, classes, splits with image sizes, the class histogram
    (share of each split's counted pixels, and the images containing the class), then every problem."""
    names = report.classes.names
    lowest = 1 if report.reduce_zero_label else 0
    ignored = "0 (other)" if report.reduce_zero_label else str(IGNORE_INDEX)
    flag = str(report.reduce_zero_label).lower()
    lines = [f"dataset: {report.root}",
             f"classes: {len(names)} from {report.classes.source}; reduce_zero_label={flag}: annotation values "
             f"{lowest}..{len(names) - 1 + lowest} are the classes, {ignored} is ignored"]
    for split in report.splits:
        lines.append(f"{split.split}: {split.pairs} image/label pairs from {split.source}; {_sizes(split.sizes)}")
    width = max(len("class"), *(len(name) for name in names), len("(ignored)"))
    lines += ["", "class histogram: share of each split's annotated pixels, and the images containing the class",
              f"  {'':>3}  {'':<{width}}" + "".join(f"  {s.split:^17}" for s in report.splits),
              f"  {'id':>3}  {'class':<{width}}" + "  {:>8} {:>8}".format("pixels", "images") * len(report.splits)]
    totals = [max(int(s.counts.sum()), 1) for s in report.splits]
    for index, name in enumerate([*names, "(ignored)"]):
        row = f"  {index if index < len(names) else '':>3}  {name:<{width}}"
        for split, total in zip(report.splits, totals):
            images = split.images_with[index] if index < len(names) else ""
            row += f"  {100.0 * split.counts[index] / total:>7.2f}% {images:>8}"
        lines.append(row.rstrip())
    for split in report.splits:
        absent = [name for name, count in zip(names, split.counts[:len(names)]) if count == 0]
        if absent and split.pairs:
            lines.append(f"note: {len(absent)} class(es) without a pixel in {split.split}: {', '.join(absent[:20])}"
                         + (", ..." if len(absent) > 20 else ""))
    problems = report.problems
    lines += ["", f"problems: {len(problems) or 'none'}"]
    lines += [f"  {problem}" for problem in problems]
    return "\n".join(line.rstrip() for line in lines)


def _sizes(sizes: Counter) -> str:
    if not sizes:
        return "no readable images"
    by_area = sorted(sizes, key=lambda size: (size[0] * size[1], size))
    text = f"image sizes (WxH): {by_area[0][0]}x{by_area[0][1]}" if len(sizes) == 1 else (
        f"image sizes (WxH): {len(sizes)} distinct, smallest {by_area[0][0]}x{by_area[0][1]}, largest "
        f"{by_area[-1][0]}x{by_area[-1][1]}")
    repeated = [(size, n) for size, n in sizes.most_common(3) if n > 1]
    if repeated and len(sizes) > 1:
        text += ", most common " + ", ".join(f"{w}x{h} ({n})" for (w, h), n in repeated)
    return text
