"""Instance-segmentation mask AP as mmdet 2.28's `CocoDataset.evaluate(metric='segm')` computes it: masks RLE-encoded
at once, results gathered across workers, then pycocotools' COCOeval(iouType='segm') over the images seen."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# mmdet 2.28 sets these on COCOeval (evaluate_det_segm: proposal_nums=(100, 300, 1000), the default iou_thrs); AP
# (stats[0]) is read at 100 detections per image, AP50/AP75/APs/APm/APl at 1000.
MAX_DETS = [100, 300, 1000]
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
METRIC_NAMES = ("segm_mAP", "segm_mAP_50", "segm_mAP_75", "segm_mAP_s", "segm_mAP_m", "segm_mAP_l")


class InstanceEvaluator:
    """Keeps the RLE-encoded predicted masks of every image it is given (never the dense masks).

    `compute()` runs COCOeval on the images seen, in the annotation file's image order, with every category of the
    file; an image updated with no prediction still counts (its ground truth become misses). Like mmdet, the
    results carry no box, so COCOeval takes each prediction's area from its mask (the s/m/l split). COCOeval
    converts the ground-truth polygons it reads to RLE in place, so a dict passed in is copied first.
    """

    def __init__(self, annotations: Mapping | str | os.PathLike) -> None:
        if isinstance(annotations, (str, os.PathLike)):
            path = os.fspath(annotations)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"InstanceEvaluator: annotations file {path} does not exist")
            with open(path) as f:
                annotations = json.load(f)
            where = path
        else:
            where = "the annotations dict"
            # COCOeval rewrites the ground-truth segmentations it reads (polygons -> RLE); keep the caller's intact.
            annotations = copy.deepcopy(annotations)
        for key in ("images", "annotations", "categories"):
            if not isinstance(annotations.get(key), list):
                raise ValueError(f"InstanceEvaluator: {where} has no '{key}' list (COCO instances format)")
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco = COCO()
            self.coco.dataset = annotations
            self.coco.createIndex()
        self._image_order = [img["id"] for img in annotations["images"]]
        self._image_size = {img["id"]: (int(img["height"]), int(img["width"])) for img in annotations["images"]}
        self.category_ids = [cat["id"] for cat in annotations["categories"]]
        self._category_rank = {cid: k for k, cid in enumerate(self.category_ids)}
        self._local: dict[int, list[dict]] = {}
        self._gathered: dict[int, list[dict]] | None = None

    def reset(self) -> None:
        self._local = {}
        self._gathered = None

    @torch.no_grad()
    def update(
        self,
        image_id: int,
        masks: torch.Tensor | np.ndarray,
        category_ids: torch.Tensor | np.ndarray,
        scores: torch.Tensor | np.ndarray,
    ) -> None:
        """One image's predictions at its original size: `masks` bool (K, H, W), `category_ids` (K,) COCO category
        ids, `scores` (K,); K may be 0."""
        image_id = int(image_id)
        size = self._image_size.get(image_id)
        if size is None:
            raise ValueError(f"InstanceEvaluator.update: image_id {image_id} is not in the annotations' images")
        if image_id in self._local:
            raise ValueError(f"InstanceEvaluator.update: image_id {image_id} was already updated; call reset() first")
        masks = torch.as_tensor(masks)
        labels = torch.as_tensor(category_ids).reshape(-1).tolist()
        # mmdet's results hold float32 scores (bbox arrays), written to JSON as float(score).
        score_list = torch.as_tensor(scores).detach().to("cpu", torch.float32).reshape(-1).tolist()
        if masks.dim() != 3 or tuple(masks.shape[1:]) != size or not (len(labels) == len(score_list) == masks.shape[0]):
            raise ValueError(
                f"InstanceEvaluator.update: image_id {image_id} is {size[0]}x{size[1]} (HxW); got masks "
                f"{tuple(masks.shape)}, {len(labels)} category_ids, {len(score_list)} scores (need (K, H, W), K, K)"
            )
        if masks.is_floating_point():
            raise TypeError(
                f"InstanceEvaluator.update: masks must be bool (threshold the probabilities): {masks.dtype}"
            )
        unknown = sorted({int(c) for c in labels} - set(self._category_rank))
        if unknown:
            raise ValueError(
                f"InstanceEvaluator.update: category_ids {unknown[:10]} are not in the annotations' categories "
                f"(ids {self.category_ids[:10]}...); map contiguous labels to COCO ids first"
            )
        rles = []
        if masks.shape[0]:
            # COCO RLE runs down columns: (K, W, H) C-contiguous is (H, W, K) Fortran-order, transposed on the
            # masks' device (fast on a GPU) before the copy to the host.
            dense = masks.detach().bool().transpose(1, 2).contiguous().cpu().view(torch.uint8).numpy().T
            rles = mask_util.encode(dense)
        results = []
        for rle, cat, score in zip(rles, labels, score_list):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(cat),
                    "score": score,
                    "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()},
                }
            )
        # mmdet writes an image's results class by class (its per-class result lists); a stable sort keeps the
        # model's order within a class, so COCOeval's tie-breaking between equal scores is the same.
        results.sort(key=lambda r: self._category_rank[r["category_id"]])
        self._local[image_id] = results
        self._gathered = None

    def all_reduce(self) -> None:
        """Gather every worker's results on every worker (all must call it); no-op when torch.distributed is not
        initialised. An image seen by several workers (a padded DistributedSampler) is kept once, from the lowest
        rank; the local results are kept, so gathering again never duplicates."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, self._local)
        gathered: dict[int, list[dict]] = {}
        for part in parts:
            for image_id, results in part.items():
                gathered.setdefault(image_id, results)
        self._gathered = gathered

    @property
    def num_images(self) -> int:
        return len(self._gathered if self._gathered is not None else self._local)

    def compute(self) -> dict[str, float]:
        """segm_mAP, segm_mAP_50, segm_mAP_75, segm_mAP_s|m|l in percent (COCOeval's stats[0:6] x 100, not
        rounded); NaN where COCOeval has nothing to average (-1: no image seen, or no ground truth in that range)."""
        seen = self._gathered if self._gathered is not None else self._local
        if not seen:
            return dict.fromkeys(METRIC_NAMES, math.nan)
        image_ids = [i for i in self._image_order if i in seen]
        # Copies: loadRes adds area/bbox/id to each result, and compute() may run again after more updates.
        detections = [dict(r) for i in image_ids for r in seen[i]]
        with contextlib.redirect_stdout(io.StringIO()):
            if detections:
                coco_dt = self.coco.loadRes(detections)
            else:
                # loadRes cannot take an empty list (mmdet stops there); an empty result set scores 0 AP honestly.
                coco_dt = COCO()
                coco_dt.dataset = {"images": self.coco.dataset["images"], "categories": self.coco.dataset["categories"]}
                coco_dt.dataset["annotations"] = []
                coco_dt.createIndex()
            coco_eval = COCOeval(self.coco, coco_dt, "segm")
            coco_eval.params.catIds = self.category_ids
            coco_eval.params.imgIds = image_ids
            coco_eval.params.maxDets = list(MAX_DETS)
            coco_eval.params.iouThrs = IOU_THRS
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        stats = coco_eval.stats[:6]
        return {name: (100 * float(v) if v >= 0 else math.nan) for name, v in zip(METRIC_NAMES, stats)}
