"""A dataset's own classes: classes.txt / classes.yaml / inline names and palettes, where they are looked up, and how
an experiment config settles them (model.num_classes, data.reduce_zero_label), with one-line errors naming the file,
line or key."""

from __future__ import annotations

from pathlib import Path

import pytest

from knetlab.data import DatasetError
from knetlab.data.ade20k import ADE20K_CLASSES, ADE20K_PALETTE
from knetlab.data.classes import (
    class_names,
    dataset_classes,
    find_classes_file,
    generated_palette,
    parse_classes_text,
    parse_classes_yaml,
    read_classes_file,
)
from knetlab.platform.config import ConfigError, load_config
from knetlab.platform.semantic_task import metric_names

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "experiments" / "custom" / "example.yaml"


def error_of(function, *args) -> str:
    with pytest.raises(DatasetError) as info:
        function(*args)
    return str(info.value)


def test_classes_txt_names_colours_and_comments():
    text = "# road scene\nroad 128 64 128\n\nside walk #F423E8\ncar 0 0 142\n"
    classes = parse_classes_text(text, "c.txt")
    assert classes.names == ("road", "side walk", "car")
    assert classes.palette == ((128, 64, 128), (244, 35, 232), (0, 0, 142))
    assert classes.source == "c.txt" and classes.own and classes.default_reduce_zero_label is False
    plain = parse_classes_text("cat\ndog\n", "p.txt")
    assert plain.names == ("cat", "dog") and plain.palette == generated_palette(2)
    assert len(set(generated_palette(40))) == 40


@pytest.mark.parametrize(("text", "fragment"), [
    ("road 1 2 3\ncar\n", "c.txt:2: 'car' has no colour but the first class has one"),
    ("road\ncar 1 2 3\n", "c.txt:2: 'car' has a colour but the first class has none"),
    ("road\nroad\n", "c.txt:2: class name 'road' appears twice"),
    ("road 1 2 300\n", "c.txt:1: expected [R, G, B] with integers in 0..255, got [1, 2, 300]"),
    ("# nothing\n\n", "c.txt: no class names"),
])
def test_classes_txt_errors_name_the_line(text: str, fragment: str):
    message = error_of(parse_classes_text, text, "c.txt")
    assert fragment in message and "\n" not in message


def test_classes_yaml_names_colours_and_encoding():
    classes = parse_classes_yaml("classes:\n  - {name: road, color: [1, 2, 3]}\n  - {name: car, color: [4, 5, 6]}\n"
                                 "reduce_zero_label: true\n", "c.yaml")
    assert classes.names == ("road", "car") and classes.palette == ((1, 2, 3), (4, 5, 6))
    assert classes.reduce_zero_label is True and classes.default_reduce_zero_label is True
    assert parse_classes_yaml("[a, b, c]", "l.yaml").names == ("a", "b", "c")  # a bare list


@pytest.mark.parametrize(("text", "fragment"), [
    ("classes: [a, {name: b, color: [1, 2, 3]}]", "class 0 ('a') has no color but others have"),
    ("classes: [a]\ncolours: []", "unknown key(s) colours; valid: classes, reduce_zero_label"),
    ("classes: [a]\nreduce_zero_label: maybe", "reduce_zero_label must be true or false, got 'maybe'"),
    ("classes: [{label: a}]", "class 0: expected {name: ..., color: [R, G, B]}"),
    ("classes: a", "classes must be a list"),
    ("classes: [a, '']", "class 1 must be a non-empty one-line name"),
    ("classes: [a\n  b", "not valid YAML"),
    ("42", "expected a mapping with 'classes: [name, ...]'"),
])
def test_classes_yaml_errors_name_the_file(text: str, fragment: str):
    message = error_of(parse_classes_yaml, text, "c.yaml")
    assert message.startswith("c.yaml: ") and fragment in message and "\n" not in message


