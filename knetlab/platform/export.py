"""`knetlab export`: a trained model as an ONNX file (torch.onnx's dynamo exporter) or a TorchScript file
(torch.jit.trace), with dynamic height and width, the preprocessing contract in the file's metadata, and a check of
the exported model against PyTorch (onnxruntime for ONNX) on two input sizes.

What the file holds is the network: normalised images (1, 3, H, W) -> semantic logits (1, C, H, W), or for panoptic
and instance models the last stage's class logits (1, N, C) and stride-4 mask logits (1, N, H/4, W/4). What it does
not hold, and why:
- the resize into eval.test_scale, the normalisation and padding: preprocessing, written into the metadata;
- sliding-window and multi-scale + flip testing: loops over windows and scales around the network (the caller runs
  the network per window or scale; eval.mode/crop/stride/ms_ratios are in the metadata);
- the panoptic fusion and the instance top-k: a loop over segments whose count depends on the scores, in Python
  (`knetlab.models.panoptic_fusion`, the same code `knetlab predict` runs on these outputs);
- batches larger than 1: each image's masks come from a convolution with that image's own kernels, written as a
  Python loop over the batch, which tracing unrolls; the files take one image per call.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from knetlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from knetlab.models.errors import ModelError

EXPORT_FORMATS = ("onnx", "torchscript")
METADATA_KEY = "knetlab"  # ONNX metadata_props key / TorchScript extra file "knetlab.json"
TOLERANCE = 1e-4  # largest accepted max|exported - PyTorch| / max|PyTorch|
MAX_SIDE = 8192


class ExportError(ModelError):
    """A model that does not export, or whose exported output differs from PyTorch's (exit code 2)."""


class RawOutputs(torch.nn.Module):
    """A panoptic/instance detector's network part: images -> (cls_logits, mask_logits), before post-processing."""

    def __init__(self, detector: torch.nn.Module) -> None:
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.detector.raw_outputs(images)
        return outputs["cls_logits"], outputs["mask_logits"]


def network(model: torch.nn.Module, task: str) -> torch.nn.Module:
    return (model if task == "semantic" else RawOutputs(model)).eval()


def size_rules(model: torch.nn.Module, task: str) -> tuple[int, int]:
    """(minimum side, side divisor) of the exported network's input."""
    if task != "semantic":
        from knetlab.models.knet_detector import SIZE_DIVISOR

        return SIZE_DIVISOR, SIZE_DIVISOR
    backbone = model.backbone
    return int(getattr(backbone, "min_input_size", 32)), int(getattr(backbone, "input_size_divisor", 1))


