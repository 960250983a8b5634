"""`knetlab predict` and the MLflow model's inference (knetlab.platform.predictor) on checkpoints of the tiny models
with random weights: the files per image, batching, slide and multi-scale + flip, large images, s3:// inputs,
panoptic and instance outputs, and the end-of-run model logging when MLflow does not answer. The trained end-to-end
path (train, register, predict, pyfunc in a fresh process) is tests/test_use_model_e2e.py."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import REPO_ROOT

SMOKE = REPO_ROOT / "experiments" / "smoke.yaml"
SMOKE_PANOPTIC = REPO_ROOT / "experiments" / "smoke-panoptic.yaml"


def write_checkpoint(directory: Path, experiment: Path, *overrides: str) -> Path:
    """A checkpoint directory (model.pt, config.yaml, meta.json) of the experiment's model with random weights."""
    import torch

    from knetlab.models import build_segmentor
    from knetlab.platform.config import config_to_yaml, load_config

    cfg = load_config(experiment, list(overrides))
    torch.manual_seed(0)
    model = build_segmentor(cfg.model, load_weights=False)
    directory.mkdir(parents=True)
    torch.save(model.state_dict(), directory / "model.pt")
    (directory / "config.yaml").write_text(config_to_yaml(cfg))
    (directory / "meta.json").write_text(json.dumps({"iteration": 4, "metrics": {"val/mIoU": 1.0}}))
    return directory


def write_image(path: Path, height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image written as JPEG or PNG (by suffix); returns the pixels as read back (RGB)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[..., ::-1])
    return cv2.imread(str(path))[..., ::-1]


@pytest.fixture(scope="module")
def semantic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # one multi-scale ratio instead of six: --ms-flip runs 2 forward passes (the image and its flip)
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint_0000004", SMOKE, "eval.ms_ratios=[1.0]")


def test_upsample_argmax_in_bands_equals_the_full_resize() -> None:
    import torch

    from knetlab.evaluation.inference import resize_logits, upsample_argmax

    scores = torch.randn(2, 7, 13, 17, generator=torch.Generator().manual_seed(0))
    for size in ((100, 61), (13, 17), (14, 300)):
        expected = resize_logits(scores, size).argmax(dim=1)
        assert torch.equal(upsample_argmax(scores, size, band_elements=500), expected), size


def test_predict_writes_a_label_png_json_and_overlay_per_image(semantic_checkpoint: Path, tmp_path: Path) -> None:
    from knetlab.platform.cli_predict import run_predict

    images = {"a": write_image(tmp_path / "in" / "a.jpg", 120, 90, 0),
              "sub/b": write_image(tmp_path / "in" / "sub" / "b.png", 60, 200, 1)}
    (tmp_path / "in" / "notes.txt").write_text("not an image: ignored")
    summary = run_predict(str(semantic_checkpoint), [str(tmp_path / "in")], tmp_path / "out", batch_size=2)
    assert summary["predicted"] == 2 and not summary["failed"]
    for name, image in images.items():
        labels = cv2.imread(str(tmp_path / "out" / f"{name}.png"), cv2.IMREAD_UNCHANGED)
        overlay = cv2.imread(str(tmp_path / "out" / f"{name}.overlay.jpg"))
        assert labels.shape == image.shape[:2] and labels.dtype == np.uint8 and overlay.shape == image.shape
        info = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        present = {entry["id"]: entry["pixels"] for entry in info["classes"]}
        values, counts = np.unique(labels, return_counts=True)
        assert present == dict(zip(values.tolist(), counts.tolist()))
        assert info["classes"][0]["name"] in {"wall", "building", "sky"} or info["classes"][0]["name"]  # ADE20K names
        assert (info["height"], info["width"]) == image.shape[:2]


def test_batches_give_the_labels_of_single_images(semantic_checkpoint: Path) -> None:
    from knetlab.platform.predictor import load_predictor, predict_images

    predictor = load_predictor(str(semantic_checkpoint), device="cpu")
    rng = np.random.default_rng(0)
    images = [cv2.resize(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8), (80, 60)) for _ in range(3)]
    together = predict_images(predictor, images)
    for image, result in zip(images, together):
        assert np.array_equal(predict_images(predictor, [image])[0]["labels"], result["labels"])


def test_slide_and_ms_flip_and_a_large_image(semantic_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from knetlab.evaluation import inference
    from knetlab.platform.predictor import load_predictor, predict_images

    image = cv2.resize(np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8), (150, 70))
    single = load_predictor(str(semantic_checkpoint), device="cpu")
    expected = predict_images(single, [image])[0]["labels"]
    for options in ({"mode": "slide"}, {"ms_flip": True}):
        predictor = load_predictor(str(semantic_checkpoint), device="cpu", **options)
        assert predict_images(predictor, [image])[0]["labels"].shape == expected.shape
    # An image whose class maps at full size would pass the band limit (shrunk here to keep the test small) comes
    # back to full size band by band, with the labels of the one-piece resize.
    large = cv2.resize(image, (400, 200))
    whole = predict_images(single, [large])[0]["labels"]
    monkeypatch.setattr(inference, "UPSAMPLE_BAND_ELEMENTS", 150 * 400 * 10)
    assert np.array_equal(predict_images(single, [large])[0]["labels"], whole)


