"""A small synthetic dataset with classes of its own, as a user's dataset would be (`knetlab data synth --format
custom`): `ROOT/images/{training,validation}/*.jpg`, `ROOT/annotations/.../*.png` holding labels 0..N-1 with 255 for
unlabelled pixels (so `reduce_zero_label` is false), `ROOT/classes.txt` with the names and colours, and the same
pairs as list files `ROOT/train.txt` and `ROOT/val.txt` (for `data.train_list`/`data.val_list`). The pictures are
synthetic.py's (textured stuff regions, shapes, an unlabelled blob), deterministic from the seed."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from knetlab.data.ade20k import reduce_zero_label_map
from knetlab.data.classes import make_classes
from knetlab.data.errors import DatasetError
from knetlab.data.synthetic import (
    PARAMS_FILE,
    check_split_and_size_params,
    class_signatures,
    image_rng_and_size,
    render_sample,
    write_dataset_once,
)

# The default names, so that a report or a metric shows at a glance that they are the dataset's and not ADE20K's.
SYNTHETIC_CLASS_NAMES = ("sky", "meadow", "pond", "kite", "traffic cone", "lantern", "mailbox", "bicycle", "umbrella",
                         "scarecrow")
SPLITS = (("training", "train"), ("validation", "val"))


def default_names(num_classes: int) -> list[str]:
    return [SYNTHETIC_CLASS_NAMES[i] if i < len(SYNTHETIC_CLASS_NAMES) else f"thing_{i}" for i in range(num_classes)]


def generate_synthetic_custom(
    out_dir: str | os.PathLike,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    num_train: int = 32,
    num_val: int = 10,
    min_side: int = 96,
    max_side: int = 320,
    image_size: Sequence[int] | None = None,
    seed: int = 0,
    jpeg_quality: int = 95,
    exist_ok: bool = False,
) -> Path:
    """Write the dataset at `out_dir` itself (it must not exist, unless `exist_ok` and generated with the same
    arguments) and return it. `num_classes` (default 5, or the number of `class_names`) classes named `class_names`
    (default: sky, meadow, pond, kite, traffic cone, ...); the other arguments as `generate_synthetic_ade20k`'s."""
    image_size = check_split_and_size_params(num_train, num_val, min_side, max_side, image_size, jpeg_quality, 8)
    count = num_classes if num_classes is not None else (len(class_names) if class_names else 5)
    if not 1 <= int(count) <= 254:
        raise DatasetError(f"num_classes must be in 1..254, got {count}")
    names = list(class_names) if class_names else default_names(int(count))
    if len(names) != int(count):
        raise DatasetError(f"{len(names)} class names ({', '.join(map(str, names))}) for num_classes={count}")
    classes = make_classes(names, None, "class names")
    params = {"format": "custom", "names": list(classes.names), "palette": [list(c) for c in classes.palette],
              "num_train": int(num_train), "num_val": int(num_val), "min_side": int(min_side),
              "max_side": int(max_side), "image_size": image_size, "seed": int(seed), "jpeg_quality": int(jpeg_quality)}
    out = Path(out_dir).expanduser().absolute()
    return write_dataset_once(out.parent, out.name, PARAMS_FILE, params, _write_dataset, exist_ok,
                              params_inside=True)


def _write_dataset(root: Path, params: dict) -> None:
    names = params["names"]
    signatures = class_signatures(list(range(1, len(names) + 1)), params["seed"])  # rendered as 1..N, 0 = other
    with open(root / "classes.txt", "w") as f:
        f.write("# class names in label order (annotation value 0 is the first), then R G B of its colour\n")
        for name, (r, g, b) in zip(names, params["palette"]):
            f.write(f"{name} {r} {g} {b}\n")
    for split_index, (split, short) in enumerate(SPLITS):
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        lines = []
        for index in range(params[f"num_{short}"]):
            rng, height, width = image_rng_and_size(params, split_index, index)
            image, label = render_sample(signatures, height, width, rng)
            stem = f"{short}_{index + 1:05d}"
            Image.fromarray(image).save(image_dir / f"{stem}.jpg", quality=params["jpeg_quality"], subsampling=0)
            Image.fromarray(np.asarray(reduce_zero_label_map(label))).save(label_dir / f"{stem}.png")
            lines.append(f"images/{split}/{stem}.jpg annotations/{split}/{stem}.png\n")
        (root / f"{short}.txt").write_text("".join(lines))
