"""The synthetic COCO generator: COCO 2017's exact layout, read back by the reference tools themselves (panopticapi's
PQ code scores the ground truth against itself at 100; pycocotools' COCOeval scores the instance ground truth as
detections at AP 100), crowd and VOID regions, deterministic bytes, and `knetlab data synth --format coco-*`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knetlab.data import DatasetError, check_coco_instance_split, check_coco_panoptic_split, generate_synthetic_coco
from knetlab.data.coco_categories import COCO_INSTANCE_CATEGORIES, COCO_PANOPTIC_CATEGORIES
from knetlab.data.coco_panoptic import rgb2id
from knetlab.data.synthetic_coco import DEFAULT_STUFF_IDS, DEFAULT_THING_IDS, uncompressed_rle

OPTIONS = {"num_train": 8, "num_val": 3, "min_side": 48, "max_side": 96, "seed": 4, "crowd_prob": 0.5,
           "void_prob": 0.5}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synthetic-coco")
    return {task: generate_synthetic_coco(out / task, task=task, **OPTIONS) for task in ("panoptic", "instance")}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_panoptic_layout_is_cocos_and_panopticapi_reads_it(synthetic):
    from panopticapi.evaluation import pq_compute_single_core

    root = synthetic["panoptic"]
    for split, count in (("train2017", 8), ("val2017", 3)):
        data = json.loads((root / "annotations" / f"panoptic_{split}.json").read_text())
        assert data["categories"] == json.loads(json.dumps([
            {"supercategory": c.supercategory, "color": list(c.color), "isthing": int(c.isthing), "id": c.id,
             "name": c.name} for c in COCO_PANOPTIC_CATEGORIES]))
        assert len(data["images"]) == len(data["annotations"]) == count
        for image, annotation in zip(data["images"], data["annotations"]):
            assert image["file_name"] == f"{image['id']:012d}.jpg" and annotation["image_id"] == image["id"]
            with Image.open(root / split / image["file_name"]) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.size == (image["width"], image["height"])
            pan = rgb2id(np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / annotation["file_name"])))
            assert set(np.unique(pan)) - {0} == {s["id"] for s in annotation["segments_info"]}
            for segment in annotation["segments_info"]:
                ys, xs = np.nonzero(pan == segment["id"])
                assert segment["area"] == len(ys)
                assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        categories = {c["id"]: c for c in data["categories"]}
        stat = pq_compute_single_core(0, list(zip(data["annotations"], data["annotations"])),
                                      str(root / "annotations" / f"panoptic_{split}"),
                                      str(root / "annotations" / f"panoptic_{split}"), categories)
        results, _ = stat.pq_average(categories, isthing=None)
        assert results["pq"] == pytest.approx(1.0) and results["n"] >= 4  # every present category matched exactly


def test_instance_layout_is_cocos_and_cocoeval_reads_it(synthetic):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = synthetic["instance"]
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    assert data["categories"] == [{"supercategory": c.supercategory, "id": c.id, "name": c.name}
                                  for c in COCO_INSTANCE_CATEGORIES]
    assert not (root / "annotations" / "panoptic_train2017").exists()
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    crowd = [a for a in data["annotations"] if a["iscrowd"]]
    plain = [a for a in data["annotations"] if not a["iscrowd"]]
    assert crowd and all(isinstance(a["segmentation"], dict) and isinstance(a["segmentation"]["counts"], list)
                         for a in crowd)
    assert all(isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6 for a in plain)
    gt = COCO(str(path))
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "segmentation": gt.annToRLE(a),
                   "score": 1.0} for a in plain]
    evaluation = COCOeval(gt, gt.loadRes(detections), iouType="segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)  # mask AP over the categories present
    for annotation in data["annotations"]:
        assert gt.annToMask(annotation).sum() == annotation["area"]


def test_scenes_hold_stuff_things_crowd_and_void(synthetic):
    root = synthetic["panoptic"]
    data = json.loads((root / "annotations" / "panoptic_train2017.json").read_text())
    segments = [s for a in data["annotations"] for s in a["segments_info"]]
    used = {s["category_id"] for s in segments}
    assert used <= set(DEFAULT_THING_IDS) | set(DEFAULT_STUFF_IDS)
    assert len(used & set(DEFAULT_THING_IDS)) >= 3 and len(used & set(DEFAULT_STUFF_IDS)) >= 2
    assert any(s["iscrowd"] and s["category_id"] in DEFAULT_THING_IDS for s in segments)
    void = 0
    for annotation in data["annotations"]:
        pan = rgb2id(np.asarray(Image.open(root / "annotations" / "panoptic_train2017" / annotation["file_name"])))
        void += int((pan == 0).sum())
        things = [s for s in annotation["segments_info"] if s["category_id"] in DEFAULT_THING_IDS]
        assert things and all(s["area"] >= 16 for s in things)
    assert void > 0


def test_uncompressed_rle_round_trips_through_pycocotools():
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((3, 4), dtype=bool), np.zeros((4, 3), dtype=bool)):
        rle = uncompressed_rle(mask)
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *rle["size"]))
        assert np.array_equal(decoded.astype(bool), mask) and sum(rle["counts"]) == mask.size


def test_same_arguments_same_bytes_and_exist_ok(synthetic, tmp_path: Path):
    again = generate_synthetic_coco(tmp_path / "again", task="panoptic", **OPTIONS)
    assert tree(again) == tree(synthetic["panoptic"])
    instance_jpegs = {k: v for k, v in tree(synthetic["instance"]).items() if k.endswith(".jpg")}
    assert instance_jpegs == {k: v for k, v in tree(again).items() if k.endswith(".jpg")}  # same scenes
    assert generate_synthetic_coco(tmp_path / "again", task="panoptic", exist_ok=True, **OPTIONS) == again
    with pytest.raises(DatasetError, match=r"already exists \(generated with other arguments"):
        generate_synthetic_coco(tmp_path / "again", task="instance", exist_ok=True, **OPTIONS)
    other = generate_synthetic_coco(tmp_path / "other", task="panoptic", **{**OPTIONS, "seed": 5, "num_train": 2,
                                                                             "num_val": 1})
    assert tree(other)["train2017/000000000001.jpg"] != tree(again)["train2017/000000000001.jpg"]


@pytest.mark.parametrize(("options", "message"), [
    ({"task": "semantic"}, "unknown synthetic COCO task 'semantic'"),
    ({"thing_ids": [1, 187]}, "thing_ids must be distinct COCO thing category ids"),
    ({"stuff_ids": []}, "stuff_ids must be distinct COCO stuff category ids"),
    ({"min_side": 16}, "need 32 <= min_side"),
    ({"image_size": (20, 64)}, "image_size must be"),
    ({"num_val": 0}, "num_val must be >= 1"),
    ({"crowd_prob": 2}, "crowd_prob must be in"),
])
def test_bad_arguments_are_one_line_errors(tmp_path: Path, options: dict, message: str):
    with pytest.raises(DatasetError, match=message) as error:
        generate_synthetic_coco(tmp_path / "bad", **options)
    assert "\n" not in str(error.value)


def test_cli_writes_both_coco_formats(tmp_path: Path):
    from test_cli import assert_one_line_error, knetlab

    for fmt in ("coco-panoptic", "coco-instance"):
        out = tmp_path / fmt
        result = knetlab("data", "synth", "--format", fmt, "--out", str(out), "--train", "3", "--val", "2",
                         "--seed", "1", "--image-size", "48", "64")
        assert result.returncode == 0, result.stderr
        assert str(out / "coco") in result.stdout
        check = check_coco_panoptic_split if fmt == "coco-panoptic" else check_coco_instance_split
        assert [len(check(out, split)) for split in ("train", "val")] == [3, 2]
        with Image.open(next((out / "coco" / "val2017").glob("*.jpg"))) as image:
            assert image.size == (64, 48)
    assert_one_line_error(knetlab("data", "synth", "--format", "coco-instance", "--out", str(tmp_path / "x"),
                                  "--classes", "3"), 2, "--classes applies to --format ade20k or custom only")
    assert_one_line_error(knetlab("data", "synth", "--format", "coco", "--out", str(tmp_path / "y")), 2, "--format")
