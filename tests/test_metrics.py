"""SegEvaluator against an independent NumPy brute force, a hand-computed example, batch accumulation and a real
2-process gloo all_reduce."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
from gloo import run_in_gloo_group

from knetlab.evaluation import SegEvaluator, format_table

IGNORE = 255


def brute_force(preds: np.ndarray, labels: np.ndarray, num_classes: int, ignore: int = IGNORE) -> dict:
    """Per-class pixel counting with boolean masks, written from the mmseg definitions, not from the evaluator."""
    valid = labels != ignore
    inter = np.zeros(num_classes)
    area_pred = np.zeros(num_classes)
    area_label = np.zeros(num_classes)
    for c in range(num_classes):
        p = (preds == c) & valid
        g = (labels == c) & valid
        inter[c] = np.sum(p & g)
        area_pred[c] = np.sum(p)
        area_label[c] = np.sum(g)
    union = area_pred + area_label - inter
    iou = [inter[c] / union[c] if union[c] > 0 else math.nan for c in range(num_classes)]
    acc = [inter[c] / area_label[c] if area_label[c] > 0 else math.nan for c in range(num_classes)]
    return {
        "aAcc": 100.0 * np.sum(preds[valid] == labels[valid]) / np.sum(valid),
        "mIoU": 100.0 * np.nanmean(iou),
        "mAcc": 100.0 * np.nanmean(acc),
        "IoU": [100.0 * v for v in iou],
        "Acc": [100.0 * v for v in acc],
    }


def assert_same(result: dict, expected: dict) -> None:
    for key in ("aAcc", "mIoU", "mAcc"):
        assert result[key] == pytest.approx(expected[key], abs=1e-9), key
    for key in ("IoU", "Acc"):
        np.testing.assert_allclose(np.array(result[key]), np.array(expected[key]), atol=1e-9, equal_nan=True)


def random_maps(seed: int, batch: int = 3, h: int = 17, w: int = 23, num_classes: int = 7):
    """Labels with ~20% ignore; class 3 absent everywhere, class 5 only predicted, class 6 only in the labels."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([0, 1, 2, 4, 6], size=(batch, h, w))
    preds = rng.choice([0, 1, 2, 4, 5], size=(batch, h, w))
    agree = rng.random((batch, h, w)) < 0.5
    preds[agree & (labels != 6)] = labels[agree & (labels != 6)]
    labels[rng.random((batch, h, w)) < 0.2] = IGNORE
    return preds, labels


def test_matches_numpy_brute_force_with_ignore_and_absent_classes():
    preds, labels = random_maps(0)
    evaluator = SegEvaluator(7)
    evaluator.update(torch.from_numpy(preds), torch.from_numpy(labels))
    result = evaluator.compute()
    expected = brute_force(preds, labels, 7)
    assert_same(result, expected)
    # The cases the definitions single out:
    assert math.isnan(result["IoU"][3]) and math.isnan(result["Acc"][3])  # neither gt nor pred
    assert result["IoU"][5] == 0.0 and math.isnan(result["Acc"][5])  # predicted only: counts in mIoU, not mAcc
    assert result["IoU"][6] == 0.0 and result["Acc"][6] == 0.0  # gt only, never predicted


def test_hand_computed_example():
    # Column 3 is ignored (its predictions 2 and 1 must not count).
    label = torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 255]]])
    pred = torch.tensor([[[0, 1, 1, 2], [1, 2, 0, 1]]])
    evaluator = SegEvaluator(4)
    evaluator.update(pred, label)
    # gt0: predicted 0,1,0 ; gt1: predicted 1,1,2 -> rows of the confusion matrix
    assert evaluator.confusion_matrix.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    r = evaluator.compute()
    # class 0: I=2, P=2, L=3 -> IoU 2/3, Acc 2/3; class 1: I=2, P=3, L=3 -> IoU 2/4, Acc 2/3
    # class 2: I=0, P=1, L=0 -> IoU 0, Acc nan; class 3: nothing -> nan, nan
    assert r["IoU"][0] == pytest.approx(66.66666666666667)
    assert r["IoU"][1] == pytest.approx(50.0)
    assert r["IoU"][2] == 0.0
    assert math.isnan(r["IoU"][3])
    assert r["Acc"][:2] == pytest.approx([66.66666666666667, 66.66666666666667])
    assert math.isnan(r["Acc"][2]) and math.isnan(r["Acc"][3])
    assert r["aAcc"] == pytest.approx(400.0 / 6.0)  # 4 correct of 6 labelled pixels
    assert r["mIoU"] == pytest.approx(100.0 * (2 / 3 + 1 / 2 + 0) / 3)  # 38.888...
    assert r["mAcc"] == pytest.approx(100.0 * 2 / 3)


def test_accumulating_batches_equals_one_big_batch():
    preds, labels = random_maps(1, batch=6)
    whole = SegEvaluator(7)
    whole.update(torch.from_numpy(preds), torch.from_numpy(labels))
    parts = SegEvaluator(7)
    for lo, hi in ((0, 1), (1, 4), (4, 6)):
        parts.update(torch.from_numpy(preds[lo:hi]), torch.from_numpy(labels[lo:hi]))
    # a single (H, W) map is accepted too
    single = SegEvaluator(7)
    for i in range(6):
        single.update(torch.from_numpy(preds[i]), torch.from_numpy(labels[i]))
    assert torch.equal(whole.confusion_matrix, parts.confusion_matrix)
    assert torch.equal(whole.confusion_matrix, single.confusion_matrix)
    assert whole.confusion_matrix.dtype == torch.int64
    assert_same(parts.compute(), brute_force(preds, labels, 7))
    parts.reset()
    assert int(parts.confusion_matrix.sum()) == 0


