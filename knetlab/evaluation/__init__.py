"""knetlab.evaluation: mmsegmentation's metrics, panoptic quality (panopticapi's PQ) and mask AP (pycocotools),
whole / sliding-window / multi-scale+flip inference, the fps and memory benchmark, and the evaluation artifacts
(confusion matrix, overlays, per-class CSV)."""

from knetlab.evaluation.bench import benchmark, format_benchmark
from knetlab.evaluation.inference import (
    MS_RATIOS,
    inference_ms_flip,
    inference_slide,
    inference_whole,
    ms_test_scales,
    predict,
    predict_settings,
    rescale_size,
    slide_windows,
)
from knetlab.evaluation.instance import InstanceEvaluator
from knetlab.evaluation.metrics import SegEvaluator, format_table, metrics_from_confusion
from knetlab.evaluation.panoptic import PanopticEvaluator, pq_from_files
from knetlab.evaluation.visualize import confusion_matrix_png, overlay_png, per_class_csv

__all__ = [
    "MS_RATIOS",
    "InstanceEvaluator",
    "PanopticEvaluator",
    "SegEvaluator",
    "benchmark",
    "confusion_matrix_png",
    "format_benchmark",
    "format_table",
    "inference_ms_flip",
    "inference_slide",
    "inference_whole",
    "metrics_from_confusion",
    "ms_test_scales",
    "overlay_png",
    "per_class_csv",
    "pq_from_files",
    "predict",
    "predict_settings",
    "rescale_size",
    "slide_windows",
]
