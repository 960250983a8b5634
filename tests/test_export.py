"""`knetlab export`: ONNX (checked in onnxruntime) and TorchScript files of the tiny model, of the panoptic tiny model's
network and of one R-50 table row (random weights) match PyTorch within 1e-4 relative error on two input sizes, carry
the preprocessing contract in their metadata and take any height and width. Each export takes seconds to tens of
seconds on 2 CPU cores: marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_predict import SMOKE, SMOKE_PANOPTIC, write_checkpoint

R50_ROW = REPO_ROOT / "experiments" / "ade20k" / "knet-s3_r50-d8_fcn_8xb2-adamw-80k_ade20k-512x512.yaml"


def check_file(fmt: str, path: Path, result: dict, num_classes: int) -> None:
    """Two sizes within 1e-4; the contract in the file; a third size runs; TorchScript refuses a batch of 2."""
    assert len(result["checks"]) == 2 and result["checks"][0]["size"] != result["checks"][1]["size"]
    assert all(check["max_rel_diff"] <= 1e-4 for check in result["checks"]), result["checks"]
    if fmt == "onnx":
        import onnx
        import onnxruntime

        metadata = {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}
        contract = json.loads(metadata["knetlab"])
        assert json.loads(metadata["mean"]) == [123.675, 116.28, 103.53]
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {"images": np.zeros((1, 3, 96, 128), np.float32)})
    else:
        import torch

        extra = {"knetlab.json": ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        contract = json.loads(extra["knetlab.json"])
        outputs = module(torch.zeros(1, 3, 96, 128))
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        with pytest.raises(Exception, match="one image per call"):
            module(torch.zeros(2, 3, 64, 64))
    assert len(contract["class_names"]) == num_classes == contract["num_classes"]
    assert contract["input"]["std"] == [58.395, 57.12, 57.375] and contract["input"]["batch"] == 1
    assert "panoptic fusion" in contract["not_exported"]
    if contract["task"] == "semantic":
        assert tuple(outputs[0].shape) == (1, num_classes, 96, 128)
    else:
        assert tuple(outputs[1].shape[-2:]) == (24, 32)  # mask logits at stride 4


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_tiny_model_exports(fmt: str, tmp_path: Path) -> None:
    from knetlab.platform.export import export_model

    checkpoint = write_checkpoint(tmp_path / "ckpt", SMOKE)
    out = tmp_path / f"tiny.{fmt}"
    check_file(fmt, out, export_model(str(checkpoint), fmt, out), 150)


@pytest.mark.slow
def test_panoptic_network_exports_to_onnx(tmp_path: Path) -> None:
    from knetlab.platform.export import export_model

    checkpoint = write_checkpoint(tmp_path / "ckpt", SMOKE_PANOPTIC)
    out = tmp_path / "panoptic.onnx"
    check_file("onnx", out, export_model(str(checkpoint), "onnx", out), 133)


@pytest.mark.slow
def test_r50_table_row_exports_to_onnx_and_torchscript(tmp_path: Path) -> None:
    from knetlab.platform.export import export_model

    checkpoint = write_checkpoint(tmp_path / "ckpt", R50_ROW)  # random weights: no pretrained file is read
    for fmt in ("onnx", "torchscript"):
        out = tmp_path / f"r50.{fmt}"
        check_file(fmt, out, export_model(str(checkpoint), fmt, out), 150)
