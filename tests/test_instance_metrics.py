"""InstanceEvaluator against pycocotools run directly (results JSON written here, COCOeval called with mmdet 2.28's
settings), with crowd ground truth, an image with no prediction, small/medium/large objects, more than 100
predictions in an image, bad inputs, and a 2-process gloo gather."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from gloo import run_in_gloo_group
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from knetlab.evaluation.instance import METRIC_NAMES, InstanceEvaluator

CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 3, "name": "car"},
    {"id": 18, "name": "dog"},
    {"id": 9, "name": "boat"},
]
H, W = 120, 160


def box_mask(y0: int, x0: int, h: int, w: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[y0 : y0 + h, x0 : x0 + w] = True
    return m


def make_dataset(seed: int, n_images: int = 6) -> tuple[dict, dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Ground truth (polygons for single objects, uncompressed RLE for crowds, sizes from 4x4 to 110x140) and
    predictions: jittered copies of the objects with random scores, some relabelled, plus false positives."""
    rng = np.random.default_rng(seed)
    images, anns, preds = [], [], {}
    for image_id in range(1, n_images + 1):
        images.append({"id": 100 + image_id, "width": W, "height": H, "file_name": f"{image_id}.jpg"})
        masks, cats, scores = [], [], []
        for _ in range(rng.integers(2, 7)):
            side = int(rng.choice([4, 12, 40, 70, 110]))
            h, w = side, min(W, int(side * rng.uniform(0.6, 1.3)))
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            cat = int(rng.choice([1, 3, 18]))
            gt = box_mask(y0, x0, h, w)
            ann = {"id": len(anns) + 1, "image_id": 100 + image_id, "category_id": cat, "bbox": [x0, y0, w, h]}
            if rng.random() < 0.2:
                ann.update(iscrowd=1, segmentation={"size": [H, W], "counts": _runs(gt)}, area=float(gt.sum()))
            else:
                ann.update(iscrowd=0, area=float(h * w))
                ann["segmentation"] = [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]
            anns.append(ann)
            if rng.random() < 0.85:
                dy, dx = rng.integers(-side // 3 - 1, side // 3 + 2, size=2)
                masks.append(box_mask(max(0, y0 + dy), max(0, x0 + dx), h, w))
                cats.append(cat if rng.random() < 0.8 else int(rng.choice([1, 3, 9])))
                scores.append(float(rng.uniform(0.05, 1.0)))
        for _ in range(rng.integers(0, 4)):
            masks.append(box_mask(int(rng.integers(0, H - 20)), int(rng.integers(0, W - 20)), 20, 20))
            cats.append(int(rng.choice([1, 3, 9])))
            scores.append(float(rng.uniform(0.05, 0.6)))
        if image_id == 2:  # an image with no prediction at all
            masks, cats, scores = [], [], []
        stacked = np.stack(masks) if masks else np.zeros((0, H, W), bool)
        preds[100 + image_id] = (stacked, np.array(cats, np.int64), np.array(scores, np.float32))
    return {"images": images, "annotations": anns, "categories": CATEGORIES}, preds


def _runs(mask: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE (column-major run lengths, starting with a run of 0s), as COCO's crowd annotations."""
    flat = mask.T.reshape(-1).astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    return runs if flat[0] == 0 else [0, *runs]


def pycocotools_directly(tmp_path: Path, gt: dict, preds: dict, image_ids: list[int], max_dets=(100, 300, 1000)):
    """mmdet 2.28's route: per-image, per-class results with each mask encoded alone, dumped to JSON, loaded by
    loadRes without boxes, COCOeval(segm) with catIds = all categories, imgIds = the images, maxDets 100/300/1000."""
    gt_path, res_path = tmp_path / "gt.json", tmp_path / "segm.json"
    gt_path.write_text(json.dumps(gt))
    rank = {c["id"]: k for k, c in enumerate(CATEGORIES)}
    results = []
    for image_id in image_ids:
        masks, cats, scores = preds[image_id]
        for k in sorted(range(len(cats)), key=lambda k: rank[int(cats[k])]):
            rle = mask_util.encode(np.array(masks[k][:, :, None], order="F", dtype="uint8"))[0]
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": int(cats[k]), "score": float(scores[k]),
                            "segmentation": rle})  # fmt: skip
    res_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(str(res_path)), "segm")
        coco_eval.params.catIds = [c["id"] for c in CATEGORIES]
        coco_eval.params.imgIds = image_ids
        coco_eval.params.maxDets = list(max_dets)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return dict(zip(METRIC_NAMES, (100 * coco_eval.stats[:6]).tolist()))


def evaluate(gt: dict, preds: dict, image_ids: list[int]) -> InstanceEvaluator:
    evaluator = InstanceEvaluator(gt)
    for image_id in image_ids:
        masks, cats, scores = preds[image_id]
        evaluator.update(image_id, torch.from_numpy(masks), torch.from_numpy(cats), torch.from_numpy(scores))
    return evaluator