def test_lookup_order_inline_file_beside_the_data_then_ade20k(tmp_path: Path):
    root = tmp_path / "data"
    root.mkdir()
    assert dataset_classes({"root": str(root)}).names == ADE20K_CLASSES  # nothing named: ADE20K's 150
    assert dataset_classes({"root": str(root)}).palette == ADE20K_PALETTE
    generic = dataset_classes({"root": str(root)}, num_classes=3)
    assert generic.names == ("class_0", "class_1", "class_2") and not generic.own
    assert generic.default_reduce_zero_label is True  # unnamed classes keep ADE20K's encoding

    (root / "classes.txt").write_text("cat\ndog\n")
    assert find_classes_file(root) == root / "classes.txt"
    assert dataset_classes({"root": str(root)}).names == ("cat", "dog")
    other = tmp_path / "elsewhere.yaml"
    other.write_text("classes: [fox]\n")
    assert dataset_classes({"root": str(root), "classes_file": str(other)}).names == ("fox",)
    inline = dataset_classes({"root": str(root), "classes": ["x", "y"], "palette": [[1, 1, 1], [2, 2, 2]]})
    assert inline.names == ("x", "y") and inline.palette == ((1, 1, 1), (2, 2, 2)) and inline.own
    recoloured = dataset_classes({"root": str(root), "palette": [[9, 9, 9], [8, 8, 8]]})
    assert recoloured.names == ("cat", "dog") and recoloured.palette == ((9, 9, 9), (8, 8, 8))

    (root / "classes.yaml").write_text("classes: [cat]\n")
    assert "2 classes files (classes.txt, classes.yaml); keep one" in error_of(find_classes_file, root)
    nested = tmp_path / "ade" / "ADEChallengeData2016"
    nested.mkdir(parents=True)
    (nested / "classes.txt").write_text("a\n")
    assert find_classes_file(tmp_path / "ade") == nested / "classes.txt"
    assert find_classes_file("s3://bucket/data") is None
    assert "classes file does not exist" in error_of(read_classes_file, tmp_path / "missing.txt")


def test_config_settles_names_count_encoding_and_provenance(tmp_path: Path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "classes.txt").write_text("road 1 2 3\ncar 4 5 6\nsky 7 8 9\n")
    cfg = load_config(EXAMPLE, [f"data.root={root}"])
    assert list(cfg.data.classes) == ["road", "car", "sky"] and cfg.model.num_classes == 3
    assert [list(c) for c in cfg.data.palette] == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert cfg.data.reduce_zero_label is False and cfg.data.classes_file == str(root / "classes.txt")
    assert class_names(cfg) == ("road", "car", "sky")
    assert load_config(EXAMPLE, [f"data.root={root}", "data.reduce_zero_label=true"]).data.reduce_zero_label

    (root / "classes.txt").unlink()  # a settled config (a checkpoint's) needs no file any more
    from omegaconf import OmegaConf

    from knetlab.platform.config import config_from_container

    again = config_from_container(OmegaConf.to_container(cfg), source="ckpt/config.yaml")
    assert class_names(again) == ("road", "car", "sky") and again.model.num_classes == 3

    smoke = load_config(REPO / "experiments" / "smoke.yaml", [f"data.root={tmp_path / 'none'}"])
    assert smoke.model.num_classes == 150 and list(smoke.data.classes) == [] and smoke.data.reduce_zero_label
    assert class_names(smoke) == ADE20K_CLASSES


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["model.num_classes=4"], "model.num_classes: 4, but the dataset names 2 classes"),
    (["data.classes=[a,a]"], "data.classes: class name 'a' appears twice"),
    (["data.classes=[a,b]", "data.palette=[[1,2,3]]"], "data.palette: 1 palette colours for 2 classes"),
    (["data.classes_file=/no/such/classes.txt"], "/no/such/classes.txt: classes file does not exist"),
    (["data.classes_file=s3://key:secret@bucket/c.txt"], "credentials in the URI are refused"),
    (["model.name=tiny-panoptic", "data.classes=[a]"], "data.classes: applies to semantic datasets"),
    (["data.classes=[a]", "data.reduce_zero_label=true", "model.num_classes=255"], None),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path: Path, overrides: list[str], fragment: str | None):
    root = tmp_path / "two"
    root.mkdir()
    (root / "classes.txt").write_text("a\nb\n")
    with pytest.raises((ConfigError, DatasetError)) as info:
        load_config(EXAMPLE, [f"data.root={root}", *overrides])
    message = str(info.value)
    assert "\n" not in message and "secret" not in message
    assert fragment is None or fragment in message, message


def test_reduce_zero_label_is_refused_with_255_classes(tmp_path: Path):
    names = ",".join(f"c{i}" for i in range(255))
    with pytest.raises(ConfigError, match=r"data\.reduce_zero_label: true with 255 classes"):
        load_config(EXAMPLE, [f"data.root={tmp_path}", f"data.classes=[{names}]", "data.reduce_zero_label=true"])
    assert load_config(EXAMPLE, [f"data.root={tmp_path}", f"data.classes=[{names}]"]).model.num_classes == 255


def test_metric_names_are_mlflow_safe_and_distinct():
    assert metric_names(("traffic cone", "a&b", "a_b", "x/y", "..", "é")) == \
        ["traffic cone", "a_b", "a_b_2", "x/y", "_", "é"]
