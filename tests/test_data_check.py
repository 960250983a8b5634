"""`knetlab data check` and the custom-dataset layouts: the report (classes, sizes, histogram) and every kind of
problem in one run, list files of image/label pairs, reduce_zero_label both ways, and `knetlab data synth --format
custom`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knetlab.data import ADE20KDataset, DatasetError, check_split, generate_synthetic_custom
from knetlab.data.check import check_dataset, format_report
from knetlab.data.classes import read_classes_file
from knetlab.data.list_file import list_file_pairs, read_list_file
from knetlab.platform.cli import main


@pytest.fixture
def custom_root(tmp_path: Path) -> Path:
    return generate_synthetic_custom(tmp_path / "mine", num_train=6, num_val=2, image_size=(24, 32), seed=3)


def files(root: Path, split: str = "training") -> tuple[list[Path], list[Path]]:
    return sorted((root / "images" / split).glob("*.jpg")), sorted((root / "annotations" / split).glob("*.png"))


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_synthetic_custom_dataset_layout_classes_and_list_files(custom_root: Path):
    classes = read_classes_file(custom_root / "classes.txt")
    assert classes.names == ("sky", "meadow", "pond", "kite", "traffic cone")
    images, labels = files(custom_root)
    assert len(images) == len(labels) == 6 and len(files(custom_root, "validation")[0]) == 2
    values = set()
    for label in labels:
        values |= set(np.unique(np.array(Image.open(label))).tolist())
    assert values <= {0, 1, 2, 3, 4, 255} and len(values - {255}) >= 3  # labels 0..N-1, 255 = unlabelled
    assert list_file_pairs("train.txt", custom_root) == list(zip(images, labels))
    params = json.loads((custom_root / "knetlab-synthetic.json").read_text())
    assert params["names"] == list(classes.names)
    assert generate_synthetic_custom(custom_root, num_train=6, num_val=2, image_size=(24, 32), seed=3,
                                     exist_ok=True) == custom_root
    with pytest.raises(DatasetError, match="already exists"):
        generate_synthetic_custom(custom_root, num_train=6, num_val=2, image_size=(24, 32), seed=4, exist_ok=True)
    with pytest.raises(DatasetError, match="2 class names"):
        generate_synthetic_custom(custom_root.parent / "x", num_classes=3, class_names=["a", "b"])


def test_data_check_reports_a_clean_dataset(custom_root: Path, capsys: pytest.CaptureFixture):
    code, out, err = run_cli(capsys, "data", "check", custom_root)
    assert code == 0 and err == ""
    assert f"classes: 5 from {custom_root / 'classes.txt'}; reduce_zero_label=false" in out
    assert "training: 6 image/label pairs" in out and "image sizes (WxH): 32x24" in out
    rows = {line.split()[1]: line for line in out.splitlines() if line.strip()[:1].isdigit()}
    assert set(rows) == {"sky", "meadow", "pond", "kite", "traffic"}  # one histogram row per class, by its name
    assert "problems: none" in out


def test_data_check_names_every_kind_of_problem(custom_root: Path, capsys: pytest.CaptureFixture):
    images, labels = files(custom_root)
    labels[0].unlink()  # image without annotation
    images[1].write_bytes(images[1].read_bytes()[:200])  # truncated image
    label = np.array(Image.open(labels[2]))
    Image.fromarray(label[:-2]).save(labels[2])  # size mismatch
    label = np.array(Image.open(labels[3]))
    label[0, :2] = (5, 9)
    Image.fromarray(label).save(labels[3])  # out of range for 5 classes
    labels[4].write_bytes(b"not a png")  # unreadable annotation
    val_images, _ = files(custom_root, "validation")
    val_images[0].unlink()  # annotation without image
    code, out, err = run_cli(capsys, "data", "check", custom_root)
    assert code == 2 and err.strip() == f"knetlab: error: 6 problem(s) in the dataset at {custom_root} (listed above)"
    problems = out.split("problems: 6\n", 1)[1].splitlines()
    expected = [(images[0], "image has no annotation"), (images[1], "unreadable image"),
                (labels[2], "annotation is 32x22 (WxH) but its image"),
                (labels[3], "label value(s) 5, 9 out of range; valid: 0..4 or 255 (ignore)"),
                (labels[4], "unreadable annotation"),
                (files(custom_root, "validation")[1][0], "annotation has no image")]
    assert len(problems) == len(expected)
    for (path, fragment), line in zip(expected, problems):
        assert line.strip().startswith(f"{path}: ") and fragment in line, line
    # the same dataset stops training up front, naming the files
    with pytest.raises(DatasetError, match="image has no annotation"):
        check_split(custom_root, "training", num_classes=5, reduce_zero_label=False)


def test_data_check_of_no_dataset_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    code, out, err = run_cli(capsys, "data", "check", tmp_path / "nowhere")
    assert code == 2 and out == "" and err.count("\n") == 1 and "dataset root does not exist" in err
    code, _, err = run_cli(capsys, "data", "check", tmp_path, "data.reduce_zero_label=maybe")
    assert code == 2 and "data.reduce_zero_label must be true or false" in err


def test_list_file_layout_and_its_problems(custom_root: Path, capsys: pytest.CaptureFixture):
    shutil.move(custom_root / "images", custom_root / "pictures")  # no ADE20K folders any more
    for name in ("train.txt", "val.txt"):
        text = (custom_root / name).read_text().replace("images/", "pictures/")
        (custom_root / name).write_text("# image label\n" + text)
    dataset = ADE20KDataset(custom_root, "training", list_file="train.txt", num_classes=5, reduce_zero_label=False)
    assert len(dataset) == 6 and dataset[0]["path"].endswith("pictures/training/train_00001.jpg")
    assert set(dataset[0]["label"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    lists = ["data.train_list=train.txt", "data.val_list=val.txt"]
    code, out, _ = run_cli(capsys, "data", "check", custom_root, *lists)
    assert code == 0 and f"from {custom_root / 'train.txt'}" in out
    example = Path(__file__).resolve().parent.parent / "experiments" / "custom" / "example.yaml"
    code, out, _ = run_cli(capsys, "data", "check", custom_root, *lists, "--experiment", example)
    assert code == 0 and "classes: 5 from" in out
    from knetlab.platform.preflight import check_data_readable

    check_data_readable(str(custom_root), "semantic", ("train.txt", "val.txt"))  # what every node checks
    with pytest.raises(DatasetError, match="not an ADE20K dataset root"):
        check_data_readable(str(custom_root), "semantic")

    with open(custom_root / "train.txt", "a") as f:
        f.write("only-one-field\npictures/training/nope.jpg annotations/training/train_00001.png\n")
    pairs, problems = read_list_file("train.txt", custom_root)
    assert len(pairs) == 6
    assert problems[0] == (f"{custom_root / 'train.txt'}:8: expected 'IMAGE LABEL' (two paths separated by whitespace "
                           f"or a tab), got 'only-one-field'")
    assert problems[1].startswith(f"{custom_root / 'train.txt'}:9: image ") and "does not exist" in problems[1]
    code, out, _ = run_cli(capsys, "data", "check", custom_root, *lists)
    assert code == 2 and "problems: 2" in out
    (custom_root / "val.txt").write_text("# nothing\n")
    assert read_list_file("val.txt", custom_root)[1] == [f"{custom_root / 'val.txt'}: no image/label pairs (one "
                                                         f"'IMAGE LABEL' line per pair)"]
    with pytest.raises(DatasetError, match="list file does not exist"):
        read_list_file("missing.txt", custom_root)
    with pytest.raises(DatasetError, match=r"not an ADE20K dataset root.*data\.train_list"):
        ADE20KDataset(custom_root, "training")


def test_reduce_zero_label_both_ways(tmp_path: Path):
    root = tmp_path / "enc"
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(root / "images" / split / "a.png")  # PNG images work too
        Image.fromarray(np.array([[0, 1, 2, 2, 1, 0]] * 4, np.uint8)).save(root / "annotations" / split / "a.png")
    raw = np.array([0, 1, 2, 2, 1, 0])
    off = ADE20KDataset(root, "training", num_classes=3, reduce_zero_label=False)[0]["label"][0].numpy()
    on = ADE20KDataset(root, "training", num_classes=2, reduce_zero_label=True)[0]["label"][0].numpy()
    np.testing.assert_array_equal(off, raw)  # file values are the classes
    np.testing.assert_array_equal(on, np.where(raw == 0, 255, raw - 1))  # 0 = other -> ignored, k -> k - 1

    from knetlab.data.classes import dataset_classes

    def report(classes_text: str, reduce_zero_label: bool):
        (root / "classes.txt").write_text(classes_text)
        return check_dataset(root, dataset_classes({"root": str(root)}), reduce_zero_label=reduce_zero_label)

    counted = report("a\nb\nc\n", False).splits[0].counts.tolist()
    assert counted == [8, 8, 8, 0]  # a, b, c, ignored
    counted = report("b\nc\n", True).splits[0].counts.tolist()
    assert counted == [8, 8, 8]  # b, c, ignored (the 0s)
    too_few = report("a\nb\n", False)  # value 2 is no class of two without reduce_zero_label
    assert "label value(s) 2 out of range; valid: 0..1 or 255 (ignore)" in too_few.problems[0]
    assert "(ignored)" in format_report(too_few)


def test_synth_custom_cli_with_names(tmp_path: Path, capsys: pytest.CaptureFixture):
    out_dir = tmp_path / "named"
    code, out, _ = run_cli(capsys, "data", "synth", "--format", "custom", "--out", out_dir, "--names",
                           "cat, dog,bird", "--train", "2", "--val", "1", "--image-size", "16", "16")
    assert code == 0 and "knetlab data check" in out
    assert read_classes_file(out_dir / "classes.txt").names == ("cat", "dog", "bird")
    with pytest.raises(SystemExit) as info:
        main(["data", "synth", "--out", str(tmp_path / "x"), "--names", "a,b"])
    assert info.value.code == 2 and "--names applies to --format custom only" in capsys.readouterr().err


def test_s3_dataset_names_its_classes_by_uri(s3_server, custom_root: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture):
    from test_data_cache import upload_tree

    upload_tree(s3_server, custom_root, "datasets/mine")
    uri = f"s3://{s3_server.bucket}/datasets/mine"
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    # the classes.txt inside an s3:// dataset is only seen in its local copy: the check says so, as training would
    code, out, _ = run_cli(capsys, "data", "check", uri, cache)
    first_problem = out.split("\nproblems: ", 1)[1].splitlines()[1]
    assert code == 2 and "classes.txt: the dataset names its 5 classes here, but the config uses ADE20K's" in \
        first_problem and "set data.classes_file to this file's s3:// URI" in first_problem
    assert "label value(s) 255 out of range; valid: 0 (other) or 1..150" in out  # read as ADE20K's, as it would be
    code, out, _ = run_cli(capsys, "data", "check", uri, cache, f"data.classes_file={uri}/classes.txt")
    assert code == 0 and f"classes: 5 from {uri}/classes.txt; reduce_zero_label=false" in out
    code, _, err = run_cli(capsys, "data", "check", uri, cache, f"data.classes_file={uri}/none.txt")
    assert code == 2 and f"{uri}/none.txt: cannot read the classes file (NoSuchKey)" in err
