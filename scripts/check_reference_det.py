"""By-hand parity check of knetlab's panoptic/instance K-Net against the official K-Net repo on mmdet 2.28.2 (not
used by the tests).

    python scripts/check_reference_det.py DUMPDIR [NAME ...]

DUMPDIR holds the reference dumps `<config>.pt` (the K-Net repo's config stems, e.g. `knet_s3_r50_fpn_1x_coco.pt`):
seeded random weights (every parameter and BN statistic perturbed), one normalised padded input with its img_meta,
the FPN outputs, the kernel head's outputs, each stage's outputs, the post-processed result, and the same official
post-processing run on structured synthetic last-stage logits (`postproc`). Each dump's state dict goes through
`knetlab.models.convert_mmdet_state_dict` into `create_model(name)` (strict load); the input goes through the model
in eval mode. Printed per tensor: max |a - b| and the relative error max |a - b| / max |b| (b = the reference), for
the chained run (knetlab's own inputs all the way) and, per stage, the local run (the stage fed the reference's own
inputs to it). The bar is 1e-4 on every raw output; the post-processed results must be equal (panoptic: the
reference's `label + k * 1000` map via `reference_panoptic_map`; instance: labels, masks, and scores to 1e-6).
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

RELATIVE_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-6


def zoo_name(config: str) -> str:
    """'knet_s3_r101_dcn-c3-c5_fpn_ms-3x_coco' -> 'knet-s3_r101-dcn-c3-c5_fpn_ms-3x_coco' (the zoo's names)."""
    return config.replace("knet_s3_", "knet-s3_", 1).replace("r101_dcn-c3-c5", "r101-dcn-c3-c5")


def load_dump(path: Path) -> dict:
    import numpy as np
    import torch

    # img_meta holds a numpy scale_factor and `versions` torch's version object: allow exactly the types needed
    safe = [np.core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.float32)),
            torch.torch_version.TorchVersion]
    with torch.serialization.safe_globals(safe):
        return torch.load(path, map_location="cpu", weights_only=True)


