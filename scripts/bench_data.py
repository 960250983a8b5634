"""knetlab's ADE20K training pipeline against mmsegmentation's, side by side on the same files, one thread each:
samples/s of decode -> RandomResize((2048, 512), 0.5-2.0) -> RandomCrop(512, cat_max_ratio=0.75) -> RandomFlip ->
PhotoMetricDistortion -> uint8 tensors (what a loader process does per item), and with the data preprocessor
(normalise, pad to the crop) run on the CPU as well.

    .venv/bin/python scripts/bench_data.py [--root DIR] [--images 60] [--rounds 5] \\
        [--reference-python /tmp/knetseg/venv/bin/python] [--baseline DIR]
    .venv/bin/python scripts/bench_data.py --stages [--baseline DIR]   # CPU ms per step of knetlab's pipeline
    .venv/bin/python scripts/bench_data.py --libraries    # candidate decoders and resizers on the same files

Without --root the files are a synthetic ADE20K-format dataset (`knetlab data synth`, sides of 384-900 pixels)
written to a temporary directory. The reference side runs only when given the python of an environment with
mmsegmentation 1.x (e.g. the scratch one `reference-env.sh` builds); it is never a dependency. Each round starts one
fresh process per side (alternating which goes first) and times --images items after 3 untimed ones. Samples/s
are per second of the process's CPU time (one thread: per core), which other processes on a busy machine barely
move; wall-clock samples/s, which they do, are printed too. The figures are the median and the best round.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WARMUP = 3

# The reference side: mmseg 1.x's ADE20K train pipeline (configs/_base_/datasets/ade20k.py) and SegDataPreProcessor,
# run by the reference environment's python on the same files.
MMSEG_SIDE = r'''
import glob, json, os, sys, time, types
import cv2, torch
cv2.setNumThreads(1)
torch.set_num_threads(1)
try:
    import mmcv.ops  # noqa: F401
except ImportError:  # mmcv-lite (reference-env.sh): mmseg.models imports compiled ops the pipeline does not use
    sys.modules["mmcv.ops"] = types.ModuleType("mmcv.ops")
    for name in ["point_sample", "sigmoid_focal_loss", "CrissCrossAttention", "PSAMask", "DeformConv2d",
                 "ModulatedDeformConv2d"]:
        setattr(sys.modules["mmcv.ops"], name, None)
from mmcv.transforms import Compose
from mmseg.models.data_preprocessor import SegDataPreProcessor
from mmseg.utils import register_all_modules
register_all_modules()
root, images, crop, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pipeline = Compose([
    dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", reduce_zero_label=True),
    dict(type="RandomResize", scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type="RandomCrop", crop_size=(crop, crop), cat_max_ratio=0.75), dict(type="RandomFlip", prob=0.5),
    dict(type="PhotoMetricDistortion"), dict(type="PackSegInputs")])
preprocessor = SegDataPreProcessor(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], bgr_to_rgb=True,
                                   pad_val=0, seg_pad_val=255, size=(crop, crop))
jpgs = sorted(glob.glob(os.path.join(root, "images", "training", "*.jpg")))
def info(i):
    jpg = jpgs[i % len(jpgs)]
    png = os.path.join(root, "annotations", "training", os.path.basename(jpg)[:-4] + ".png")
    return dict(img_path=jpg, seg_map_path=png, reduce_zero_label=True, seg_fields=[])
for i in range(warmup):
    pipeline(info(i))
pipeline_s = preprocess_s = 0.0
wall = time.perf_counter()
for i in range(images):
    start = time.process_time()
    packed = pipeline(info(i))
    middle = time.process_time()
    preprocessor(dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]]), training=True)
    pipeline_s += middle - start
    preprocess_s += time.process_time() - middle
wall = time.perf_counter() - wall
import mmseg
print(json.dumps({"pipeline": images / pipeline_s, "with_preprocessor": images / (pipeline_s + preprocess_s),
                  "wall": images / wall, "version": f"mmsegmentation {mmseg.__version__}, opencv {cv2.__version__}"}))
'''


def knetlab_side(root: str, images: int, crop: int) -> dict:
    """One round of knetlab's side in this process (run as `--side knetlab`)."""
    import cv2
    import torch

    import knetlab.data.transforms as transforms
    from knetlab.data.ade20k import ADE20KDataset
    from knetlab.data.transforms import build_train_transform

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    # A --baseline checkout from before the uint8 pipeline normalised and padded in the pipeline itself.
    normalize_images = getattr(transforms, "normalize_images", lambda images, device, size: None)
    dataset = ADE20KDataset(root, "training", build_train_transform(crop), seed=0)
    for index in range(WARMUP):
        dataset[index % len(dataset)]
    pipeline_s = preprocess_s = 0.0
    wall = time.perf_counter()
    for index in range(images):
        start = time.process_time()
        item = dataset[index % len(dataset)]
        middle = time.process_time()
        normalize_images([item["image"]], "cpu", size=item["label"].shape)
        item["label"].long()
        pipeline_s += middle - start
        preprocess_s += time.process_time() - middle
    wall = time.perf_counter() - wall
    return {"pipeline": images / pipeline_s, "with_preprocessor": images / (pipeline_s + preprocess_s),
            "wall": images / wall, "version": f"knetlab at {Path(transforms.__file__).parents[2]}"}


