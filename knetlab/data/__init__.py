"""knetlab.data: ADE20K in its released layout (local or copied once per node from S3), the reference training and
test pipelines, and a synthetic dataset in the same layout."""

from knetlab.data.ade20k import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    IGNORE_INDEX,
    NUM_CLASSES,
    ADE20KDataset,
    DatasetError,
    check_split,
    find_dataset_dir,
    list_pairs,
    load_image,
    load_label,
    reduce_zero_label_map,
)
from knetlab.data.cache import CachedDataset, cache_path, cache_s3_dataset, resolve_dataset_root
from knetlab.data.synthetic import default_class_ids, generate_synthetic_ade20k
from knetlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_test_transform,
    build_train_transform,
    rescale_size,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "ADE20KDataset",
    "CachedDataset",
    "DatasetError",
    "build_test_transform",
    "build_train_transform",
    "cache_path",
    "cache_s3_dataset",
    "check_split",
    "default_class_ids",
    "find_dataset_dir",
    "generate_synthetic_ade20k",
    "list_pairs",
    "load_image",
    "load_label",
    "reduce_zero_label_map",
    "rescale_size",
    "resolve_dataset_root",
]
