"""Pretrained backbone weights by source: a real HTTP server on loopback and a real S3-compatible server (moto) serve
weight files the tests write; fetched once into the node cache, their sha256 checked, every failure one line naming
the weights and how to supply a copy; the driver's check before any worker starts and what it reports."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from conftest import FileServer, free_port
from omegaconf import OmegaConf

from knetlab.models import PretrainedError, build_backbone, build_segmentor
from knetlab.models.weights import (
    REFERENCE_WEIGHTS,
    WeightsSource,
    fetch_weights,
    setting_problem,
    weights_source,
)
from knetlab.models.zoo import check_pretrained, pretrained_source


def tiny_weights_file(path: Path, seed: int = 0) -> tuple[dict[str, torch.Tensor], str]:
    """The tiny backbone's keys with random values, saved as torchvision saves a classifier (plus `fc`); its sha256."""
    generator = torch.Generator().manual_seed(seed)
    state = build_backbone("tiny", img_size=64).state_dict()
    weights = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + 3
               for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**weights, "fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)}, path)
    return weights, hashlib.sha256(path.read_bytes()).hexdigest()


def model_cfg(**values) -> dict:
    return {"name": "tiny", "num_classes": 150, "pretrained": None, "pretrained_sha256": None, "drop_path_rate": None,
            "overrides": {}, "init_checkpoint": None, **values}


def test_url_is_fetched_once_per_node_and_its_checksum_checked(file_server: FileServer, tmp_path: Path) -> None:
    weights, digest = tiny_weights_file(file_server.root / "models" / "tiny-0123abcd.pth")
    url = file_server.url("models/tiny-0123abcd.pth")
    cache = tmp_path / "cache"
    first = fetch_weights(WeightsSource(url, digest[:8]), cache)
    again = fetch_weights(WeightsSource(url, digest), cache)  # a full digest is checked against the recorded one
    assert file_server.gets == ["/models/tiny-0123abcd.pth"]  # downloaded once, then found in the cache
    assert first.path == again.path == cache / "http" / f"127.0.0.1_{file_server.port}" / "models" / "tiny-0123abcd.pth"
    assert first.sha256 == digest and first.checked and (first.path.parent / "tiny-0123abcd.pth.sha256").is_file()
    assert not list(first.path.parent.glob("*.partial-*"))

    model = build_segmentor(model_cfg(pretrained=url, pretrained_sha256=digest[:8], cache_dir=str(cache)))
    assert file_server.gets == ["/models/tiny-0123abcd.pth"]  # the model's build reads the node's copy
    state = model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())


def test_a_wrong_checksum_is_refused_and_nothing_is_cached(file_server: FileServer, tmp_path: Path) -> None:
    _, digest = tiny_weights_file(file_server.root / "w.pth")
    with pytest.raises(PretrainedError) as error:
        fetch_weights(WeightsSource(file_server.url("w.pth"), "deadbeef"), tmp_path / "cache")
    message = str(error.value)
    assert "\n" not in message and "w.pth: its sha256 " + digest in message
    assert "does not match model.pretrained_sha256=deadbeef" in message
    assert f"set model.pretrained_sha256={digest} (or null" in message
    assert [p.name for p in (tmp_path / "cache").rglob("*") if p.is_file()] == ["w.pth.lock"]
    # a cached copy of another file than the one expected now is fetched again
    fetch_weights(WeightsSource(file_server.url("w.pth"), None), tmp_path / "cache")
    _, new_digest = tiny_weights_file(file_server.root / "w.pth", seed=1)
    assert fetch_weights(WeightsSource(file_server.url("w.pth"), new_digest[:8]), tmp_path / "cache").sha256 == \
        new_digest
    assert file_server.gets == ["/w.pth"] * 3


def test_unreachable_weights_are_one_line_naming_them_and_how_to_supply_a_copy(file_server: FileServer,
                                                                               tmp_path: Path) -> None:
    for url, reason in ((file_server.url("pretrain/resnet50_v1c-2cccc1ad.pth"), "HTTP 404"),
                        (f"http://127.0.0.1:{free_port()}/pretrain/resnet50_v1c-2cccc1ad.pth", "ConnectionRefused")):
        with pytest.raises(PretrainedError) as error:
            fetch_weights(WeightsSource(url, "2cccc1ad"), tmp_path / "cache")
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"model.pretrained={url}: cannot be fetched (")
        assert reason in message
        assert "model.pretrained=/path/to/resnet50_v1c-2cccc1ad.pth (a local copy)" in message
        assert "model.pretrained=s3://BUCKET/PREFIX/resnet50_v1c-2cccc1ad.pth (an S3 mirror" in message
        assert "model.pretrained=none" in message
    with pytest.raises(PretrainedError, match=r"model.pretrained=/nowhere/w.pth: pretrained weights file does not "
                                              r"exist; download it where you can"):
        fetch_weights(WeightsSource("/nowhere/w.pth", None), tmp_path / "cache")


