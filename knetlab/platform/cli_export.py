"""`knetlab export MODEL --format onnx|torchscript --out FILE`: the trained network as an ONNX or TorchScript file with
its preprocessing contract in the metadata, checked against PyTorch (knetlab/platform/export.py says what is in the
file and what is not)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> argparse.ArgumentParser:
    sub = commands.add_parser("export", help="export a trained model to ONNX or TorchScript",
                              description="export a trained model's network to ONNX or TorchScript (dynamic height "
                                          "and width, batch 1), the preprocessing contract in the file's metadata, "
                                          "checked against PyTorch on two input sizes")
    sub.add_argument("model", metavar="CHECKPOINT",
                     help="checkpoint directory or a run's checkpoint folder (local or s3://), runs:/RUN_ID or "
                          "models:/NAME@ALIAS")
    sub.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="file format")
    sub.add_argument("--out", required=True, metavar="FILE", help="file to write (e.g. model.onnx, model.pt)")
    sub.add_argument("--tolerance", type=float, default=1e-4, metavar="REL",
                     help="largest accepted max|exported - PyTorch| / max|PyTorch| (default 1e-4)")
    sub.set_defaults(handler=cmd_export)
    return sub


def cmd_export(args: argparse.Namespace) -> int:
    from knetlab.platform.export import export_model

    export_model(args.model, args.format, args.out, tolerance=args.tolerance)
    return 0
