"""Panoptic quality (PQ, SQ, RQ) exactly as COCO's panopticapi computes it (`pq_compute_single_core` and
`PQStat.pq_average`), kept as per-category sums so memory does not grow with the split and workers can be summed."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

# panopticapi's constants: segment id 0 is VOID (unlabelled) in both maps; ids are 24-bit (rgb2id of an RGB PNG).
VOID = 0
OFFSET = 256 * 256 * 256

_ROWS = ("iou", "tp", "fp", "fn")


class PanopticEvaluator:
    """Sums panopticapi's per-category statistics (IoU sum, TP, FP, FN) over every `update`.

    Rules, as panopticapi has them: a ground-truth and a predicted segment of the same category match when
    IoU > 0.5, with the union minus the predicted segment's overlap with ground-truth VOID; crowd ground-truth
    segments never match; an unmatched predicted segment is a false positive unless more than half of it lies on
    VOID or on the (last listed) crowd segment of its category in that image. A predicted segment listed with id 0
    is a segment, and then takes every pixel of id 0, VOID included (what the reference's 0-start does, quirk Q1).
    The ground-truth area of a segment is its `"area"` when the segment dict has one (panopticapi reads it from
    the JSON), else its pixel count.
    """

    def __init__(self, categories: Sequence[Mapping]) -> None:
        if not categories:
            raise ValueError("PanopticEvaluator: categories is empty; pass the panoptic JSON's 'categories' list")
        for i, cat in enumerate(categories):
            missing = [k for k in ("id", "name", "isthing") if k not in cat]
            if missing:
                raise ValueError(f"PanopticEvaluator: categories[{i}] lacks {missing}; each needs id, name, isthing")
        ids = [int(c["id"]) for c in categories]
        if len(set(ids)) != len(ids):
            raise ValueError(f"PanopticEvaluator: category ids are not unique: {ids}")
        names = [str(c["name"]) for c in categories]
        if len(set(names)) != len(names):
            raise ValueError(f"PanopticEvaluator: category names are not unique: {names}")
        self.categories = [
            {"id": int(c["id"]), "name": str(c["name"]), "isthing": bool(c["isthing"])} for c in categories
        ]
        self._index = {cid: i for i, cid in enumerate(ids)}
        self._local = np.zeros((len(_ROWS), len(ids)), dtype=np.float64)  # counts are exact in float64 below 2**53
        self._reduced: np.ndarray | None = None

    def reset(self) -> None:
        self._local[:] = 0
        self._reduced = None

    @torch.no_grad()
    def update(
        self,
        pred_pan: torch.Tensor | np.ndarray,
        pred_segments: Sequence[Mapping],
        gt_pan: torch.Tensor | np.ndarray,
        gt_segments: Sequence[Mapping],
    ) -> None:
        """Add one image: segment-id maps of the same (H, W) shape and their segments_info lists
        (`pred_segments`: `{"id", "category_id"}`; `gt_segments`: `{"id", "category_id", "iscrowd"[, "area"]}`)."""
        pred = torch.as_tensor(pred_pan)
        gt = torch.as_tensor(gt_pan)
        if pred.shape != gt.shape or pred.dim() != 2:
            raise ValueError(
                f"PanopticEvaluator.update: pred_pan shape {tuple(pred.shape)} and gt_pan shape {tuple(gt.shape)} "
                "must be the same (H, W); resize the prediction to the ground truth's original size"
            )
        for name, t in (("pred_pan", pred), ("gt_pan", gt)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"PanopticEvaluator.update: {name} must hold integer segment ids, got {t.dtype}")
        if pred.numel() == 0:
            raise ValueError(f"PanopticEvaluator.update: empty maps of shape {tuple(pred.shape)}")
        pred = pred.long()
        gt = gt.to(pred.device).long()
        lo, hi = torch.stack([gt.min(), gt.max(), pred.min(), pred.max()]).view(2, 2).T.tolist()
        if min(lo) < 0 or max(hi) >= OFFSET:
            raise ValueError(
                f"PanopticEvaluator.update: segment ids must be in [0, {OFFSET - 1}]; gt_pan spans [{lo[0]}, {hi[0]}], "
                f"pred_pan spans [{lo[1]}, {hi[1]}]"
            )
        # One sort per image: every (gt id, pred id) pair with its pixel count, ascending as panopticapi's np.unique.
        pairs, counts = torch.unique(gt * OFFSET + pred, sorted=True, return_counts=True)
        pairs, counts = pairs.cpu().numpy(), counts.cpu().numpy()
        self._add_image(pairs // OFFSET, pairs % OFFSET, counts, pred_segments, gt_segments)

    def _add_image(
        self,
        gt_of_pair: np.ndarray,
        pred_of_pair: np.ndarray,
        inter: np.ndarray,
        pred_segments: Sequence[Mapping],
        gt_segments: Sequence[Mapping],
    ) -> None:
        pred_ids, pred_cat = self._segment_table(pred_segments, "pred_segments")
        gt_ids, gt_cat = self._segment_table(gt_segments, "gt_segments")
        gt_crowd = np.array([int(s.get("iscrowd", 0)) == 1 for s in gt_segments], dtype=bool)

        pred_in_map, pred_area = _sum_by(pred_of_pair, inter)
        gt_in_map, gt_pixels = _sum_by(gt_of_pair, inter)
        unlisted = np.setdiff1d(pred_in_map, np.append(pred_ids, VOID))
        if unlisted.size:
            raise ValueError(
                f"PanopticEvaluator.update: pred_pan holds segment ids {unlisted.tolist()[:10]} that pred_segments "
                f"does not list (listed: {pred_ids.tolist()[:10]}); only VOID ({VOID}) may be unlisted"
            )
        absent = np.setdiff1d(pred_ids, pred_in_map)
        if absent.size:
            raise ValueError(
                f"PanopticEvaluator.update: pred_segments lists ids {absent.tolist()[:10]} that cover no pixel of "
                "pred_pan; drop empty segments before evaluating"
            )
        unlisted = np.setdiff1d(gt_in_map, np.append(gt_ids, VOID))
        if unlisted.size:
            raise ValueError(
                f"PanopticEvaluator.update: gt_pan holds segment ids {unlisted.tolist()[:10]} that gt_segments does "
                f"not list (listed: {gt_ids.tolist()[:10]}); only VOID ({VOID}) may be unlisted"
            )

        pred_area = pred_area[np.searchsorted(pred_in_map, pred_ids)]
        gt_pixels_of = dict(zip(gt_in_map.tolist(), gt_pixels.tolist()))
        gt_area = np.array(
            [int(s["area"]) if "area" in s else gt_pixels_of.get(int(s["id"]), 0) for s in gt_segments], dtype=np.int64
        )
        # Overlap of each predicted segment with ground-truth VOID (absent from the union and from the FP test).
        on_void = gt_of_pair == VOID
        pred_void = np.zeros(len(pred_ids), dtype=np.int64)
        gi = _position(gt_ids, gt_of_pair)
        pi = _position(pred_ids, pred_of_pair)
        np.add.at(pred_void, pi[on_void & (pi >= 0)], inter[on_void & (pi >= 0)])

        candidate = (gi >= 0) & (pi >= 0)
        candidate[candidate] &= ~gt_crowd[gi[candidate]] & (gt_cat[gi[candidate]] == pred_cat[pi[candidate]])
        g, p, i = gi[candidate], pi[candidate], inter[candidate]
        iou = i / (pred_area[p] + gt_area[g] - i - pred_void[p])
        match = iou > 0.5
        g, p, iou = g[match], p[match], iou[match]
        stats = self._local
        matched_cat = gt_cat[g]
        np.add.at(stats[1], matched_cat, 1)
        np.add.at(stats[0], matched_cat, iou)  # sequential, in the pair order panopticapi adds them

        gt_matched = np.zeros(len(gt_ids), dtype=bool)
        gt_matched[g] = True
        pred_matched = np.zeros(len(pred_ids), dtype=bool)
        pred_matched[p] = True
        np.add.at(stats[3], gt_cat[~gt_matched & ~gt_crowd], 1)

        # The crowd region of a category is its LAST crowd segment in the list (panopticapi keeps a dict per category).
        crowd_of_cat = {int(gt_cat[k]): int(gt_ids[k]) for k in np.flatnonzero(gt_crowd)}
        ignored = pred_void.copy()
        for k in np.flatnonzero(~pred_matched):
            crowd_id = crowd_of_cat.get(int(pred_cat[k]))
            if crowd_id is not None:
                ignored[k] += int(inter[(gt_of_pair == crowd_id) & (pred_of_pair == pred_ids[k])].sum())
        false_pos = ~pred_matched & ~(ignored / pred_area > 0.5)
        np.add.at(stats[2], pred_cat[false_pos], 1)
        self._reduced = None

    def _segment_table(self, segments: Sequence[Mapping], what: str) -> tuple[np.ndarray, np.ndarray]:
        """(ids, category positions) of a segments_info list, in list order; errors name the bad entry."""
        ids, cats = [], []
        for k, seg in enumerate(segments):
            if "id" not in seg or "category_id" not in seg:
                raise ValueError(f"PanopticEvaluator.update: {what}[{k}] = {dict(seg)} lacks 'id' or 'category_id'")
            cat = self._index.get(int(seg["category_id"]))
            if cat is None:
                raise ValueError(
                    f"PanopticEvaluator.update: {what}[{k}] (segment id {seg['id']}) has category_id "
                    f"{seg['category_id']}, not in the category list (ids {sorted(self._index)[:10]}...)"
                )
            ids.append(int(seg["id"]))
            cats.append(cat)
        if len(set(ids)) != len(ids):
            raise ValueError(f"PanopticEvaluator.update: {what} has duplicate segment ids: {ids}")
        return np.array(ids, dtype=np.int64), np.array(cats, dtype=np.int64)

    def all_reduce(self) -> None:
        """Sum the statistics over all torch.distributed workers (every worker must call it); no-op when not
        initialised. The local sums are kept, so reducing again never double-counts."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        reduced = torch.from_numpy(self._local.copy()).to(device)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        self._reduced = reduced.cpu().numpy()

    @property
    def statistics(self) -> dict[str, np.ndarray]:
        """Per-category sums in category-list order: `iou` (float64), `tp`, `fp`, `fn` (int64); summed over workers
        after `all_reduce()`."""
        stats = self._reduced if self._reduced is not None else self._local
        return {name: (row if name == "iou" else row.astype(np.int64)) for name, row in zip(_ROWS, stats)}

    def compute(self) -> dict:
        """PQ/SQ/RQ over all, thing (`_th`) and stuff (`_st`) categories, in percent, averaged over the categories
        with TP+FP+FN > 0 (NaN when there is none), plus `per_class` {name: {"PQ", "SQ", "RQ"}} (NaN for a category
        never seen; panopticapi writes 0 there but leaves it out of the means as here)."""
        stats = self.statistics
        per_class: dict[str, dict[str, float]] = {}
        values = []
        for k, cat in enumerate(self.categories):
            iou, tp, fp, fn = float(stats["iou"][k]), int(stats["tp"][k]), int(stats["fp"][k]), int(stats["fn"][k])
            if tp + fp + fn == 0:
                values.append(None)
                per_class[cat["name"]] = {"PQ": math.nan, "SQ": math.nan, "RQ": math.nan}
                continue
            # panopticapi's expressions, term for term, so the floats are the same.
            pq = iou / (tp + 0.5 * fp + 0.5 * fn)
            sq = iou / tp if tp != 0 else 0
            rq = tp / (tp + 0.5 * fp + 0.5 * fn)
            values.append((pq, sq, rq))
            per_class[cat["name"]] = {"PQ": 100 * pq, "SQ": 100 * sq, "RQ": 100 * rq}
        result: dict = {}
        for suffix, isthing in (("", None), ("_th", True), ("_st", False)):
            pq = sq = rq = 0.0
            n = 0
            for cat, v in zip(self.categories, values):
                if v is None or (isthing is not None and cat["isthing"] != isthing):
                    continue
                # A plain running sum in category order, as pq_average does (builtin sum() compensates since 3.12).
                pq, sq, rq, n = pq + v[0], sq + v[1], rq + v[2], n + 1
            for name, total in (("PQ", pq), ("SQ", sq), ("RQ", rq)):
                result[name + suffix] = 100 * (total / n) if n else math.nan
        result["per_class"] = per_class
        return result


def _sum_by(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the summed weights of each."""
    uniq, inverse = np.unique(keys, return_inverse=True)
    return uniq, np.bincount(inverse.ravel(), weights=weights, minlength=len(uniq)).astype(np.int64)


def _position(table: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each value in `table` (unsorted, unique), -1 where absent."""
    if table.size == 0:
        return np.full(values.shape, -1, dtype=np.int64)
    order = np.argsort(table, kind="stable")
    where = np.clip(np.searchsorted(table, values, sorter=order), 0, table.size - 1)
    found = table[order[where]] == values
    return np.where(found, order[where], -1)


def _rgb2id(color: np.ndarray) -> np.ndarray:
    """COCO panoptic PNG (H, W, 3) uint8 -> segment ids (H, W) int64: R + 256 G + 256² B."""
    color = color.astype(np.int64)
    return color[..., 0] + 256 * color[..., 1] + 256 * 256 * color[..., 2]


def _read_ids(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pq_from_files: missing panoptic PNG {path}")
    with Image.open(path) as image:
        return _rgb2id(np.asarray(image.convert("RGB")))


def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pq_from_files: {what} JSON {path} does not exist")
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise ValueError(f"pq_from_files: {what} JSON {path} has no 'annotations' list (COCO panoptic format)")
    return data


def pq_from_files(gt_json: str, gt_folder: str, pred_json: str, pred_folder: str) -> dict:
    """PQ of predictions stored as COCO panoptic PNG+JSON against the ground truth in the same layout (what
    panopticapi's `pq_compute` reads), one image at a time; returns `PanopticEvaluator.compute()`'s dict.

    Categories come from the ground-truth JSON; every ground-truth image needs a prediction (predictions for other
    images are ignored, as panopticapi does)."""
    gt = _read_json(os.fspath(gt_json), "ground-truth")
    pred = _read_json(os.fspath(pred_json), "prediction")
    if not gt.get("categories"):
        raise ValueError(f"pq_from_files: ground-truth JSON {gt_json} has no 'categories' list")
    evaluator = PanopticEvaluator(gt["categories"])
    pred_by_image = {ann["image_id"]: ann for ann in pred["annotations"]}
    for gt_ann in gt["annotations"]:
        image_id = gt_ann["image_id"]
        pred_ann = pred_by_image.get(image_id)
        if pred_ann is None:
            raise ValueError(f"pq_from_files: {pred_json} has no annotation for image_id {image_id} (in {gt_json})")
        gt_png = os.path.join(gt_folder, gt_ann["file_name"])
        pred_png = os.path.join(pred_folder, pred_ann["file_name"])
        gt_ids, pred_ids = _read_ids(gt_png), _read_ids(pred_png)
        if gt_ids.shape != pred_ids.shape:
            raise ValueError(
                f"pq_from_files: {pred_png} is {pred_ids.shape[1]}x{pred_ids.shape[0]} (WxH) but {gt_png} is "
                f"{gt_ids.shape[1]}x{gt_ids.shape[0]}; predictions must be at the original image size"
            )
        try:
            evaluator.update(pred_ids, pred_ann["segments_info"], gt_ids, gt_ann["segments_info"])
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"pq_from_files: image_id {image_id} ({pred_png} vs {gt_png}): {err}") from None
    return evaluator.compute()