def test_s3_mirror_and_local_copy_are_checked_against_the_rows_checksum(s3_server, tmp_path: Path) -> None:
    _, digest = tiny_weights_file(tmp_path / "mirror" / "w.pth")
    s3_server.client().upload_file(str(tmp_path / "mirror" / "w.pth"), s3_server.bucket, "pretrain/w.pth")
    uri = f"s3://{s3_server.bucket}/pretrain/w.pth"
    fetched = fetch_weights(WeightsSource(uri, digest[:8]), tmp_path / "cache")
    assert fetched.path == tmp_path / "cache" / "s3" / s3_server.bucket / "pretrain" / "w.pth" and fetched.checked
    local = fetch_weights(WeightsSource(str(tmp_path / "mirror" / "w.pth"), digest[:8]), tmp_path / "cache")
    assert local.path == tmp_path / "mirror" / "w.pth" and local.sha256 == digest  # a local copy is read in place
    with pytest.raises(PretrainedError, match=r"w.pth: its sha256 [0-9a-f]{64} does not match "
                                              r"model.pretrained_sha256=00000000 \(a damaged or different file\)"):
        fetch_weights(WeightsSource(str(tmp_path / "mirror" / "w.pth"), "00000000"), tmp_path / "cache")
    with pytest.raises(PretrainedError, match=rf"model.pretrained=s3://{s3_server.bucket}/pretrain/none.pth: cannot "
                                              rf"be fetched \(.*404.*\); download it where you can"):
        fetch_weights(WeightsSource(f"s3://{s3_server.bucket}/pretrain/none.pth", None), tmp_path / "cache")


def test_null_means_the_models_reference_and_none_means_from_scratch() -> None:
    row = "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512"
    reference = REFERENCE_WEIGHTS["open-mmlab/resnet50_v1c"]
    assert pretrained_source(model_cfg(name=row)) == WeightsSource(reference.url, "2cccc1ad",
                                                                   "open-mmlab/resnet50_v1c")
    assert pretrained_source(model_cfg(name=row, pretrained="none")) is None
    assert pretrained_source(model_cfg(name=row, pretrained="None")) is None
    assert pretrained_source(model_cfg(name="tiny")) is None  # the tiny models have no reference weights
    # the reference's checksum follows its URL; another file needs its own (or none)
    assert weights_source(reference.url, None, "open-mmlab/resnet50_v1c").sha256 == "2cccc1ad"
    assert weights_source("/copy.pth", None, "open-mmlab/resnet50_v1c") == WeightsSource("/copy.pth", None)
    assert weights_source("/copy.pth", "ABCDEF12", None).sha256 == "abcdef12"
    assert setting_problem("ftp://host/w.pth", None)[0] == "model.pretrained"
    assert setting_problem(None, "2ccc")[0] == "model.pretrained_sha256"  # fewer than 8 digits is no checksum
    assert setting_problem(None, "z" * 64)[0] == "model.pretrained_sha256"
    assert setting_problem("s3://b/k.pth", "2cccc1ad") is None


def test_the_drivers_check_reports_what_loading_will_do_without_building_the_model(
        file_server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from knetlab.platform.config import load_config
    from knetlab.platform.trainer import check_pretrained_weights

    _, digest = tiny_weights_file(file_server.root / "tiny.pth")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("model:\n  name: tiny\ndata:\n  crop_size: 64\ntrainer:\n  max_iters: 10\n"
                          "schedule:\n  milestones: []\n")
    cfg = load_config(experiment, [f"model.pretrained={file_server.url('tiny.pth')}",
                                   f"model.cache_dir={tmp_path / 'cache'}"])
    weights, report = check_pretrained(cfg.model)
    assert weights.sha256 == digest and not weights.checked
    assert report.missing == [] and report.unexpected == ["fc.weight", "fc.bias"]
    assert report.summary() == (f"{report.loaded} tensors loaded (timm/torchvision ResNet layout), 0 missing, "
                                f"2 unused (fc.weight, fc.bias)")
    tags = check_pretrained_weights(cfg)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == (f"[knetlab] pretrained backbone: {file_server.url('tiny.pth')} (sha256 {digest}, not checked: no "
                    f"checksum known (model.pretrained_sha256)): {report.summary()}")
    assert tags == {"knetlab.pretrained": file_server.url("tiny.pth"), "knetlab.pretrained_sha256": digest,
                    "knetlab.pretrained_keys": report.summary()}
    assert check_pretrained_weights(OmegaConf.merge(cfg, {"model": {"pretrained": "none"}})) == {
        "knetlab.pretrained": "none"}
    assert "random initialisation (model.pretrained=none)" in capsys.readouterr().out

    # weights that do not fit fail here, in the driver, naming the keys
    torch.save({"encoder.weight": torch.zeros(3)}, file_server.root / "other.pth")
    bad = OmegaConf.merge(cfg, {"model": {"pretrained": file_server.url("other.pth")}})
    with pytest.raises(PretrainedError, match=r"other.pth: no key fits backbone 'tiny'"):
        check_pretrained_weights(bad)


def test_driver_paths_resolve_for_the_workers_but_home_and_none_stay(tmp_path: Path) -> None:
    from knetlab.platform.trainer import absolute_paths

    cfg = OmegaConf.create({"data": {"root": "data/x", "cache_dir": "~/cache"}, "storage": {"uri": "s3://b/k"},
                            "model": {"pretrained": "none", "init_checkpoint": None, "cache_dir": "~/.cache/w"}})
    resolved = absolute_paths(cfg, base=tmp_path)
    assert resolved.data.root == str(tmp_path / "data" / "x") and resolved.storage.uri == "s3://b/k"
    assert (resolved.data.cache_dir, resolved.model.cache_dir) == ("~/cache", "~/.cache/w")  # each node's own home
    assert resolved.model.pretrained == "none"
    assert absolute_paths(OmegaConf.merge(cfg, {"model": {"pretrained": "w.pth"}}), base=tmp_path).model.pretrained \
        == str(tmp_path / "w.pth")