def test_outputs_never_overwrite_the_inputs(semantic_checkpoint: Path, tmp_path: Path) -> None:
    from knetlab.platform.cli_predict import run_predict
    from knetlab.platform.predict_inputs import PredictError

    write_image(tmp_path / "x.png", 40, 40, 2)
    with pytest.raises(PredictError, match="would overwrite"):
        run_predict(str(semantic_checkpoint), [str(tmp_path)], tmp_path)
    with pytest.raises(PredictError, match="no such file or folder"):
        run_predict(str(semantic_checkpoint), [str(tmp_path / "missing")], tmp_path / "out")


def test_predict_reads_an_s3_prefix_and_an_s3_checkpoint(semantic_checkpoint: Path, tmp_path: Path, s3_server) -> None:
    from knetlab.platform.cli_predict import run_predict

    s3 = s3_server.client()
    for name in ("photos/one.jpg", "photos/deeper/two.jpg", "other/three.jpg"):
        write_image(tmp_path / "img.jpg", 50, 70, len(name))
        s3.upload_file(str(tmp_path / "img.jpg"), s3_server.bucket, name)
    for name in ("model.pt", "config.yaml", "meta.json", "train_state.pt"):
        source = semantic_checkpoint / name
        s3.put_object(Bucket=s3_server.bucket, Key=f"ckpt/run/checkpoint_0000004/{name}",
                      Body=source.read_bytes() if source.exists() else b"optimizer state: never downloaded")
    # The run folder: its best checkpoint is used.
    run_predict(f"s3://{s3_server.bucket}/ckpt/run", [f"s3://{s3_server.bucket}/photos"], tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png")) == [
        "deeper/two.png", "one.png"]


@pytest.mark.parametrize("task", ["panoptic", "instance"])
def test_panoptic_and_instance_outputs(task: str, tmp_path: Path) -> None:
    from knetlab.evaluation.prediction_files import read_panoptic_png
    from knetlab.platform.cli_predict import run_predict

    checkpoint = write_checkpoint(tmp_path / "ckpt", SMOKE_PANOPTIC, f"model.name=tiny-{task}")
    image = write_image(tmp_path / "in" / "p.jpg", 90, 130, 3)
    run_predict(str(checkpoint), [str(tmp_path / "in")], tmp_path / "out")
    info = json.loads((tmp_path / "out" / "p.json").read_text())
    png = tmp_path / "out" / "p.png"
    ids = read_panoptic_png(png) if task == "panoptic" else cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
    assert ids.shape == image.shape[:2]
    assert cv2.imread(str(tmp_path / "out" / "p.overlay.jpg")).shape == image.shape
    segments = info["segments_info" if task == "panoptic" else "instances"]
    areas = {segment["id"]: segment["area"] for segment in segments}
    values, counts = np.unique(ids[ids > 0], return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == {k: v for k, v in areas.items() if v > 0}
    for segment in segments:
        assert segment["name"] and segment["category_id"] is not None and 0 <= segment["score"] <= 1


def test_a_run_ends_well_when_mlflow_does_not_answer_at_its_end(semantic_checkpoint: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    from conftest import free_port
    from omegaconf import OmegaConf

    from knetlab.platform.mlflow_model import log_model_at_end

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    cfg = OmegaConf.create({"tracking": {"log_model": True}, "storage": {"uri": str(semantic_checkpoint.parent)}})
    run = {"tracking_uri": f"http://127.0.0.1:{free_port()}", "run_id": "0123456789abcdef"}
    assert log_model_at_end(cfg, run, "run") is None
    out = capsys.readouterr().out
    assert "could not log the MLflow model of run 0123456789abcdef" in out
    assert "knetlab register 0123456789abcdef --name NAME" in out


@pytest.mark.slow
def test_register_logs_the_model_of_a_run_that_has_none(semantic_checkpoint: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A run trained with tracking.log_model=false (the smoke experiments): `register` logs its best checkpoint first;
    the model loads back and predicts what `predict_images` predicts. MLflow's fluent URI is left as it was."""
    import os

    import mlflow

    from knetlab.platform import tracking
    from knetlab.platform.mlflow_model import logged_model_id, register
    from knetlab.platform.predictor import load_predictor, predict_images

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment("register", uri)
    run_id = tracking.create_run(uri, experiment, "no-model", {"checkpoint_uri": str(semantic_checkpoint.parent)})
    assert logged_model_id(uri, run_id) is None
    result = register(run_id, "tiny-registered", "champion", tracking_uri=uri)
    assert result["version"] == "1" and logged_model_id(uri, run_id) == result["model_id"]
    assert "MLFLOW_TRACKING_URI" not in os.environ
    mlflow.set_tracking_uri(uri)
    try:
        model = mlflow.pyfunc.load_model("models:/tiny-registered@champion")
    finally:
        mlflow.set_tracking_uri(None)
    image = write_image(tmp_path / "i.png", 70, 90, 5)
    expected = predict_images(load_predictor(str(semantic_checkpoint), device="cpu"), [image])[0]["labels"]
    assert np.array_equal(model.predict(image[None])["labels"][0], expected)
