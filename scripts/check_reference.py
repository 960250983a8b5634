"""By-hand parity check of knetlab's K-Net against mmsegmentation 1.2.2 (not used by the tests).

Two halves in one file, run with two different Pythons:

1. In a scratch mmsegmentation 1.2.2 environment (how to build it, and the reference dump script REFERENCE_DUMP:
   docs/reference-check.md):
     $REF_VENV/bin/python REFERENCE_DUMP DUMPDIR [CONFIG ...]                         # the 7 K-Net models, float32
     $REF_VENV/bin/python scripts/check_reference.py --reference-dump REFERENCE_DUMP --dump-extra DUMPDIR [NAME ...]
     $REF_VENV/bin/python scripts/check_reference.py --reference-dump REFERENCE_DUMP --dump-swin DUMPDIR
   (--dump-extra: float64 logits, 1-thread logits, intermediates; --dump-swin: mmseg's SwinTransformer alone)
2. In knetlab's venv:
     .venv/bin/python scripts/check_reference.py DUMPDIR [NAME ...] [--parts]

A model dump (`<config>.pt`) holds mmseg's state dict (random weights), one input and mmseg's float32 eval-mode logits
at the input size. Its state dict goes through `knetlab.models.convert_mmseg_state_dict` into `create_model(name)`
(strict load), the input through the model in eval mode. The extra dump (`extra_<config>.pt`) adds, for the same
weights and input: mmseg's logits in float64 (knetlab is then run in float64 too), mmseg's float32 logits with 1
thread instead of 2 (how far the reference moves from itself under a different summation order: the float32 noise
floor), and mmseg's float32 intermediates (backbone maps, the kernel-generating head's feature map, each stage's
logits and kernels); `--parts` runs each knetlab part on mmseg's own inputs to it ("local") and the whole chain
("chained"). A Swin dump (`swin-backbone_<variant>.pt`) holds mmseg `SwinTransformer` weights, inputs of a few sizes
and its 4 outputs, checked through `convert_mmseg_swin_state_dict` and `build_swin`.

Errors: max |a - b| and the relative error max |a - b| / max |b|, b = mmseg's output; the bar is 1e-4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

RELATIVE_TOLERANCE = 1e-4

# mmseg configs/knet: Swin-T and Swin-L as the K-Net configs build them (window 7, patch 4, qkv bias, no abs. pos.)
SWIN_CONFIGS = {
    "swin-t": dict(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], drop_path_rate=0.3),
    "swin-l": dict(embed_dims=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], drop_path_rate=0.4),
}
# input sizes: the table's crops, and sizes where no stage is a multiple of 7, nor the image of the patch size 4
SWIN_DUMPS = {"swin-t": [(512, 512), (512, 683), (97, 131)], "swin-l": [(640, 640)]}


# ---------------------------------------------------------------------------------------------------------------
# Reference environment (mmsegmentation)


def import_reference_dump(path: Path):
    """The reference dump script (docs/reference-check.md) as a module: it stubs mmcv.ops, registers mmseg's modules
    and knows how the dumps' models were built."""
    import importlib.util

    if not path.is_file():
        raise SystemExit(f"--reference-dump {path}: no such file (the script that wrote the model dumps)")
    spec = importlib.util.spec_from_file_location("reference_dump", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_mmseg_model(reference, dump: dict):
    """The mmseg segmentor of a model dump, as reference-dump.py built it, with the dump's weights, in eval mode."""
    from mmengine.config import Config
    from mmseg.registry import MODELS

    cfg = Config.fromfile(os.path.join(reference.BASE, dump["name"] + ".py"))
    reference.sync_to_bn(cfg.model)
    cfg.model.pretrained = None
    if cfg.model.backbone.get("init_cfg"):
        cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model)
    model.load_state_dict(dump["state_dict"], strict=True)
    return model.eval()


def mmseg_parts(model, images):
    """mmseg's IterativeDecodeHead.forward step by step: backbone maps, feats, logits and kernels of every stage."""
    import torch

    head = model.decode_head
    with torch.no_grad():
        backbone = list(model.extract_feat(images))
        feats = head.kernel_generate_head._forward_feature(backbone)
        logits = [head.kernel_generate_head.cls_seg(feats)]
        weight = head.kernel_generate_head.conv_seg.weight.clone()
        kernels = [weight[None].expand(feats.size(0), *weight.size()).reshape(feats.size(0), weight.size(0), -1)]
        for update_head in head.kernel_update_head:
            stage_logits, stage_kernels = update_head(feats, kernels[-1], logits[-1])
            logits.append(stage_logits)
            kernels.append(stage_kernels.reshape(feats.size(0), stage_kernels.size(1), -1))
    return dict(backbone=backbone, feats=feats, stage_logits=logits, stage_kernels=kernels)


