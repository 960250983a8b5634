"""ADE20K in its released layout: class metadata, reduce_zero_label, dataset items, and every kind of bad data
reported up front by check_split and again at load time, naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knetlab.data import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ADE20KDataset,
    DatasetError,
    build_test_transform,
    build_train_transform,
    check_split,
    collate_segmentation,
    default_class_ids,
    generate_synthetic_ade20k,
    load_image,
    load_label,
    normalize_images,
    reduce_zero_label_map,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ade20k")
    generate_synthetic_ade20k(out, num_train=6, num_val=3, num_classes=6, min_side=40, max_side=72, seed=11)
    return out


@pytest.fixture
def dataset_root(pristine: Path, tmp_path: Path) -> Path:
    """A fresh copy to damage; the directory that holds ADEChallengeData2016/."""
    shutil.copytree(pristine, tmp_path / "data")
    return tmp_path / "data"


def split_files(root: Path, split: str = "training") -> tuple[list[Path], list[Path]]:
    base = root / "ADEChallengeData2016"
    return (sorted((base / "images" / split).glob("*.jpg")), sorted((base / "annotations" / split).glob("*.png")))


def test_class_names_and_palette_are_mmsegs():
    assert len(ADE20K_CLASSES) == 150 == len(ADE20K_PALETTE) == len(set(ADE20K_CLASSES))
    assert ADE20K_CLASSES[:4] == ("wall", "building", "sky", "floor") and ADE20K_CLASSES[-1] == "flag"
    assert ADE20K_CLASSES[7] == "bed" and ADE20K_CLASSES[44] == "chest of drawers"
    assert ADE20K_PALETTE[0] == (120, 120, 120) and ADE20K_PALETTE[2] == (6, 230, 230)
    assert ADE20K_PALETTE[-1] == (92, 0, 255) and ADE20K_PALETTE[149] == (92, 0, 255)
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)


def test_reduce_zero_label_maps_zero_to_ignore_and_shifts_classes(tmp_path: Path):
    raw = np.array([[0, 1, 2], [75, 149, 150]], dtype=np.uint8)
    expected = np.array([[255, 0, 1], [74, 148, 149]], dtype=np.uint8)
    np.testing.assert_array_equal(reduce_zero_label_map(raw), expected)
    np.testing.assert_array_equal(reduce_zero_label_map(np.array([255], dtype=np.uint8)), [255])
    path = tmp_path / "label.png"
    Image.fromarray(raw).save(path)
    np.testing.assert_array_equal(load_label(path), expected)
    np.testing.assert_array_equal(load_label(path, reduce_zero_label=False, num_classes=151), raw)


def test_dataset_items(dataset_root: Path):
    dataset = ADE20KDataset(dataset_root, "training")
    images, labels = split_files(dataset_root)
    assert len(dataset) == len(images) == 6
    item = dataset[2]
    assert set(item) == {"image", "label", "path"} and item["path"] == str(images[2])
    raw_image = np.array(Image.open(images[2]).convert("RGB"))  # PIL's decoding: OpenCV's gives the same pixels
    raw_label = np.array(Image.open(labels[2]))
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (3, *raw_label.shape)
    assert torch.equal(item["image"], torch.from_numpy(raw_image).permute(2, 0, 1))
    # normalised where the images meet the model: (x - mean) / std in float32, exactly
    expected = (torch.from_numpy(raw_image).permute(2, 0, 1).float() - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.equal(normalize_images([item["image"]])[0], expected)
    assert item["label"].dtype == torch.uint8
    np.testing.assert_array_equal(item["label"].numpy(), np.where(raw_label == 0, 255, raw_label.astype(int) - 1))
    keep = ADE20KDataset(dataset_root, "training", reduce_zero_label=False, num_classes=151)[2]["label"]
    np.testing.assert_array_equal(keep.numpy(), raw_label)
    # the released root itself works too, and split aliases
    assert len(ADE20KDataset(dataset_root / "ADEChallengeData2016", "val")) == 3
    assert len(ADE20KDataset(dataset_root, "validation", max_images=2)) == 2


@pytest.mark.forks
def test_dataset_with_transforms_and_seeded_rng(dataset_root: Path):
    train = ADE20KDataset(dataset_root, "training", build_train_transform(32, scale=(128, 32)), seed=3)
    first = train[1]
    # the image is the crop (a side smaller than 32 where the rescaled image is); the label is padded to the crop
    assert first["image"].shape[0] == 3 and max(first["image"].shape[1:]) <= 32 and first["image"].dtype == torch.uint8
    assert tuple(first["label"].shape) == (32, 32) and first["label"].dtype == torch.uint8
    assert torch.equal(first["image"], train[1]["image"])  # same seed, epoch and index: same augmentation
    train.set_epoch(1)
    assert not torch.equal(first["image"], train[1]["image"])
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=2, collate_fn=collate_segmentation)
    batch = next(iter(loader))
    assert len(batch["image"]) == 3 and tuple(batch["label"].shape) == (3, 32, 32)
    assert torch.equal(batch["image"][1], train[1]["image"])  # workers reproduce the main process's items
    in_use = {c - 1 for c in default_class_ids(6)} | {255}  # the synthetic classes, shifted down, and ignore
    assert set(batch["label"].unique().tolist()) <= in_use
    test = ADE20KDataset(dataset_root, "validation", build_test_transform((128, 32)))
    item = test[0]
    raw_label = np.array(Image.open(split_files(dataset_root, "validation")[1][0]))
    assert tuple(item["label"].shape) == raw_label.shape  # original size for evaluation
    assert max(item["image"].shape[1:]) <= 128 and min(item["image"].shape[1:]) <= 32


def assert_reported(root: Path, split: str, path: Path, fragment: str) -> None:
    with pytest.raises(DatasetError) as error:
        check_split(root, split)
    message = str(error.value)
    assert str(path) in message and fragment in message, message


def assert_load_fails(root: Path, split: str, index: int, path: Path, fragment: str) -> None:
    dataset = ADE20KDataset(root, split)
    with pytest.raises(DatasetError) as error:
        dataset[index]
    message = str(error.value)
    assert str(path) in message and fragment in message, message


def test_pristine_dataset_passes_the_checks(dataset_root: Path):
    pairs = check_split(dataset_root, "training")
    assert [p[0] for p in pairs] == split_files(dataset_root)[0]
    assert len(check_split(dataset_root, "val")) == 3


def test_image_without_annotation(dataset_root: Path):
    images, labels = split_files(dataset_root)
    labels[3].unlink()
    assert_reported(dataset_root, "training", images[3], "image has no annotation")
    with pytest.raises(DatasetError, match="image has no annotation"):
        ADE20KDataset(dataset_root, "training")


def test_annotation_removed_after_listing_fails_at_load(dataset_root: Path):
    _, labels = split_files(dataset_root)
    dataset = ADE20KDataset(dataset_root, "training")
    labels[4].unlink()
    with pytest.raises(DatasetError, match="unreadable annotation") as error:
        dataset[4]
    assert str(labels[4]) in str(error.value)


def test_annotation_without_image(dataset_root: Path):
    images, labels = split_files(dataset_root)
    images[0].unlink()
    assert_reported(dataset_root, "training", labels[0], "annotation has no image")


def test_truncated_image(dataset_root: Path):
    images, _ = split_files(dataset_root)
    data = images[1].read_bytes()
    images[1].write_bytes(data[: len(data) // 2])
    assert_reported(dataset_root, "training", images[1], "unreadable image")
    assert_load_fails(dataset_root, "training", 1, images[1], "truncated")


def test_unreadable_annotation(dataset_root: Path):
    _, labels = split_files(dataset_root)
    labels[2].write_bytes(b"this is not a png")
    assert_reported(dataset_root, "training", labels[2], "unreadable annotation")
    assert_load_fails(dataset_root, "training", 2, labels[2], "unreadable annotation")


def test_truncated_annotation(dataset_root: Path):
    _, labels = split_files(dataset_root)
    data = labels[5].read_bytes()
    labels[5].write_bytes(data[: len(data) - 40])
    assert_reported(dataset_root, "training", labels[5], "unreadable annotation")
    assert_load_fails(dataset_root, "training", 5, labels[5], "unreadable annotation")


def test_label_value_above_150(dataset_root: Path):
    _, labels = split_files(dataset_root, "validation")
    label = np.array(Image.open(labels[1]))
    label[0, :3] = (151, 200, 151)
    Image.fromarray(label).save(labels[1])
    assert_reported(dataset_root, "validation", labels[1], "label value(s) 151, 200 out of range")
    assert_load_fails(dataset_root, "validation", 1, labels[1], "valid: 0 (other) or 1..150")


def test_empty_split(dataset_root: Path):
    images, labels = split_files(dataset_root, "validation")
    for path in images + labels:
        path.unlink()
    split_dir = dataset_root / "ADEChallengeData2016" / "images" / "validation"
    assert_reported(dataset_root, "validation", split_dir, "empty split")
    with pytest.raises(DatasetError, match="empty split"):
        ADE20KDataset(dataset_root, "validation")


def test_size_mismatch_and_colour_annotation(dataset_root: Path):
    images, labels = split_files(dataset_root)
    label = np.array(Image.open(labels[0]))
    Image.fromarray(label[:-1]).save(labels[0])
    assert_reported(dataset_root, "training", labels[0], "annotation is")
    assert_load_fails(dataset_root, "training", 0, labels[0], f"but its image {images[0].name}")
    Image.fromarray(np.stack([label] * 3, axis=-1)).save(labels[0])
    assert_reported(dataset_root, "training", labels[0], "single-channel PNG")


def test_missing_root_split_and_layout(tmp_path: Path, dataset_root: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        check_split(tmp_path / "nowhere", "training")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not an ADE20K dataset root"):
        check_split(tmp_path / "empty", "training")
    with pytest.raises(DatasetError, match="valid: train, training, val, validation"):
        ADE20KDataset(dataset_root, "test")
    shutil.rmtree(dataset_root / "ADEChallengeData2016" / "annotations" / "validation")
    with pytest.raises(DatasetError, match="annotations/validation: split directory does not exist"):
        check_split(dataset_root, "validation")


def test_palette_annotations_are_read_as_indices(tmp_path: Path):
    root = generate_synthetic_ade20k(tmp_path, num_train=2, num_val=1, num_classes=4, image_size=(24, 32),
                                     label_mode="P", seed=2)
    label_path = sorted((root / "annotations" / "training").glob("*.png"))[0]
    with Image.open(label_path) as image:
        assert image.mode == "P"
        indices = np.array(image)
    assert set(np.unique(indices)) <= {0, 1, 51, 100, 150}
    check_split(tmp_path, "training")
    item = ADE20KDataset(tmp_path, "training")[0]
    np.testing.assert_array_equal(item["label"].numpy(), np.where(indices == 0, 255, indices.astype(int) - 1))


def test_images_decode_to_pils_pixels_whichever_decoder_reads_them(tmp_path: Path):
    rng = np.random.default_rng(0)
    photo = np.repeat(np.repeat(rng.integers(0, 256, (12, 17, 3), dtype=np.uint8), 4, axis=0), 4, axis=1)
    cases = {"444.jpg": {"subsampling": 0}, "420.jpg": {"subsampling": 2}, "progressive.jpg": {"progressive": True}}
    for name, options in cases.items():
        Image.fromarray(photo).save(tmp_path / name, quality=85, **options)
    Image.fromarray(photo[..., 0]).save(tmp_path / "grey.jpg")
    Image.fromarray(photo).save(tmp_path / "image.png")
    (tmp_path / "trailing.jpg").write_bytes((tmp_path / "420.jpg").read_bytes() + b"\0" * 7)  # read by PIL
    for path in sorted(tmp_path.iterdir()):
        image = load_image(path)
        assert image.dtype == np.uint8 and image.shape == (48, 68, 3), path.name
        np.testing.assert_array_equal(image, np.array(Image.open(path).convert("RGB")), err_msg=path.name)


def test_grey_annotations_decode_alike_in_8_and_16_bits(tmp_path: Path):
    raw = np.random.default_rng(1).integers(0, 151, (33, 47)).astype(np.uint8)
    Image.fromarray(raw).save(tmp_path / "l.png")
    Image.fromarray(raw.astype(np.uint16)).save(tmp_path / "i16.png")
    with Image.open(tmp_path / "i16.png") as image:
        assert image.mode == "I;16"
    for name in ("l.png", "i16.png"):
        label = load_label(tmp_path / name)
        assert label.dtype == np.uint8
        np.testing.assert_array_equal(label, reduce_zero_label_map(raw), err_msg=name)