def knetlab_stages(root: str, images: int, crop: int) -> dict:
    """CPU milliseconds per item of each step of knetlab's training pipeline (run as `--side stages`)."""
    import cv2
    import torch

    from knetlab.data.ade20k import ADE20KDataset, load_image, load_label
    from knetlab.data.transforms import build_train_transform

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    dataset = ADE20KDataset(root, "training", build_train_transform(crop), seed=0)
    steps = [("decode image", lambda pair, x, y, rng: (load_image(pair[0]), None)),
             ("decode label", lambda pair, x, y, rng: (x, load_label(pair[1])))]
    steps += [(type(step).__name__, lambda pair, x, y, rng, step=step: step(x, y, rng))
              for step in dataset.transform.steps]
    totals = dict.fromkeys((name for name, _ in steps), 0.0)
    for index in range(WARMUP + images):
        image = label = None
        rng = dataset.rng(index % len(dataset))
        for name, step in steps:
            start = time.process_time()
            image, label = step(dataset.pairs[index % len(dataset)], image, label, rng)
            if index >= WARMUP:
                totals[name] += time.process_time() - start
    return {"stages": {name: 1000 * total / images for name, total in totals.items()}}


def library_choices(root: str, images: int) -> dict:
    """CPU milliseconds per image of the candidates for each heavy operation, on the same files (`--libraries`)."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision.io
    from PIL import Image

    from knetlab.data.ade20k import list_pairs

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    pairs = list_pairs(root, "training")[:images]
    data = [path.read_bytes() for path, _ in pairs]
    decoded = [cv2.imdecode(np.frombuffer(d, np.uint8), cv2.IMREAD_COLOR_RGB) for d in data]
    crops = [np.ascontiguousarray(image[:512, :512]) for image in decoded]

    def torch_resize(image: np.ndarray) -> np.ndarray:  # knetlab's resize before OpenCV
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        out = F.interpolate(tensor, scale_factor=1.37, mode="bilinear", align_corners=False, antialias=False)
        return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()

    candidates = {
        "decode: PIL (pillow, libjpeg-turbo)": (data, lambda d: np.array(Image.open(io.BytesIO(d)).convert("RGB"))),
        "decode: torchvision.io.decode_jpeg": (data, lambda d: torchvision.io.decode_jpeg(
            torch.frombuffer(bytearray(d), dtype=torch.uint8))),
        "decode: OpenCV imdecode (RGB)": (data, lambda d: cv2.imdecode(np.frombuffer(d, np.uint8),
                                                                         cv2.IMREAD_COLOR_RGB)),
        "resize x1.37 bilinear: torch interpolate": (decoded, torch_resize),
        "resize x1.37 bilinear: OpenCV INTER_LINEAR": (decoded, lambda x: cv2.resize(
            x, None, fx=1.37, fy=1.37, interpolation=cv2.INTER_LINEAR)),
        "HSV round trip 512x512: OpenCV cvtColor": (crops, lambda x: cv2.cvtColor(
            cv2.cvtColor(x, cv2.COLOR_RGB2HSV), cv2.COLOR_HSV2RGB)),
    }
    figures = {}
    for name, (inputs, operation) in candidates.items():
        for item in inputs[:WARMUP]:
            operation(item)
        start = time.process_time()
        for item in inputs:
            operation(item)
        figures[name] = 1000 * (time.process_time() - start) / len(inputs)
    return figures


def run_side(command: list[str], checkout: Path = REPO) -> dict:
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(checkout)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_data: {' '.join(command[:3])} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def dataset_root(root: str | None, images: int) -> str:
    """ADEChallengeData2016 itself (the directory with images/ and annotations/)."""
    from knetlab.data.ade20k import find_dataset_dir
    from knetlab.data.synthetic import generate_synthetic_ade20k

    if root:
        return str(find_dataset_dir(root))

    out = Path(tempfile.mkdtemp(prefix="knetlab-bench-data-"))
    return str(generate_synthetic_ade20k(out, num_train=min(images, 100), num_val=1, num_classes=30, min_side=384,
                                         max_side=900))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=None, help="an ADE20K-format dataset (default: a synthetic one)")
    parser.add_argument("--images", type=int, default=60, help="timed items per round (default 60)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per side (default 5)")
    parser.add_argument("--crop", type=int, default=512, help="crop size (default 512, the table's)")
    parser.add_argument("--reference-python", default=None, help="python of an environment with mmsegmentation 1.x")
    parser.add_argument("--baseline", default=None, metavar="DIR",
                        help="another knetlab checkout measured as a third side, e.g. one made with "
                             "`git worktree add /tmp/before COMMIT`")
    parser.add_argument("--stages", action="store_true",
                        help="CPU ms per step of knetlab's pipeline (and --baseline's)")
    parser.add_argument("--libraries", action="store_true",
                        help="CPU ms per image of the candidate decoders, resizers and HSV conversions")
    parser.add_argument("--side", choices=["knetlab", "stages"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "knetlab":
        print(json.dumps(knetlab_side(args.root, args.images, args.crop)))
        return
    if args.side == "stages":
        print(json.dumps(knetlab_stages(args.root, args.images, args.crop)))
        return
    root = dataset_root(args.root, args.images)
    if args.libraries:
        print(f"CPU ms per image, one thread, {args.images} files: {root}")
        for name, ms in library_choices(root, args.images).items():
            print(f"  {name:48s} {ms:7.2f}")
        return
    if args.stages:
        checkouts = {"knetlab": REPO, **({"baseline": Path(args.baseline).resolve()} if args.baseline else {})}
        command = [sys.executable, __file__, "--side", "stages", "--root", root, "--images", str(args.images),
                   "--crop", str(args.crop)]
        for name, checkout in checkouts.items():
            stages = run_side(command, checkout)["stages"]
            print(f"{name} ({checkout}): CPU ms per item, {args.images} items, crop {args.crop}, total "
                  f"{sum(stages.values()):.1f} ({1000 / sum(stages.values()):.1f} samples per CPU-second)")
            for stage, ms in stages.items():
                print(f"  {stage:24s} {ms:7.2f}")
        return
    knetlab = [sys.executable, __file__, "--side", "knetlab", "--root", root, "--images", str(args.images), "--crop",
               str(args.crop)]
    sides = {"knetlab": (knetlab, REPO)}
    if args.baseline:
        sides["knetlab (baseline)"] = (knetlab, Path(args.baseline).resolve())
    if args.reference_python:
        sides["mmseg"] = ([args.reference_python, "-c", MMSEG_SIDE, root, str(args.images), str(args.crop),
                           str(WARMUP)], REPO)
    rounds: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            rounds[name].append(run_side(*sides[name]))
    load = os.getloadavg()[0]
    print(f"ADE20K training pipeline, one thread per side, {args.images} items x {args.rounds} rounds, crop "
          f"{args.crop}, files: {root} (load average {load:.2f})")
    print(f"samples/s per CPU-second {'pipeline':>17s} {'+ preprocessor (CPU)':>26s} {'wall clock':>13s}")
    print(f"{'':24s} {'median':>12s} {'best':>8s} {'median':>12s} {'best':>8s} {'median':>13s}")
    summary = {}
    for name, results in rounds.items():
        pipeline = [r["pipeline"] for r in results]
        full = [r["with_preprocessor"] for r in results]
        summary[name] = statistics.median(pipeline)
        print(f"{name:24s} {statistics.median(pipeline):12.1f} {max(pipeline):8.1f} {statistics.median(full):12.1f} "
              f"{max(full):8.1f} {statistics.median(r['wall'] for r in results):13.1f}   {results[0]['version']}")
    if "mmseg" in summary:
        print(f"knetlab / mmseg (median pipeline samples per CPU-second): {summary['knetlab'] / summary['mmseg']:.2f}x")


if __name__ == "__main__":
    main()