def dump_extra(dump_dir: Path, names: list[str], reference_dump: Path) -> None:
    """For each model dump: mmseg's float64 logits, its float32 logits with 1 thread, and its intermediates."""
    import torch

    reference = import_reference_dump(reference_dump)  # sets 2 threads, as the dumps were made
    for path in model_dump_paths(dump_dir, names):
        out = dump_dir / f"extra_{path.name}"
        if out.exists():
            continue
        dump = torch.load(path, map_location="cpu", weights_only=True)
        model = build_mmseg_model(reference, dump)
        images = dump["input"]
        height, width = images.shape[-2:]
        meta = [dict(img_shape=(height, width), pad_shape=(height, width), ori_shape=(height, width))]
        start = time.perf_counter()
        parts = mmseg_parts(model, images)
        with torch.no_grad():
            torch.set_num_threads(1)
            logits_1thread = model.encode_decode(images, meta)
            torch.set_num_threads(2)
            logits64 = model.double().encode_decode(images.double(), meta)
        torch.save(dict(kind="extra", name=dump["name"], parts=parts, logits_1thread=logits_1thread,
                        logits64=logits64), out)
        print(f"{dump['name']}: extra dump written in {time.perf_counter() - start:.0f}s", flush=True)
        del dump, model, parts


def dump_swin(out_dir: Path, reference_dump: Path) -> None:
    """mmseg SwinTransformer outputs for SWIN_DUMPS, with random, perturbed weights."""
    import torch

    import_reference_dump(reference_dump)
    from mmseg.models.backbones import SwinTransformer

    out_dir.mkdir(parents=True, exist_ok=True)
    for variant, sizes in SWIN_DUMPS.items():
        path = out_dir / f"swin-backbone_{variant}.pt"
        if path.exists():
            continue
        torch.manual_seed(0)
        model = SwinTransformer(window_size=7, mlp_ratio=4, qkv_bias=True, patch_norm=True, use_abs_pos_embed=False,
                                out_indices=(0, 1, 2, 3), **SWIN_CONFIGS[variant])
        model.init_weights()
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():  # mmseg initialises norms to 1/0 and biases to 0: perturb all so the mapping is tested
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
        model.eval()
        cases = []
        for height, width in sizes:
            images = torch.randn(1, 3, height, width, generator=generator)
            with torch.no_grad():
                cases.append(dict(input=images, outputs=model(images)))
        torch.save(dict(kind="swin-backbone", name=variant, state_dict=model.state_dict(), cases=cases), path)
        print(f"{variant}: Swin dump written ({', '.join(f'{h}x{w}' for h, w in sizes)})", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# knetlab's venv


def model_dump_paths(dump_dir: Path, names: list[str]) -> list[Path]:
    paths = sorted(p for p in dump_dir.glob("knet-*.pt"))
    return [p for p in paths if not names or any(n in p.stem for n in names)]


def errors(ours, reference) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64."""
    diff = (ours.double() - reference.double()).abs().max().item()
    return diff, diff / reference.double().abs().max().item()


def load_knetlab_model(dump: dict):
    from knetlab.models import convert_mmseg_state_dict, create_model

    model = create_model(dump["name"]).eval()
    model.load_state_dict(convert_mmseg_state_dict(dump["state_dict"], dump["name"]), strict=True)
    return model


def check_swin(path: Path) -> bool:
    import torch

    from knetlab.models.swin import build_swin, convert_mmseg_swin_state_dict

    dump = torch.load(path, map_location="cpu", weights_only=True)
    model = build_swin(dump["name"], img_size=224, drop_path_rate=0.0).eval()
    model.load_state_dict(convert_mmseg_swin_state_dict(dump["state_dict"]), strict=True)
    passed = True
    for case in dump["cases"]:
        with torch.no_grad():
            outputs = model(case["input"])
        size = "x".join(map(str, case["input"].shape[-2:]))
        for i, (ours, reference) in enumerate(zip(outputs, case["outputs"], strict=True)):
            if ours.shape != reference.shape:
                raise SystemExit(f"{path}: {size} stage {i}: shape {tuple(ours.shape)}, mmseg {tuple(reference.shape)}")
            max_abs, relative = errors(ours, reference)
            passed &= relative < RELATIVE_TOLERANCE
            print(f"{dump['name']} backbone {size} stage {i:<23} {max_abs:10.2e} {relative:10.2e}", flush=True)
    return passed


def print_parts(model, dump: dict, parts: dict) -> None:
    import torch

    from knetlab.models.heads import resize

    head = model.decode_head.kernel_generate_head
    update_heads = model.decode_head.kernel_update_head

    def row(part: str, ours, reference) -> None:
        max_abs, relative = errors(ours, reference)
        print(f"    {part:<52} {max_abs:10.2e} {relative:10.2e}", flush=True)

    with torch.no_grad():
        backbone = model.backbone(dump["input"])
        for i, (ours, reference) in enumerate(zip(backbone, parts["backbone"], strict=True)):
            row(f"backbone level {i}", ours, reference)
        row("generate-head feats, local", head.forward_feature(parts["backbone"]), parts["feats"])
        feats = head.forward_feature(backbone)
        row("generate-head feats, chained", feats, parts["feats"])
        row("s0 logits, local", head.cls_seg(parts["feats"]), parts["stage_logits"][0])
        logits, kernels = head.cls_seg(feats), parts["stage_kernels"][0]
        row("s0 logits, chained", logits, parts["stage_logits"][0])
        for i, update_head in enumerate(update_heads):
            local = update_head(parts["feats"], parts["stage_kernels"][i], parts["stage_logits"][i])
            row(f"s{i + 1} logits, local", local[0], parts["stage_logits"][i + 1])
            row(f"s{i + 1} kernels, local", local[1], parts["stage_kernels"][i + 1])
            logits, kernels = update_head(feats, kernels, logits)
            row(f"s{i + 1} logits, chained", logits, parts["stage_logits"][i + 1])
            row(f"s{i + 1} kernels, chained", kernels, parts["stage_kernels"][i + 1])
        row("logits at the input size, chained", resize(logits, dump["input"].shape[-2:]), dump["logits"])


def check_model(path: Path, show_parts: bool) -> bool:
    """Print one row: float32 errors, mmseg's own float32 noise, float64 errors. "ok": the float32 relative error is
    under the bar; "ok in f64 only": it is not, but the float64 one is (the same function, float32 rounding amplified
    beyond the bar, as mmseg's own noise column shows); "FAIL": neither."""
    import torch

    dump = torch.load(path, map_location="cpu", weights_only=True)
    extra_path = path.with_name(f"extra_{path.name}")
    extra = torch.load(extra_path, map_location="cpu", weights_only=True) if extra_path.exists() else None
    model = load_knetlab_model(dump)
    start = time.perf_counter()
    with torch.no_grad():
        logits = model(dump["input"])
    seconds = time.perf_counter() - start
    if logits.shape != dump["logits"].shape:
        raise SystemExit(f"{path}: knetlab logits {tuple(logits.shape)}, mmseg {tuple(dump['logits'].shape)}")
    max_abs, relative = errors(logits, dump["logits"])
    noise = relative64 = float("nan")
    if extra is not None:
        noise = errors(extra["logits_1thread"], dump["logits"])[1]
        if show_parts:
            print(f"  {dump['name']}: parts (max |a-b|, relative; b = mmseg float32)")
            print_parts(model, dump, extra["parts"])
        with torch.no_grad():
            relative64 = errors(model.double()(dump["input"].double()), extra["logits64"])[1]
    if relative < RELATIVE_TOLERANCE:
        verdict = "ok"
    elif relative64 < RELATIVE_TOLERANCE:
        verdict = "ok in f64 only (f32 over the bar)"
    else:
        verdict = "FAIL"
    print(f"{dump['name']:<56} {max_abs:10.2e} {relative:10.2e} {noise:10.2e} {relative64:10.2e} {seconds:6.1f}  "
          f"{verdict}", flush=True)
    return verdict != "FAIL"


def compare(dump_dir: Path, names: list[str], show_parts: bool) -> int:
    import torch

    torch.set_num_threads(2)
    swin_paths = sorted(p for p in dump_dir.glob("swin-backbone_*.pt") if not names or any(n in p.stem for n in names))
    model_paths = model_dump_paths(dump_dir, names)
    if not swin_paths and not model_paths:
        raise SystemExit(f"{dump_dir}: no dumps (knet-*.pt, swin-backbone_*.pt) found" + (f" for {names}" if names
                                                                                            else ""))
    failed = 0
    if swin_paths:
        print(f"{'Swin backbone alone, float32':<56} {'max|a-b|':>10} {'rel. err':>10}")
        failed += sum(not check_swin(p) for p in swin_paths)
    if model_paths:
        print(f"{'model (logits at the input size)':<56} {'f32 max|d|':>10} {'f32 rel':>10} {'mmseg f32':>10} "
              f"{'f64 rel':>10} {'f32 s':>6}")
        print(f"{'':<56} {'':>10} {'':>10} {'1 vs 2 thr':>10}")
        failed += sum(not check_model(p, show_parts) for p in model_paths)
    print(f"relative error = max|knetlab - mmseg| / max|mmseg|, bar {RELATIVE_TOLERANCE:g}: "
          f"{'every row passes' if not failed else f'{failed} row(s) fail'}")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump_dir", type=Path, help="folder of reference dumps")
    parser.add_argument("names", nargs="*", help="only dumps whose file name contains one of these")
    parser.add_argument("--parts", action="store_true", help="also compare every part of each model (needs extra_*)")
    parser.add_argument("--dump-extra", action="store_true",
                        help="reference env: write float64 logits, 1-thread logits and intermediates per model dump")
    parser.add_argument("--dump-swin", action="store_true",
                        help="reference env: write mmseg SwinTransformer dumps into DUMP_DIR")
    parser.add_argument("--reference-dump", type=Path, metavar="PATH",
                        help="with --dump-extra/--dump-swin: the reference dump script that wrote the model dumps")
    args = parser.parse_args()
    if (args.dump_swin or args.dump_extra) and args.reference_dump is None:
        parser.error("--dump-extra and --dump-swin need --reference-dump PATH (see docs/reference-check.md)")
    if args.dump_swin:
        dump_swin(args.dump_dir, args.reference_dump)
        return 0
    if args.dump_extra:
        dump_extra(args.dump_dir, args.names, args.reference_dump)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    return compare(args.dump_dir, args.names, args.parts)


if __name__ == "__main__":
    sys.exit(main())
