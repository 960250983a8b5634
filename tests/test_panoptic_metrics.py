"""PanopticEvaluator and pq_from_files against COCO's panopticapi (the oracle, run on the same PNG+JSON files), a
hand-computed case, quirk Q1 (segment id 0 = VOID), bad inputs, and a 2-process gloo all_reduce."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo import run_in_gloo_group
from PIL import Image

from knetlab.evaluation.panoptic import PanopticEvaluator, pq_from_files

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 3, "name": "car", "isthing": 1},
    {"id": 18, "name": "dog", "isthing": 1},  # ground truth only
    {"id": 9, "name": "boat", "isthing": 1},  # never seen
    {"id": 184, "name": "tree", "isthing": 0},
    {"id": 187, "name": "sky", "isthing": 0},
    {"id": 193, "name": "grass", "isthing": 0},  # predictions only
]
KEYS = ("PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st")


def id2rgb(ids: np.ndarray) -> np.ndarray:
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def write_split(root: Path, name: str, images: list[tuple[np.ndarray, list[dict]]]) -> tuple[str, str]:
    """COCO panoptic layout: NAME.json + NAME/<file>.png; returns (json path, folder)."""
    folder = root / name
    folder.mkdir(parents=True)
    annotations = []
    for image_id, (ids, segments) in enumerate(images, start=1):
        file_name = f"{image_id:012d}.png"
        Image.fromarray(id2rgb(ids)).save(folder / file_name)
        annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": segments})
    json_path = root / f"{name}.json"
    json_path.write_text(json.dumps({"annotations": annotations, "categories": CATEGORIES}))
    return str(json_path), str(folder)


def segments_of(ids: np.ndarray, category: dict[int, int], crowd: set[int] = frozenset()) -> list[dict]:
    present, counts = np.unique(ids, return_counts=True)
    return [
        {
            "id": int(i),
            "category_id": category[int(i)],
            "iscrowd": int(int(i) in crowd),
            "area": int(c),
            "bbox": [0] * 4,
        }
        for i, c in zip(present, counts)
        if i != 0
    ]


def random_image(rng: np.random.Generator) -> tuple[tuple[np.ndarray, list[dict]], tuple[np.ndarray, list[dict]]]:
    """Rectangles painted over VOID; the prediction re-paints them jittered (IoUs around the 0.5 threshold), drops or
    relabels some (dog always becomes car), and adds some of its own (grass only there). Ids are random 24-bit."""
    h, w = 24, 32
    gt, pred = np.zeros((h, w), np.int64), np.zeros((h, w), np.int64)
    gt_cat, pred_cat, crowd = {}, {}, set()
    for _ in range(rng.integers(3, 9)):
        y0, x0 = rng.integers(0, h - 3), rng.integers(0, w - 3)
        y1, x1 = rng.integers(y0 + 2, h + 1), rng.integers(x0 + 2, w + 1)
        gid = int(rng.integers(1, 2**24))
        cat = int(rng.choice([1, 1, 3, 18, 184, 187]))
        gt[y0:y1, x0:x1] = gid
        gt_cat[gid] = cat
        if cat in (1, 3, 18) and rng.random() < 0.3:
            crowd.add(gid)
        if rng.random() < 0.15:
            continue
        dy, dx = rng.integers(-3, 4, size=2)
        pid = int(rng.integers(1, 2**24))
        pred[max(0, y0 + dy) : max(0, y1 + dy), max(0, x0 + dx) : max(0, x1 + dx)] = pid
        pred_cat[pid] = 3 if cat == 18 else (cat if rng.random() < 0.85 else int(rng.choice([1, 3, 184, 187])))
    for _ in range(rng.integers(0, 3)):
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        pid = int(rng.integers(1, 2**24))
        pred[y0 : y0 + rng.integers(2, 8), x0 : x0 + rng.integers(2, 10)] = pid
        pred_cat[pid] = int(rng.choice([1, 193, 187]))
    return (gt, segments_of(gt, gt_cat, crowd)), (pred, segments_of(pred, pred_cat))


def random_split(seed: int, n: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    pairs = [random_image(rng) for _ in range(n)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def oracle(tmp_path: Path, gts: list, preds: list, monkeypatch) -> dict:
    """panopticapi.evaluation.pq_compute on the files, on one worker process so its float sums run in image order."""
    evaluation = pytest.importorskip("panopticapi.evaluation")
    monkeypatch.setattr(evaluation.multiprocessing, "cpu_count", lambda: 1)
    gt_json, gt_folder = write_split(tmp_path, "gt", gts)
    pred_json, pred_folder = write_split(tmp_path, "pred", preds)
    return evaluation.pq_compute(gt_json, pred_json, gt_folder, pred_folder)


def as_percent(ref: dict) -> dict:
    out = {}
    for suffix, group in (("", "All"), ("_th", "Things"), ("_st", "Stuff")):
        for key in ("pq", "sq", "rq"):
            out[key.upper() + suffix] = 100 * ref[group][key]
    return out


def assert_equals_oracle(result: dict, ref: dict, exact: bool = True) -> None:
    expected = as_percent(ref)
    for key in KEYS:
        if exact:
            assert result[key] == expected[key], key
        else:
            assert result[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    for cat in CATEGORIES:
        ref_cls = ref["per_class"][cat["id"]]
        ours = result["per_class"][cat["name"]]
        if math.isnan(ours["PQ"]):  # panopticapi writes 0 for a category with TP+FP+FN = 0 (we write NaN)
            assert ref_cls == {"pq": 0.0, "sq": 0.0, "rq": 0.0}
            continue
        for key in ("pq", "sq", "rq"):
            assert ours[key.upper()] == pytest.approx(100 * ref_cls[key], rel=1e-12, abs=1e-12), (cat["name"], key)


def evaluate_arrays(gts: list, preds: list, as_tensor: bool = False) -> PanopticEvaluator:
    evaluator = PanopticEvaluator(CATEGORIES)
    for (g, gs), (p, ps) in zip(gts, preds):
        if as_tensor:
            g, p = torch.from_numpy(g), torch.from_numpy(p).int()
        evaluator.update(p, [{"id": s["id"], "category_id": s["category_id"]} for s in ps], g, gs)
    return evaluator


def test_random_split_equals_panopticapi(tmp_path, monkeypatch):
    gts, preds = random_split(0, 12)
    ref = oracle(tmp_path, gts, preds, monkeypatch)
    stats = evaluate_arrays(gts, preds).statistics
    assert stats["tp"].sum() > 5 and stats["fp"].sum() > 5 and stats["fn"].sum() > 5  # the case exercises all three
    assert_equals_oracle(evaluate_arrays(gts, preds, as_tensor=True).compute(), ref)
    assert_equals_oracle(
        pq_from_files(
            str(tmp_path / "gt.json"), str(tmp_path / "gt"), str(tmp_path / "pred.json"), str(tmp_path / "pred")
        ),
        ref,
    )


def hand_case() -> tuple[list, list]:
    """One 1x24 strip. gt: person A 0-3, VOID 4-7, crowd car 8-11, sky 12-15, person B 16-19, person C 20-22, VOID 23.
    pred: person 0-5 (on A and 2 VOID pixels: IoU 4/(6+4-4-2) = 1), car 6-7 (all VOID: ignored), car 8-10 (on the
    car crowd: ignored), person 11 (on the car crowd, another category: FP), sky 12-13 (IoU 2/4 = 0.5, not > 0.5: FN
    and FP), VOID 14-15, person 16-21 (B: IoU 4/6, TP; C: FN), grass 22-23 (exactly half VOID, not more: FP)."""
    gt = np.array([[11] * 4 + [0] * 4 + [21] * 4 + [31] * 4 + [12] * 4 + [13] * 3 + [0]])
    pred = np.array([[1] * 6 + [2] * 2 + [3] * 3 + [4] + [5] * 2 + [0] * 2 + [6] * 6 + [7] * 2])
    gt_segs = segments_of(gt, {11: 1, 12: 1, 13: 1, 21: 3, 31: 187}, crowd={21})
    pred_segs = segments_of(pred, {1: 1, 2: 3, 3: 3, 4: 1, 5: 187, 6: 1, 7: 193})
    return [(gt, gt_segs)], [(pred, pred_segs)]


def test_hand_computed_crowd_void_and_thresholds(tmp_path, monkeypatch):
    gts, preds = hand_case()
    evaluator = evaluate_arrays(gts, preds)
    stats = {k: dict(zip([c["name"] for c in CATEGORIES], v.tolist())) for k, v in evaluator.statistics.items()}
    assert stats["tp"] == {"person": 2, "car": 0, "dog": 0, "boat": 0, "tree": 0, "sky": 0, "grass": 0}
    assert stats["fp"] == {"person": 1, "car": 0, "dog": 0, "boat": 0, "tree": 0, "sky": 1, "grass": 1}
    assert stats["fn"] == {"person": 1, "car": 0, "dog": 0, "boat": 0, "tree": 0, "sky": 1, "grass": 0}
    assert stats["iou"]["person"] == pytest.approx(1 + 2 / 3)
    result = evaluator.compute()
    # person: PQ = (5/3) / (2 + 0.5 + 0.5) = 5/9, SQ = 5/6, RQ = 2/3; sky and grass 0; car, dog, boat not counted.
    expected = {"PQ": 500 / 27, "SQ": 500 / 18, "RQ": 200 / 9, "PQ_th": 500 / 9, "SQ_th": 500 / 6, "RQ_th": 200 / 3}
    expected.update({"PQ_st": 0.0, "SQ_st": 0.0, "RQ_st": 0.0})
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key
    assert math.isnan(result["per_class"]["car"]["PQ"]) and math.isnan(result["per_class"]["boat"]["SQ"])
    assert_equals_oracle(result, oracle(tmp_path, gts, preds, monkeypatch))


def test_last_crowd_segment_of_a_category_is_the_one_that_excuses(tmp_path, monkeypatch):
    # Two car crowds; a car prediction lying on the FIRST one is still a false positive (panopticapi keeps the last).
    # (The sky segment only gives panopticapi a stuff category to average: it divides by zero without one.)
    gt = np.array([[5] * 4 + [6] * 4 + [7] * 4 + [8] * 2])
    pred_first = np.array([[1] * 4 + [0] * 10])
    pred_last = np.array([[0] * 4 + [1] * 4 + [0] * 6])
    gt_segs = segments_of(gt, {5: 3, 6: 3, 7: 1, 8: 187}, crowd={5, 6})
    for pred, fp in ((pred_first, 1), (pred_last, 0)):
        evaluator = evaluate_arrays([(gt, gt_segs)], [(pred, segments_of(pred, {1: 3}))])
        assert evaluator.statistics["fp"][1] == fp
    gts = [(gt, gt_segs), (gt, gt_segs)]
    preds = [(pred_first, segments_of(pred_first, {1: 3})), (pred_last, segments_of(pred_last, {1: 3}))]
    assert_equals_oracle(evaluate_arrays(gts, preds).compute(), oracle(tmp_path, gts, preds, monkeypatch))


def test_q1_segment_id_zero_swallows_void(tmp_path, monkeypatch):
    """The reference numbers segments from 0, so its best segment shares id 0 with VOID; when that segment is a person
    the VOID pixels count as person. gt: person 0-3, VOID 4-5, wall(tree) 6-9. Prediction: person 0-3, VOID 4-6, tree
    7-9. Ids from 1: person IoU 1, tree 3/4 -> PQ 87.5. Ids from 0: the person segment is 0-6 (7 pixels), IoU
    4 / (7 + 4 - 4 - 2 on gt VOID) = 0.8 -> PQ 77.5."""
    gt = np.array([[1] * 4 + [0] * 2 + [2] * 4])
    gt_segs = segments_of(gt, {1: 1, 2: 184})
    one_start = np.array([[1] * 4 + [0] * 3 + [2] * 3])
    zero_start = np.array([[0] * 7 + [1] * 3])
    one_segs = [{"id": 1, "category_id": 1}, {"id": 2, "category_id": 184}]
    zero_segs = [{"id": 0, "category_id": 1}, {"id": 1, "category_id": 184}]
    assert evaluate_arrays([(gt, gt_segs)], [(one_start, one_segs)]).compute()["PQ"] == pytest.approx(87.5)
    zero = evaluate_arrays([(gt, gt_segs)], [(zero_start, zero_segs)])
    assert zero.statistics["iou"][0] == pytest.approx(0.8)
    assert zero.compute()["PQ"] == pytest.approx(77.5)
    # panopticapi reads a listed id 0 the same way
    assert_equals_oracle(zero.compute(), oracle(tmp_path, [(gt, gt_segs)], [(zero_start, zero_segs)], monkeypatch))


def test_bad_inputs_give_one_line_errors_naming_the_file(tmp_path):
    gts, preds = random_split(1, 2)
    gt_json, gt_folder = write_split(tmp_path, "gt", gts)
    pred_json, pred_folder = write_split(tmp_path, "pred", preds)
    png = os.path.join(pred_folder, "000000000002.png")

    def run() -> dict:
        return pq_from_files(gt_json, gt_folder, pred_json, pred_folder)

    def rewrite_pred(edit) -> None:
        data = json.loads(Path(pred_json).read_text())
        edit(data)
        Path(pred_json).write_text(json.dumps(data))

    original_json = Path(pred_json).read_text()
    os.rename(png, png + ".bak")
    with pytest.raises(FileNotFoundError, match=r"missing panoptic PNG .*000000000002\.png"):
        run()
    os.rename(png + ".bak", png)
    rewrite_pred(lambda d: d["annotations"][1]["segments_info"].pop())
    with pytest.raises(ValueError, match=r"image_id 2 \(.*000000000002\.png.*pred_pan holds segment ids"):
        run()
    Path(pred_json).write_text(original_json)
    rewrite_pred(lambda d: d["annotations"][1]["segments_info"][0].update(category_id=77))
    with pytest.raises(ValueError, match=r"000000000002\.png.*category_id 77, not in the category list"):
        run()
    Path(pred_json).write_text(original_json)
    Image.fromarray(id2rgb(preds[1][0][:-1])).save(png)
    with pytest.raises(ValueError, match=r"000000000002\.png is 32x23 \(WxH\) but .*gt/000000000002\.png is 32x24"):
        run()
    rewrite_pred(lambda d: d["annotations"].pop())
    with pytest.raises(ValueError, match=r"pred\.json has no annotation for image_id 2"):
        run()
    for error in (lambda: run(), lambda: PanopticEvaluator([{"id": 1, "name": "a"}])):
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            error()
        assert "\n" not in str(info.value)
    evaluator = PanopticEvaluator(CATEGORIES)
    with pytest.raises(ValueError, match="pred_segments lists ids \\[9\\] that cover no pixel"):
        evaluator.update(np.ones((2, 2)).astype(int), [{"id": 1, "category_id": 1}, {"id": 9, "category_id": 1}],
                         np.zeros((2, 2), int), [])  # fmt: skip
    with pytest.raises(ValueError, match=r"shape \(2, 2\) and gt_pan shape \(3, 2\)"):
        evaluator.update(np.zeros((2, 2), int), [], np.zeros((3, 2), int), [])
    with pytest.raises(TypeError, match="integer segment ids"):
        evaluator.update(np.zeros((2, 2)), [], np.zeros((2, 2), int), [])


def test_nothing_seen_gives_nan_and_reset_clears():
    evaluator = PanopticEvaluator(CATEGORIES)
    assert all(math.isnan(evaluator.compute()[k]) for k in KEYS)
    gts, preds = hand_case()
    evaluator = evaluate_arrays(gts, preds)
    evaluator.all_reduce()  # no process group: a no-op
    assert evaluator.compute()["PQ_th"] == pytest.approx(500 / 9)
    evaluator.reset()
    assert math.isnan(evaluator.compute()["PQ"])


def _all_reduce_worker(rank: int, out_dir: str) -> None:
    gts, preds = random_split(0, 12)
    evaluator = evaluate_arrays(gts[rank::2], preds[rank::2])
    evaluator.all_reduce()
    evaluator.all_reduce()  # reducing again must not double-count
    idle = PanopticEvaluator(CATEGORIES) if rank == 1 else evaluate_arrays(gts, preds)
    idle.all_reduce()  # a worker that saw nothing still joins and gets the others' sums
    out = {"result": evaluator.compute(), "idle": idle.compute()}
    out.update({k: v.tolist() for k, v in evaluator.statistics.items()})
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))


def test_all_reduce_sums_across_two_gloo_processes(tmp_path, monkeypatch):
    run_in_gloo_group(_all_reduce_worker, tmp_path)
    gts, preds = random_split(0, 12)
    single = evaluate_arrays(gts, preds)
    ref = oracle(tmp_path / "oracle", gts, preds, monkeypatch)
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("tp", "fp", "fn"):
            assert out[key] == single.statistics[key].tolist()
        assert out["iou"] == pytest.approx(single.statistics["iou"].tolist(), rel=1e-12)
        for result in (out["result"], out["idle"]):
            assert_equals_oracle(result, ref, exact=False)
