"""knetlab.data: ADE20K and COCO (panoptic, instance) in their released layouts (local or copied once per node from
S3), datasets of your own (ADE20K's folders or list files, named classes), the checks and report of a dataset, the
reference training and test pipelines, and synthetic datasets in the same layouts."""

from knetlab.data.ade20k import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    IGNORE_INDEX,
    NUM_CLASSES,
    ADE20KDataset,
    DatasetError,
    find_dataset_dir,
    list_pairs,
    load_image,
    load_label,
    reduce_zero_label_map,
)
from knetlab.data.cache import CachedDataset, cache_path, cache_s3_dataset, resolve_dataset_root
from knetlab.data.check import DataReport, check_dataset, check_split, format_report
from knetlab.data.classes import (
    DatasetClasses,
    class_names,
    dataset_classes,
    find_classes_file,
    generated_palette,
    read_classes_file,
)
from knetlab.data.coco import CocoImage, find_coco_root
from knetlab.data.coco_categories import (
    COCO_CATEGORY_IDS,
    COCO_INSTANCE_CATEGORIES,
    COCO_INSTANCE_CLASSES,
    COCO_LABEL_OF_ID,
    COCO_PANOPTIC_CATEGORIES,
    COCO_PANOPTIC_CLASSES,
    NUM_STUFF_CLASSES,
    NUM_THING_CLASSES,
    CocoCategory,
    category_id_to_label,
    coco_categories,
    coco_json_categories,
    label_to_category_id,
)
from knetlab.data.coco_instance import CocoInstanceDataset, check_coco_instance_split
from knetlab.data.coco_panoptic import CocoPanopticDataset, check_coco_panoptic_split, id2rgb, rgb2id
from knetlab.data.det_transforms import (
    DetSample,
    batch_images,
    build_det_test_transform,
    build_det_train_transform,
    collate_detection,
)
from knetlab.data.list_file import list_file_pairs, read_list_file
from knetlab.data.synthetic import default_class_ids, generate_synthetic_ade20k
from knetlab.data.synthetic_coco import generate_synthetic_coco
from knetlab.data.synthetic_custom import generate_synthetic_custom
from knetlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
    collate_segmentation,
    normalize_images,
    rescale_size,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "COCO_CATEGORY_IDS",
    "COCO_INSTANCE_CATEGORIES",
    "COCO_INSTANCE_CLASSES",
    "COCO_LABEL_OF_ID",
    "COCO_PANOPTIC_CATEGORIES",
    "COCO_PANOPTIC_CLASSES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "NUM_STUFF_CLASSES",
    "NUM_THING_CLASSES",
    "ADE20KDataset",
    "CachedDataset",
    "CocoCategory",
    "CocoImage",
    "CocoInstanceDataset",
    "CocoPanopticDataset",
    "DataReport",
    "DatasetClasses",
    "DatasetError",
    "DetSample",
    "batch_images",
    "build_det_test_transform",
    "build_det_train_transform",
    "build_test_transform",
    "build_train_transform",
    "cache_path",
    "cache_s3_dataset",
    "category_id_to_label",
    "check_coco_instance_split",
    "check_coco_panoptic_split",
    "check_dataset",
    "check_split",
    "class_names",
    "coco_categories",
    "coco_json_categories",
    "collate_detection",
    "collate_segmentation",
    "dataset_classes",
    "default_class_ids",
    "find_classes_file",
    "find_coco_root",
    "find_dataset_dir",
    "format_report",
    "generate_synthetic_ade20k",
    "generate_synthetic_coco",
    "generate_synthetic_custom",
    "generated_palette",
    "id2rgb",
    "label_to_category_id",
    "list_file_pairs",
    "list_pairs",
    "load_image",
    "load_label",
    "normalize_images",
    "read_classes_file",
    "read_list_file",
    "reduce_zero_label_map",
    "rescale_size",
    "resolve_dataset_root",
    "rgb2id",
]