def test_equals_pycocotools_on_the_images_seen(tmp_path):
    gt, preds = make_dataset(0)
    assert any(a["iscrowd"] for a in gt["annotations"])
    seen = [106, 101, 102, 104]  # updated out of order; 103 and 105 never seen; 102 has no prediction
    ours = evaluate(gt, preds, seen).compute()
    expected = pycocotools_directly(tmp_path, gt, preds, [101, 102, 104, 106])
    assert ours == expected
    assert all(0 < ours[k] < 100 for k in METRIC_NAMES)  # every size range has objects and partial hits
    everything = list(preds)
    assert evaluate(gt, preds, everything).compute() == pycocotools_directly(tmp_path, gt, preds, everything)


def test_reads_an_annotations_file_and_scores_no_prediction_as_zero(tmp_path):
    gt, preds = make_dataset(1, n_images=3)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    evaluator = InstanceEvaluator(path)
    assert all(math.isnan(v) for v in evaluator.compute().values())  # nothing seen
    for image_id in preds:
        evaluator.update(image_id, np.zeros((0, H, W), bool), np.zeros(0, np.int64), np.zeros(0, np.float32))
    assert evaluator.compute()["segm_mAP"] == 0.0
    evaluator.reset()
    for image_id, (masks, cats, scores) in preds.items():
        evaluator.update(image_id, masks, cats, scores)
    assert evaluator.compute() == pycocotools_directly(tmp_path, gt, preds, list(preds))


def test_ap_uses_100_detections_and_the_rest_1000_as_mmdet():
    # 150 confident misses above one true hit: AP@100 dets misses it, AP50@1000 (mmdet's maxDets[2]) finds it.
    gt = {"images": [{"id": 1, "height": H, "width": W}], "categories": CATEGORIES[:1]}
    square = {"segmentation": [[0, 0, 40, 0, 40, 40, 0, 40]], "area": 1600.0, "bbox": [0, 0, 40, 40]}
    gt["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0, **square}]
    masks = np.stack([box_mask(60 + k % 50, 100, 5, 5) for k in range(150)] + [box_mask(0, 0, 40, 40)])
    scores = np.concatenate([np.linspace(0.9, 0.5, 150), [0.1]]).astype(np.float32)
    evaluator = InstanceEvaluator(gt)
    evaluator.update(1, masks, np.ones(151, np.int64), scores)
    result = evaluator.compute()
    assert result["segm_mAP"] == 0.0
    assert result["segm_mAP_50"] > 0 and result["segm_mAP_m"] > 0
    assert math.isnan(result["segm_mAP_s"]) and math.isnan(result["segm_mAP_l"])  # no gt of that size: COCOeval's -1


def test_bad_inputs_give_one_line_errors():
    gt, preds = make_dataset(2, n_images=2)
    evaluator = InstanceEvaluator(gt)
    masks, cats, scores = preds[101]
    cases = [
        (lambda: evaluator.update(7, masks, cats, scores), "image_id 7 is not in the annotations' images"),
        (lambda: evaluator.update(101, masks[:, :-1], cats, scores), r"is 120x160 \(HxW\); got masks"),
        (lambda: evaluator.update(101, masks, cats[:-1], scores), "category_ids, .* scores"),
        (lambda: evaluator.update(101, masks, cats + 100, scores), r"category_ids \[\d+.*not in the annotations"),
        (lambda: InstanceEvaluator("/nonexistent/instances.json"), "/nonexistent/instances.json does not exist"),
        (lambda: InstanceEvaluator({"images": []}), "has no 'annotations' list"),
    ]
    for call, pattern in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=pattern) as info:
            call()
        assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="must be bool"):
        evaluator.update(101, masks.astype(np.float32), cats, scores)
    evaluator.update(101, masks, cats, scores)
    with pytest.raises(ValueError, match="image_id 101 was already updated"):
        evaluator.update(101, masks, cats, scores)


def _gather_worker(rank: int, out_dir: str) -> None:
    gt, preds = make_dataset(0)
    # Like a padded DistributedSampler: 101 is seen by both ranks.
    evaluator = evaluate(gt, preds, [101, 103, 105] if rank == 0 else [102, 104, 106, 101])
    evaluator.all_reduce()
    evaluator.all_reduce()  # gathering again must not duplicate
    idle = InstanceEvaluator(gt) if rank == 1 else evaluate(gt, preds, [104])
    idle.all_reduce()
    out = {"result": evaluator.compute(), "n": evaluator.num_images, "idle": idle.compute()}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_all_reduce_gathers_across_two_gloo_processes(tmp_path):
    run_in_gloo_group(_gather_worker, tmp_path)
    gt, preds = make_dataset(0)
    expected = pycocotools_directly(tmp_path, gt, preds, list(preds))
    only_104 = pycocotools_directly(tmp_path, gt, preds, [104])
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["n"] == 6
        assert out["result"] == pytest.approx(expected, rel=0, abs=0, nan_ok=True)
        assert out["idle"] == pytest.approx(only_104, rel=0, abs=0, nan_ok=True)