def test_areas_are_summed_over_the_split_not_averaged_per_image():
    # Image A: class 0 perfect on 1 pixel (I=1, U=1); image B: class 0 has I=1, P=2, L=3, U=4. Split-level IoU is
    # (1 + 1) / (1 + 4) = 2/5, whereas averaging per image would give (1 + 1/4) / 2 = 5/8.
    evaluator = SegEvaluator(2)
    evaluator.update(torch.tensor([[0]]), torch.tensor([[0]]))
    evaluator.update(torch.tensor([[0, 0, 1, 1]]), torch.tensor([[0, 1, 0, 0]]))
    r = evaluator.compute()
    assert r["IoU"][0] == pytest.approx(100.0 * 2 / 5)


def test_all_pixels_ignored_gives_nan_summary():
    evaluator = SegEvaluator(3)
    evaluator.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    r = evaluator.compute()
    assert math.isnan(r["aAcc"]) and math.isnan(r["mIoU"]) and math.isnan(r["mAcc"])


def test_bad_inputs_give_clear_errors():
    evaluator = SegEvaluator(4)
    with pytest.raises(ValueError, match=r"pred shape \(1, 2, 2\) != label shape \(1, 2, 3\)"):
        evaluator.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        evaluator.update(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"label values must be in \[0, 3\] or the ignore index 255; found .*7"):
        evaluator.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[1, 7]]]))
    with pytest.raises(ValueError, match=r"pred values must be in \[0, 3\]"):
        evaluator.update(torch.tensor([[[-1, 0]]]), torch.tensor([[[1, 1]]]))
    with pytest.raises(ValueError, match="ignore_index=2 is a valid class id"):
        SegEvaluator(4, ignore_index=2)
    with pytest.raises(ValueError, match="3 class_names given for num_classes=4"):
        SegEvaluator(4, class_names=["a", "b", "c"])
    # nothing was accumulated by the failed updates
    assert int(evaluator.confusion_matrix.sum()) == 0


def test_all_reduce_without_process_group_is_a_no_op():
    assert not dist.is_initialized()
    preds, labels = random_maps(2)
    evaluator = SegEvaluator(7)
    evaluator.update(torch.from_numpy(preds), torch.from_numpy(labels))
    before = evaluator.confusion_matrix.clone()
    evaluator.all_reduce()
    assert torch.equal(evaluator.confusion_matrix, before)


def test_format_table_lists_every_class_and_the_summary():
    evaluator = SegEvaluator(4, class_names=["wall", "building", "sky", "floor"])
    evaluator.update(torch.tensor([[[0, 1, 1, 2], [1, 2, 0, 1]]]), torch.tensor([[[0, 0, 1, 255], [1, 1, 0, 255]]]))
    text = format_table(evaluator.compute(), evaluator.class_names)
    lines = text.splitlines()
    assert lines[0].split() == ["Class", "|", "IoU", "|", "Acc"]
    assert lines[2].split() == ["wall", "|", "66.67", "|", "66.67"]
    assert lines[5].split() == ["floor", "|", "nan", "|", "nan"]
    assert lines[-1].split() == ["66.67", "|", "38.89", "|", "66.67"]


def _all_reduce_worker(rank: int, out_dir: str) -> None:
    preds, labels = random_maps(10 + rank, batch=2 + rank)
    evaluator = SegEvaluator(7)
    evaluator.update(torch.from_numpy(preds), torch.from_numpy(labels))
    evaluator.all_reduce()
    evaluator.all_reduce()  # reducing again must not double-count
    # A worker that saw no image still joins the collective and gets the others' counts.
    sparse = SegEvaluator(7)
    if rank == 0:
        sparse.update(torch.from_numpy(preds), torch.from_numpy(labels))
    sparse.all_reduce()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "cm": evaluator.confusion_matrix.tolist(),
                "result": evaluator.compute(),
                "sparse_cm": sparse.confusion_matrix.tolist(),
            },
            f,
        )


def test_all_reduce_sums_across_two_gloo_processes(tmp_path):
    run_in_gloo_group(_all_reduce_worker, tmp_path)
    outputs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    p0, l0 = random_maps(10, batch=2)
    p1, l1 = random_maps(11, batch=3)
    expected_cm = np.zeros((7, 7), dtype=np.int64)
    for p, lab in ((p0, l0), (p1, l1)):
        valid = lab != IGNORE
        np.add.at(expected_cm, (lab[valid], p[valid]), 1)
    expected = brute_force(np.concatenate([p0, p1]), np.concatenate([l0, l1]), 7)
    for out in outputs:
        assert out["cm"] == expected_cm.tolist()
        result = {k: (v if not isinstance(v, list) else [math.nan if x is None else x for x in v])
                  for k, v in out["result"].items()}  # fmt: skip
        assert_same(result, expected)
    # rank 0's counts alone, on both ranks
    only_rank0 = np.zeros((7, 7), dtype=np.int64)
    np.add.at(only_rank0, (l0[l0 != IGNORE], p0[l0 != IGNORE]), 1)
    assert outputs[0]["sparse_cm"] == outputs[1]["sparse_cm"] == only_rank0.tolist()
