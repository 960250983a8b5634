"""knetlab's ADE20K training pipeline against mmsegmentation's, sample by sample: mmseg 1.x's pipeline (decode,
RandomResize, RandomCrop with cat_max_ratio, RandomFlip, PhotoMetricDistortion, PackSegInputs) runs on each file
with numpy's global RNG seeded, and every random draw it makes is recorded; knetlab's pipeline then runs on the same
file with those draws replayed through its generator. The draws must be asked for in the same order with the same
arguments, and the crops (image and label) must be equal, bit for bit.

    .venv/bin/python scripts/check_reference_data.py --reference-python /tmp/knetseg/venv/bin/python \\
        [--root DIR] [--images 40] [--seeds 3] [--crop 512]

Without --root the files are a synthetic ADE20K-format dataset (sides of 384-900 pixels) in a temporary directory.
The reference environment (e.g. the scratch one `reference-env.sh` builds) is never a dependency of knetlab.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent

REFERENCE_SIDE = r'''
import glob, json, os, sys, types
import numpy as np
try:
    import mmcv.ops  # noqa: F401
except ImportError:  # mmcv-lite: mmseg.models imports compiled ops the pipeline does not use
    sys.modules["mmcv.ops"] = types.ModuleType("mmcv.ops")
    for name in ["point_sample", "sigmoid_focal_loss", "CrissCrossAttention", "PSAMask", "DeformConv2d",
                 "ModulatedDeformConv2d"]:
        setattr(sys.modules["mmcv.ops"], name, None)
from mmcv.transforms import Compose
from mmseg.utils import register_all_modules
register_all_modules()
root, images, seeds, crop, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
draws = []
def recorded(name):
    draw = getattr(np.random, name)
    def wrapper(*args, **kwargs):
        value = draw(*args, **kwargs)
        draws[-1].append([name, [a.tolist() if isinstance(a, np.ndarray) else a for a in args],
                          value.item() if hasattr(value, "item") else value])
        return value
    setattr(np.random, name, wrapper)
for name in ("random_sample", "randint", "uniform", "choice", "rand", "random"):
    recorded(name)
pipeline = Compose([
    dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=0.75), dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")])
jpgs = sorted(glob.glob(os.path.join(root, "images", "training", "*.jpg")))[:images]
arrays, samples = {}, []
for i, jpg in enumerate(jpgs):
    png = os.path.join(root, "annotations", "training", os.path.basename(jpg)[:-4] + ".png")
    for seed in range(seeds):
        np.random.seed(seed * 100_003 + i)
        draws.append([])
        packed = pipeline(dict(img_path=jpg, seg_map_path=png, reduce_zero_label=True, seg_fields=[]))
        key = f"{i}_{seed}"
        arrays["image_" + key] = packed["inputs"].numpy()[::-1]  # BGR -> RGB
        arrays["label_" + key] = packed["data_samples"].gt_sem_seg.data.numpy()[0]
        samples.append({"key": key, "image": jpg, "label": png, "draws": draws[-1]})
np.savez_compressed(out + ".npz", **arrays)
import cv2, mmseg
with open(out + ".json", "w") as f:
    json.dump({"versions": f"mmsegmentation {mmseg.__version__}, opencv {cv2.__version__}", "samples": samples}, f)
'''


class ReplayedDraws:
    """A stand-in for knetlab's numpy Generator that returns the reference's recorded draws, checking that each is
    asked for by the matching call: random() <- random_sample (RandomResize's ratio) or the flip choice; integers(..)
    <- randint with the same arguments; uniform(a, b) <- uniform with the same arguments."""

    def __init__(self, draws: list) -> None:
        self.draws = list(draws)

    def take(self, names: tuple[str, ...], args: list | None = None):
        if not self.draws:
            raise AssertionError(f"knetlab draws more than the reference ({names[0]} {args})")
        name, ref_args, value = self.draws.pop(0)
        if name not in names or (args is not None and list(ref_args) != list(args)):
            raise AssertionError(f"draw order differs: knetlab asks {names[0]}{tuple(args or ())}, the reference "
                                 f"drew {name}{tuple(ref_args)}")
        return name, value

    def random(self) -> float:
        name, value = self.take(("random_sample", "choice"))
        if name == "choice":  # mmcv RandomFlip: choice(['horizontal', None], p=[prob, 1 - prob])
            return 0.0 if value == "horizontal" else 1.0
        return float(value)

    def integers(self, low: int, high: int | None = None) -> int:
        return int(self.take(("randint",), [low] if high is None else [low, high])[1])

    def uniform(self, low: float, high: float) -> float:
        return float(self.take(("uniform",), [low, high])[1])


def dataset_root(root: str | None) -> str:
    from knetlab.data.ade20k import find_dataset_dir
    from knetlab.data.synthetic import generate_synthetic_ade20k

    if root:
        return str(find_dataset_dir(root))
    out = Path(tempfile.mkdtemp(prefix="knetlab-check-data-"))
    return str(generate_synthetic_ade20k(out, num_train=40, num_val=1, num_classes=30, min_side=384, max_side=900))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python", required=True, help="python of an environment with mmsegmentation 1.x")
    parser.add_argument("--root", default=None, help="an ADE20K-format dataset (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3, help="reference seeds per image")
    parser.add_argument("--crop", type=int, default=512)
    args = parser.parse_args()

    from knetlab.data.ade20k import load_image, load_label
    from knetlab.data.transforms import build_train_transform

    root = dataset_root(args.root)
    out = str(Path(tempfile.mkdtemp(prefix="knetlab-check-data-")) / "reference")
    subprocess.run([args.reference_python, "-c", REFERENCE_SIDE, root, str(args.images), str(args.seeds),
                    str(args.crop), out], check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    import cv2

    arrays = np.load(out + ".npz")
    reference = json.loads(Path(out + ".json").read_text())
    samples = reference["samples"]
    transform = build_train_transform(args.crop)
    failures, flips, photometric = [], 0, 0
    for sample in samples:
        rng = ReplayedDraws(sample["draws"])
        try:
            image, label = transform(load_image(sample["image"]), load_label(sample["label"]), rng)
            if rng.draws:
                raise AssertionError(f"the reference drew {len(rng.draws)} more: {rng.draws[:2]}")
        except AssertionError as error:
            failures.append(f"{Path(sample['image']).name} seed {sample['key']}: {error}")
            continue
        ref_image, ref_label = arrays["image_" + sample["key"]], arrays["label_" + sample["key"]]
        h, w = ref_label.shape
        same_label = label.shape == (args.crop, args.crop) and np.array_equal(label[:h, :w].numpy(), ref_label) \
            and bool((label[h:] == 255).all() and (label[:, w:] == 255).all())
        same_image = tuple(image.shape) == ref_image.shape and np.array_equal(image.numpy(), ref_image)
        if not (same_label and same_image):
            diff = (np.abs(image.numpy().astype(int) - ref_image).max() if tuple(image.shape) == ref_image.shape
                    else f"shapes {tuple(image.shape)} vs {ref_image.shape}")
            failures.append(f"{Path(sample['image']).name} seed {sample['key']}: label equal {same_label}, image "
                            f"max |diff| {diff}")
        flips += any(name == "choice" and value == "horizontal" for name, _, value in sample["draws"])
        photometric += sum(name == "uniform" for name, _, _ in sample["draws"])
    print(f"{len(samples)} samples ({args.images} images x {args.seeds} seeds, crop {args.crop}; {flips} flipped, "
          f"{photometric} photometric draws), files: {root}")
    print(f"knetlab: opencv {cv2.__version__}; reference: {reference['versions']}")
    if failures:
        print(f"{len(failures)} differ:\n  " + "\n  ".join(failures[:20]))
        if f"opencv {cv2.__version__}" not in reference["versions"]:
            print("the OpenCV versions differ: cv2's own HSV->RGB results change between versions (by a grey level, "
                  "in the last columns of rows); run the reference with knetlab's OpenCV to compare the pipelines")
        sys.exit(1)
    print("every sample bit-identical to mmsegmentation's (same draws, same order, same image and label)")


if __name__ == "__main__":
    main()