def errors(ours, reference) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64."""
    diff = (ours.double() - reference.double()).abs().max().item()
    return diff, diff / max(reference.double().abs().max().item(), 1e-30)


class Report:
    def __init__(self, config: str) -> None:
        self.config, self.passed, self.worst = config, True, 0.0

    def tensor(self, what: str, ours, reference, tolerance: float = RELATIVE_TOLERANCE) -> None:
        if tuple(ours.shape) != tuple(reference.shape):
            self.fail(what, f"shape {tuple(ours.shape)}, reference {tuple(reference.shape)}")
            return
        max_abs, relative = errors(ours, reference)
        ok = relative <= tolerance
        self.passed &= ok
        self.worst = max(self.worst, relative)
        print(f"  {what:<44} {max_abs:10.2e} {relative:10.2e}  {'ok' if ok else 'FAIL'}", flush=True)

    def equal(self, what: str, ours, reference) -> None:
        if tuple(ours.shape) != tuple(reference.shape):
            self.fail(what, f"shape {tuple(ours.shape)}, reference {tuple(reference.shape)}")
            return
        differing = int((ours != reference).sum())
        self.passed &= differing == 0
        print(f"  {what:<44} {'equal' if differing == 0 else f'{differing} elements differ  FAIL'}", flush=True)

    def fail(self, what: str, message: str) -> None:
        self.passed = False
        print(f"  {what:<44} {message}  FAIL", flush=True)


def check_result(report: Report, model, result: dict, reference: dict, label: str) -> None:
    from knetlab.models import reference_panoptic_map

    if model.task == "panoptic":
        pan = reference_panoptic_map(result, model.num_classes)
        report.equal(f"{label}: panoptic map", pan, reference["pan"])
        print(f"  {'':<44} {len(result['segments'])} segments "
              f"({sum(s['isthing'] for s in result['segments'])} things)")
    else:
        report.equal(f"{label}: labels", result["labels"], reference["labels"])
        report.tensor(f"{label}: scores", result["scores"], reference["scores"], SCORE_TOLERANCE)
        report.equal(f"{label}: masks", result["masks"], reference["masks"])
        print(f"  {'':<44} {len(result['labels'])} instances, {int(result['masks'].any((1, 2)).sum())} non-empty")


def check(path: Path) -> bool:
    import torch

    from knetlab.models import convert_mmdet_state_dict, create_model

    dump = load_dump(path)
    name = zoo_name(dump["name"])
    report = Report(dump["name"])
    print(f"{dump['name']} -> {name} (reference: {dump['versions']})", flush=True)
    model = create_model(name).eval()
    model.load_state_dict(convert_mmdet_state_dict(dump["state_dict"], name, source=str(path)), strict=True)
    x, meta = dump["input"], dump["img_meta"]
    metas = [{"img_shape": tuple(meta["img_shape"][:2]), "ori_shape": tuple(meta["ori_shape"][:2])}]
    with torch.no_grad():
        neck = model.neck(model.backbone(x))
        for i, (ours, ref) in enumerate(zip(neck, dump["neck"], strict=True)):
            report.tensor(f"neck P{i + 2}", ours, ref)
        rpn = model.rpn_head(neck)
        ref_rpn = dump["rpn"]
        report.tensor("kernel head x_feats", rpn["x_feats"], ref_rpn["x_feats"])
        report.tensor("kernel head kernels", rpn["kernels"], ref_rpn["proposal_feats"])
        report.tensor("kernel head mask logits", rpn["mask_preds"], ref_rpn["mask_preds"])
        report.tensor("kernel head seg logits", rpn["seg_preds"], ref_rpn["seg_preds"])
        stages = model.roi_head(rpn["x_feats"], rpn["kernels"], rpn["mask_preds"])
        ref_inputs = [(ref_rpn["proposal_feats"], ref_rpn["mask_preds"])]
        ref_inputs += [(s["object_feats"], s["mask_preds"]) for s in dump["stages"][:-1]]
        for i, (ours, ref) in enumerate(zip(stages, dump["stages"], strict=True)):
            report.tensor(f"s{i} cls logits, chained", ours["cls_logits"], ref["cls_score"])
            report.tensor(f"s{i} mask logits, chained", ours["mask_preds"], ref["mask_preds"])
            report.tensor(f"s{i} kernels, chained", ours["kernels"], ref["object_feats"])
            cls_local, masks_local, kernels_local = model.roi_head.mask_head[i](ref_rpn["x_feats"], *ref_inputs[i])
            report.tensor(f"s{i} cls logits, local", cls_local, ref["cls_score"])
            report.tensor(f"s{i} mask logits, local", masks_local, ref["mask_preds"])
            report.tensor(f"s{i} kernels, local", kernels_local, ref["object_feats"])
        report.tensor("last stage stride-4 mask logits", stages[-1]["scaled_mask_logits"],
                      dump["stages"][-1]["scaled_mask_preds"])

        start = time.perf_counter()
        result = model(x, metas)[0]
        seconds = time.perf_counter() - start
        check_result(report, model, result, dump["result"], "result")
        synthetic = dump["postproc"]
        outputs = {"cls_logits": synthetic["cls_logits"], "mask_logits": synthetic["mask_logits"]}
        check_result(report, model, model.postprocess(outputs, tuple(x.shape[-2:]), metas)[0], synthetic["result"],
                     "synthetic postproc")
    print(f"  test call {seconds:.2f} s (reference min {dump['seconds']['test']:.2f} s); worst relative error "
          f"{report.worst:.2e}: {'PASS' if report.passed else 'FAIL'}", flush=True)
    return report.passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump_dir", type=Path, help="folder of the reference dumps (<config>.pt)")
    parser.add_argument("names", nargs="*", help="only the dumps whose name contains one of these")
    args = parser.parse_args(argv)
    paths = sorted(p for p in args.dump_dir.glob("knet_s3_*.pt") if not args.names
                   or any(n in p.stem for n in args.names))
    if not paths:
        print(f"{args.dump_dir}: no reference dump (knet_s3_*.pt) found", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(2)  # as the reference dumps ran
    results = [check(path) for path in paths]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