def check_sizes(min_side: int, divisor: int) -> list[tuple[int, int]]:
    """Two small input sizes of different aspect ratios that the network takes (the check's)."""
    def fit(side: float) -> int:
        side = max(int(side), min_side)
        return -(-side // divisor) * divisor

    base = max(64, min_side)
    return [(fit(base), fit(base * 1.5)), (fit(base * 1.25), fit(base * 1.125))]


def contract(cfg: DictConfig, model: torch.nn.Module, task: str, fmt: str) -> dict[str, Any]:
    """The preprocessing contract and what the outputs mean: the metadata of the exported file."""
    from knetlab.platform.class_names import class_names, class_palette

    min_side, divisor = size_rules(model, task)
    test_scale = [int(v) for v in cfg.eval.test_scale]
    outputs = ({"logits": "(1, num_classes, H, W) at the input size; label = argmax over classes after resizing the "
                          "logits (bilinear, align_corners=False) to the original image size"}
               if task == "semantic" else
               {"cls_logits": "(1, N, num_classes) per mask kernel, before sigmoid",
                "mask_logits": "(1, N, H/4, W/4) per mask kernel, before sigmoid; the panoptic fusion / instance "
                               "top-k (knetlab.models.panoptic_fusion) turns them into segments"})
    return {
        "format": f"knetlab-{fmt}/1",
        "model": str(cfg.model.name), "task": task, "num_classes": len(class_names(cfg)),
        "class_names": class_names(cfg), "palette": class_palette(cfg).tolist(),
        "input": {
            "name": "images", "layout": "NCHW", "dtype": "float32", "batch": 1, "colour": "RGB",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "normalise": "(pixel - mean) / std on 0-255 RGB values",
            "resize": f"keep the aspect ratio and fit the image into {test_scale} (long, short side): factor = "
                      "min(long / max(h, w), short / min(h, w)), sides int(side * factor + 0.5), bilinear",
            "test_scale": test_scale, "min_side": min_side, "size_divisor": divisor,
            "pad": (f"zero-pad bottom and right after normalising to a multiple of {divisor}" if divisor > 1
                    else "none needed"),
        },
        "outputs": outputs,
        "eval": OmegaConf.to_container(cfg.eval, resolve=True),
        "not_exported": __doc__.split("not hold, and why:\n", 1)[1].strip(),
    }


def export_model(model_uri: str, fmt: str, out: str | Path, *, tolerance: float = TOLERANCE) -> dict[str, Any]:
    """Export the model at `model_uri` (see model_source) to `out` and check it; returns the contract and the
    check's figures. Raises ExportError when the export fails or the check exceeds `tolerance`."""
    from knetlab.platform.checkpoint import load_model_from_checkpoint
    from knetlab.platform.model_source import fetch_checkpoint
    from knetlab.platform.task_family import task_of

    if fmt not in EXPORT_FORMATS:
        raise ExportError(f"--format {fmt!r}: valid formats are {', '.join(EXPORT_FORMATS)}")
    model, cfg = load_model_from_checkpoint(str(fetch_checkpoint(model_uri)))
    task = task_of(cfg)
    net = network(model, task)
    meta = contract(cfg, model, task, fmt)
    sizes = check_sizes(meta["input"]["min_side"], meta["input"]["size_divisor"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    example = torch.randn(1, 3, *sizes[0])
    try:
        run = (export_onnx if fmt == "onnx" else export_torchscript)(net, example, out, meta, task)
    except ExportError:
        raise
    except Exception as error:  # the exporters' own errors, e.g. an operator without an ONNX translation
        reason = " ".join(str(error).split())[:400]
        raise ExportError(f"{cfg.model.name} does not export to {fmt}: {type(error).__name__}: {reason}") from None
    seconds = time.perf_counter() - start
    checks = []
    for size in sizes:
        images = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(size[0] * 7919 + size[1]))
        with torch.no_grad():
            expected = [t.numpy() for t in as_tuple(net(images))]
        got = run(images.numpy())
        diff = max(float(np.abs(g - e).max()) for g, e in zip(got, expected))
        scale = max(float(np.abs(e).max()) for e in expected) or 1.0
        checks.append({"size": list(size), "max_abs_diff": diff, "max_rel_diff": diff / scale})
    print(f"[knetlab] exported {cfg.model.name} ({task}) to {out} ({fmt}, {out.stat().st_size / 1e6:.1f} MB, "
          f"{seconds:.0f}s)")
    for check in checks:
        print(f"[knetlab] check {check['size'][0]}x{check['size'][1]}: max |exported - PyTorch| "
              f"{check['max_abs_diff']:.3g} (relative to max |PyTorch| {check['max_rel_diff']:.3g})")
    worst = max(check["max_rel_diff"] for check in checks)
    if not worst <= tolerance:
        raise ExportError(f"{out}: the exported model differs from PyTorch by {worst:.3g} (relative), more than "
                          f"the tolerance {tolerance:g}")
    return {"contract": meta, "checks": checks, "seconds": seconds}


def as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return output if isinstance(output, tuple) else (output,)


def export_onnx(net: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict, task: str) -> Any:
    """torch.onnx's dynamo exporter with symbolic H and W (multiples of the size divisor); returns a runner
    (onnxruntime on CPU) for the check."""
    import onnxruntime
    from torch.export import Dim

    divisor, min_side = meta["input"]["size_divisor"], meta["input"]["min_side"]
    if divisor > 1:
        dims = {2: divisor * Dim("h_blocks", min=max(1, min_side // divisor), max=MAX_SIDE // divisor),
                3: divisor * Dim("w_blocks", min=max(1, min_side // divisor), max=MAX_SIDE // divisor)}
    else:
        dims = {2: Dim("height", min=min_side, max=MAX_SIDE), 3: Dim("width", min=min_side, max=MAX_SIDE)}
    output_names = ["logits"] if task == "semantic" else ["cls_logits", "mask_logits"]
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes={"images": dims}, strict=False)
    onnx_program = torch.onnx.export(program, (example,), dynamo=True, input_names=["images"],
                                     output_names=output_names, optimize=False, verbose=False)
    onnx_program.model.metadata_props[METADATA_KEY] = json.dumps(meta)
    for key in ("mean", "std"):
        onnx_program.model.metadata_props[key] = json.dumps(meta["input"][key])
    onnx_program.model.metadata_props["class_names"] = json.dumps(meta["class_names"])
    onnx_program.save(str(out))
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})


def export_torchscript(net: torch.nn.Module, example: torch.Tensor, out: Path, meta: dict, task: str) -> Any:
    """torch.jit.trace (H and W stay symbolic: the network takes them from the input's shape), wrapped in a
    scripted check that refuses a batch other than 1; the contract is the extra file knetlab.json."""
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings of input checks, and torch.jit's deprecation notice
        traced = torch.jit.trace(net, (example,), check_trace=False)
        scripted = torch.jit.script((OneImage if task == "semantic" else OneImagePair)(traced))
        torch.jit.save(scripted, str(out), _extra_files={f"{METADATA_KEY}.json": json.dumps(meta)})
        loaded = torch.jit.load(str(out))

    def run(images: np.ndarray) -> list[np.ndarray]:
        with torch.no_grad():
            return [t.numpy() for t in as_tuple(loaded(torch.from_numpy(images)))]

    return run


class OneImage(torch.nn.Module):
    """Refuses batches other than 1 (the traced network is unrolled for one image)."""

    def __init__(self, traced: torch.nn.Module) -> None:
        super().__init__()
        self.traced = traced

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] != 1:
            raise RuntimeError("this knetlab TorchScript model takes one image per call: images (1, 3, H, W)")
        return self.traced(images)


class OneImagePair(OneImage):
    """OneImage for the detectors' (cls_logits, mask_logits)."""

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.shape[0] != 1:
            raise RuntimeError("this knetlab TorchScript model takes one image per call: images (1, 3, H, W)")
        return self.traced(images)
