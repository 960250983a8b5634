"""COCO panoptic and instance datasets on synthetic data in COCO's exact layout: items with the documented dtypes,
shapes and labels (checked pixel by pixel against the PNGs, and across the two formats), crowd and VOID handling,
mmdet's training filter, per-(seed, epoch, index) repeatability through DataLoader workers, every bad file as a
one-line error naming it, and datasets read from S3 through a real S3-compatible server."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knetlab.data import (
    COCO_LABEL_OF_ID,
    CocoInstanceDataset,
    CocoPanopticDataset,
    DatasetError,
    build_det_test_transform,
    build_det_train_transform,
    check_coco_instance_split,
    check_coco_panoptic_split,
    collate_detection,
    generate_synthetic_coco,
    load_image,
    rgb2id,
)
from knetlab.data.coco_categories import (
    COCO_CATEGORY_IDS,
    COCO_INSTANCE_CATEGORIES,
    COCO_PANOPTIC_CATEGORIES,
    category_id_to_label,
    coco_json_categories,
    label_to_category_id,
)
from knetlab.data.coco_panoptic import id2rgb

OPTIONS = {"num_train": 6, "num_val": 3, "min_side": 40, "max_side": 80, "seed": 3, "crowd_prob": 0.6,
           "void_prob": 0.5}
ITEM_META = {"image_id", "file_name", "ori_shape", "img_shape", "flip", "scale_factor"}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("coco")
    return {task: generate_synthetic_coco(out / task, task=task, **OPTIONS) for task in ("panoptic", "instance")}


@pytest.fixture
def copy(source, tmp_path: Path):
    """A fresh, writable copy of a synthetic dataset, to break."""
    def make(task: str) -> Path:
        return Path(shutil.copytree(source[task], tmp_path / task / "coco"))
    return make


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def png_ids(root: Path, split: str, file_name: str) -> np.ndarray:
    return rgb2id(np.asarray(Image.open(root / "annotations" / f"panoptic_{split}" / file_name)))


def is_thing(category_id: int) -> bool:
    return COCO_PANOPTIC_CATEGORIES[COCO_LABEL_OF_ID[category_id]].isthing


# sha256 of panoptic_coco_categories.json in cocodataset/panopticapi at 7bb4655 (git blob 673a19e5), which is
# json.dumps(categories) plus a newline: the table reproduces the file byte for byte.
PANOPTIC_CATEGORIES_SHA256 = "0365beb28dcb1a0ae3bf852236b6001526a783a88b291e0d504d6edb8bde83b2"


def test_categories_are_cocos_in_contiguous_order():
    text = json.dumps(coco_json_categories("panoptic")) + "\n"
    assert hashlib.sha256(text.encode()).hexdigest() == PANOPTIC_CATEGORIES_SHA256
    assert len(COCO_PANOPTIC_CATEGORIES) == 133 and len(COCO_INSTANCE_CATEGORIES) == 80
    assert [c.isthing for c in COCO_PANOPTIC_CATEGORIES] == [True] * 80 + [False] * 53  # things first
    assert [c.label for c in COCO_PANOPTIC_CATEGORIES] == list(range(133))
    assert COCO_INSTANCE_CATEGORIES == COCO_PANOPTIC_CATEGORIES[:80]
    assert list(COCO_CATEGORY_IDS[:80]) == sorted(COCO_CATEGORY_IDS[:80])
    assert list(COCO_CATEGORY_IDS[80:]) == sorted(COCO_CATEGORY_IDS[80:])
    for category_id, label, name in ((1, 0, "person"), (90, 79, "toothbrush"), (92, 80, "banner"),
                                     (200, 132, "rug-merged")):
        assert category_id_to_label(category_id) == label and label_to_category_id(label) == category_id
        assert COCO_PANOPTIC_CATEGORIES[label].name == name
    assert all(category_id_to_label(label_to_category_id(k)) == k for k in range(133))
    assert coco_json_categories("instance")[0] == {"supercategory": "person", "id": 1, "name": "person"}
    with pytest.raises(ValueError, match="category id 92 is not one of COCO's instance"):
        category_id_to_label(92, "instance")
    with pytest.raises(ValueError, match=r"label 80 out of range; valid: 0\.\.79"):
        label_to_category_id(80, "instance")


def test_panoptic_items_match_the_pngs(source):
    root = source["panoptic"]
    dataset = CocoPanopticDataset(root.parent, "train")  # the parent holding coco/ works too
    assert dataset.root == root and len(dataset) == 6 and not dataset.test_mode
    annotations = {a["image_id"]: a for a in read_json(root / "annotations/panoptic_train2017.json")["annotations"]}
    crowd_seen = void_seen = 0
    for index in range(len(dataset)):
        item = dataset[index]
        meta = item["meta"]
        assert set(item) == {"image", "masks", "labels", "sem_seg", "meta"} and set(meta) == ITEM_META
        annotation = annotations[meta["image_id"]]
        pan = png_ids(root, "train2017", annotation["file_name"])
        h, w = pan.shape
        assert meta["ori_shape"] == meta["img_shape"] == (h, w) and not meta["flip"] and meta["scale_factor"] == 1
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, h, w)
        assert torch.equal(item["image"], torch.from_numpy(load_image(root / "train2017" / meta["file_name"]))
                           .permute(2, 0, 1))
        assert item["masks"].dtype == torch.bool and item["labels"].dtype == torch.int64
        assert item["sem_seg"].dtype == torch.int64 and item["sem_seg"].shape == (h, w)
        instances = [s for s in annotation["segments_info"] if is_thing(s["category_id"]) and not s["iscrowd"]]
        assert item["masks"].shape == (len(instances), h, w)
        assert item["labels"].tolist() == [COCO_LABEL_OF_ID[s["category_id"]] for s in instances]
        assert all(0 <= label < 80 for label in item["labels"].tolist())
        for mask, segment in zip(item["masks"], instances):
            assert np.array_equal(mask.numpy(), pan == segment["id"])
        sem_seg = item["sem_seg"].numpy()
        for segment in annotation["segments_info"]:  # crowd things keep their thing label, stuff is 80..132
            label = COCO_LABEL_OF_ID[segment["category_id"]]
            assert (sem_seg[pan == segment["id"]] == label).all()
            assert (label < 80) == is_thing(segment["category_id"])
            crowd_seen += segment["iscrowd"]
        assert (sem_seg[pan == 0] == 255).all()
        void_seen += int((pan == 0).sum())
    assert crowd_seen and void_seen  # the data exercised both


def test_validation_items_carry_the_original_ground_truth(source):
    root = source["panoptic"]
    dataset = CocoPanopticDataset(root, "val", build_det_test_transform((64, 32)))
    assert dataset.test_mode and len(dataset) == 3
    annotations = read_json(root / "annotations/panoptic_val2017.json")["annotations"]
    for item, annotation in zip(dataset, annotations):
        pan = png_ids(root, "val2017", annotation["file_name"])
        assert item["gt_pan"].dtype == torch.int64 and np.array_equal(item["gt_pan"].numpy(), pan)
        assert item["gt_segments"] == annotation["segments_info"]
        h, w = item["meta"]["img_shape"]
        assert max(h, w) <= 64 and min(h, w) <= 32 and (max(h, w) == 64 or min(h, w) == 32)
        assert item["image"].shape == (3, h, w) and item["masks"].shape[1:] == (h, w)
        assert item["meta"]["ori_shape"] == pan.shape
    batch = collate_detection([dataset[0], dataset[1]])
    assert len(batch["gt_pan"]) == 2 and len(batch["targets"]) == 2 and batch["metas"][1]["image_id"] == 1_000_002


def test_instance_items_match_the_panoptic_ones_and_skip_crowds(source):
    panoptic = CocoPanopticDataset(source["panoptic"], "train")
    instance = CocoInstanceDataset(source["instance"], "train")
    assert instance.num_thing_classes == 80 and instance.num_stuff_classes == 0
    assert [r.image_id for r in instance.records] == [r.image_id for r in panoptic.records]
    data = read_json(source["instance"] / "annotations/instances_train2017.json")
    crowds = 0
    for index in range(len(instance)):
        a, b = instance[index], panoptic[index]
        assert a["sem_seg"] is None and set(a) == {"image", "masks", "labels", "sem_seg", "meta"}
        assert torch.equal(a["image"], b["image"])  # the same scenes: polygons decode to the painted pixels
        assert torch.equal(a["masks"], b["masks"]) and torch.equal(a["labels"], b["labels"])
        crowds += sum(x["iscrowd"] for x in data["annotations"] if x["image_id"] == a["meta"]["image_id"])
    assert crowds > 0


def test_instance_rle_segmentations_decode_like_polygons(copy):
    from pycocotools import mask as mask_utils

    root = copy("instance")
    path = root / "annotations/instances_val2017.json"
    before = [item["masks"] for item in CocoInstanceDataset(root, "val")]
    data = read_json(path)
    for annotation in data["annotations"][::2]:  # compressed RLE strings, as detectron2 and LVIS write them
        height, width = next((i["height"], i["width"]) for i in data["images"] if i["id"] == annotation["image_id"])
        rle = mask_utils.frPyObjects(annotation["segmentation"], height, width)
        rle = mask_utils.merge(rle) if isinstance(rle, list) else rle
        annotation["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    path.write_text(json.dumps(data))
    after = [item["masks"] for item in CocoInstanceDataset(root, "val")]
    assert all(torch.equal(x, y) for x, y in zip(before, after))


def test_training_filter_drops_images_without_things_as_mmdet(copy):
    root = copy("panoptic")
    path = root / "annotations/panoptic_train2017.json"
    data = read_json(path)
    first = data["annotations"][0]
    first["segments_info"] = [s for s in first["segments_info"] if not is_thing(s["category_id"])]
    data["images"][1]["height"] = 20  # a side under 32: dropped from training (never loaded)
    path.write_text(json.dumps(data))
    train = CocoPanopticDataset(root, "train")
    assert [r.image_id for r in train.records] == [i["id"] for i in data["images"][2:]]
    kept = CocoPanopticDataset(root, "train", test_mode=True)  # no filter in test mode
    assert len(kept) == 6
    with pytest.raises(DatasetError) as error:  # the PNG still holds the things the JSON no longer lists
        kept[0]
    assert_one_line(error, root / "annotations/panoptic_train2017" / first["file_name"], "not in")
    with pytest.raises(DatasetError) as error:
        kept[1]
    assert_one_line(error, root / "train2017" / data["images"][1]["file_name"], "gives")

    root = copy("instance")
    path = root / "annotations/instances_train2017.json"
    data = read_json(path)
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != data["images"][2]["id"]]
    path.write_text(json.dumps(data))
    assert len(CocoInstanceDataset(root, "train")) == 5
    empty = CocoInstanceDataset(root, "train", test_mode=True)[2]
    assert empty["masks"].shape[0] == 0 and empty["labels"].shape == (0,)


@pytest.mark.forks
def test_augmentation_is_repeatable_per_seed_epoch_and_index(source):
    transform = build_det_train_transform(((96, 48), (128, 64)))
    dataset = CocoPanopticDataset(source["panoptic"], "train", transform, seed=11)
    direct = [dataset[i] for i in range(len(dataset))]
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_detection)
    via_workers = [(image, target, meta) for batch in loader
                   for image, target, meta in zip(batch["images"], batch["targets"], batch["metas"])]
    for item, (image, target, meta) in zip(direct, via_workers):
        assert torch.equal(item["image"], image) and torch.equal(item["masks"], target["masks"])
        assert torch.equal(item["sem_seg"], target["sem_seg"]) and item["meta"] == meta
    again = CocoPanopticDataset(source["panoptic"], "train", transform, seed=11)
    assert all(torch.equal(again[i]["image"], direct[i]["image"]) for i in range(len(dataset)))
    dataset.set_epoch(1)
    epoch1 = [dataset[i]["meta"] for i in range(len(dataset))]
    assert [(m["img_shape"], m["flip"]) for m in epoch1] != [(d["meta"]["img_shape"], d["meta"]["flip"])
                                                             for d in direct]
    for item in direct:
        sem = item["sem_seg"]
        assert item["image"].shape[1:] == sem.shape == item["masks"].shape[1:]
        for mask, label in zip(item["masks"], item["labels"]):  # masks and map moved together
            assert (sem[mask] == label).all()


def assert_one_line(error: pytest.ExceptionInfo, path: Path, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_each_bad_panoptic_file_is_a_one_line_error_naming_it(copy):
    root = copy("panoptic")
    json_path = root / "annotations/panoptic_val2017.json"
    data = read_json(json_path)
    png_dir = root / "annotations/panoptic_val2017"
    images, annotations = data["images"], data["annotations"]
    (png_dir / annotations[0]["file_name"]).unlink()  # missing PNG
    (root / "val2017" / images[1]["file_name"]).unlink()  # missing JPEG
    pan = rgb2id(np.asarray(Image.open(png_dir / annotations[2]["file_name"])))
    small = Image.fromarray(id2rgb(pan[:-3]))  # PNG of another size than its image
    small.save(png_dir / annotations[2]["file_name"])
    dataset = CocoPanopticDataset(root, "val")
    with pytest.raises(DatasetError) as error:
        dataset[0]
    assert_one_line(error, png_dir / annotations[0]["file_name"], "does not exist")
    with pytest.raises(DatasetError) as error:
        dataset[1]
    assert_one_line(error, root / "val2017" / images[1]["file_name"], "does not exist")
    with pytest.raises(DatasetError) as error:
        dataset[2]
    assert_one_line(error, png_dir / annotations[2]["file_name"], "PNG is", "but its image")
    with pytest.raises(DatasetError) as error:
        check_coco_panoptic_split(root, "val", deep=False)
    for path in (png_dir / annotations[0]["file_name"], root / "val2017" / images[1]["file_name"],
                 png_dir / annotations[2]["file_name"]):
        assert_one_line(error, path)

    segment = annotations[0]["segments_info"][0]
    segment["category_id"] = 12  # no COCO category has id 12
    json_path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        CocoPanopticDataset(root, "val")
    assert_one_line(error, json_path, "category_id 12", f"segment {segment['id']}")
    json_path.write_text(json.dumps(data)[:-20])
    with pytest.raises(DatasetError) as error:
        check_coco_panoptic_split(root, "val")
    assert_one_line(error, json_path, "malformed JSON")
    json_path.unlink()
    with pytest.raises(DatasetError) as error:
        CocoPanopticDataset(root, "val")
    assert_one_line(error, json_path, "does not exist")
    with pytest.raises(DatasetError, match="unknown COCO split 'test'"):
        CocoPanopticDataset(root, "test")


def test_deep_check_finds_segment_ids_missing_from_the_json(copy):
    root = copy("panoptic")
    json_path = root / "annotations/panoptic_train2017.json"
    assert len(check_coco_panoptic_split(root, "train")) == 6
    data = read_json(json_path)
    dropped = data["annotations"][3]["segments_info"].pop()
    json_path.write_text(json.dumps(data))
    with pytest.raises(DatasetError) as error:
        check_coco_panoptic_split(root, "train")
    png = root / "annotations/panoptic_train2017" / data["annotations"][3]["file_name"]
    assert_one_line(error, png, f"segment id(s) {dropped['id']}", "panoptic_train2017.json")
    assert len(check_coco_panoptic_split(root, "train", deep=False)) == 6  # only decoding finds it


def test_each_bad_instance_file_is_a_one_line_error_naming_it(copy):
    root = copy("instance")
    json_path = root / "annotations/instances_val2017.json"
    data = read_json(json_path)
    (root / "val2017" / data["images"][0]["file_name"]).unlink()
    with pytest.raises(DatasetError) as error:
        CocoInstanceDataset(root, "val")[0]
    assert_one_line(error, root / "val2017" / data["images"][0]["file_name"], "does not exist")
    with pytest.raises(DatasetError) as error:
        check_coco_instance_split(root, "val")
    assert_one_line(error, root / "val2017" / data["images"][0]["file_name"])
    for change, fragments in (
        (lambda a: a.update(category_id=92), ("category_id 92", "80 instance")),  # a stuff id
        (lambda a: a.update(segmentation={"counts": [4, 2], "size": [2, 3]}), ("RLE size [2, 3]",)),
        (lambda a: a.update(image_id=999), ("image_id 999",)),
    ):
        broken = json.loads(json.dumps(data))
        change(broken["annotations"][1])
        json_path.write_text(json.dumps(broken))
        with pytest.raises(DatasetError) as error:
            CocoInstanceDataset(root, "val")
        assert_one_line(error, json_path, f"annotation {broken['annotations'][1]['id']}", *fragments)
    json_path.write_text("{not json")
    with pytest.raises(DatasetError) as error:
        CocoInstanceDataset(root, "val")
    assert_one_line(error, json_path, "malformed JSON")


def test_datasets_from_s3(s3_server, source, tmp_path: Path):
    from test_data_cache import upload_tree

    for task in ("panoptic", "instance"):
        upload_tree(s3_server, source[task].parent, f"datasets/coco-{task}")
    cache_dir = tmp_path / "cache"
    uri = f"s3://{s3_server.bucket}/datasets/coco-panoptic"
    dataset = CocoPanopticDataset(uri, "val", cache_dir=cache_dir)
    assert dataset.root == cache_dir / "s3" / s3_server.bucket / "datasets" / "coco-panoptic" / "coco"
    local = CocoPanopticDataset(source["panoptic"], "val")
    assert torch.equal(dataset[1]["gt_pan"], local[1]["gt_pan"]) and torch.equal(dataset[1]["image"],
                                                                                  local[1]["image"])
    assert len(check_coco_panoptic_split(uri, "train", cache_dir=cache_dir)) == 6
    uri = f"s3://{s3_server.bucket}/datasets/coco-instance"
    assert len(check_coco_instance_split(uri, "val", cache_dir=cache_dir)) == 3
    assert torch.equal(CocoInstanceDataset(uri, "train", cache_dir=cache_dir)[0]["masks"],
                       CocoInstanceDataset(source["instance"], "train")[0]["masks"])
