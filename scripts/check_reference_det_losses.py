"""By-hand parity check of knetlab's panoptic/instance K-Net losses against the official K-Net code on mmdet 2.28.2
(never imported by the tests).

    .venv/bin/python scripts/check_reference_det_losses.py --reference-python REF_VENV/bin/python \
        --knet-src K_NET_CHECKOUT [--out DIR] [--seeds 0 1 2]

REF_VENV is a scratch environment with mmdet 2.28.2, mmcv 1.7.2 (lite, no compiled ops) and a CPU torch;
K_NET_CHECKOUT is ZwwWayne/K-Net at 5e50ee5 (its `knet/` and `configs/det/`). The script makes random cases (batch 2,
64 x 96 padded images, COCO's 80 + 53 classes, 100 proposals, 3 stages; stride-8 prediction logits that partly follow
the ground truth; rectangles as instances, stuff regions, a crowd region, VOID and padding in the semantic map; one
image without instances), saves them, and computes the losses twice:
- knetlab: the stride-8 logits upsampled x2 (bilinear, align_corners=False, as the model does) into
  `knet_det_losses`;
- the reference, in REF_VENV (this same file with --run-reference): the config's detector built with its train_cfg,
  the network replaced by the saved logits (`extract_feat`, `ConvKernelHead._decode_init_proposals` and
  `KernelIterHead._mask_forward` patched), then the official `KNet.forward_train` with BitmapMasks and the padded
  semantic maps: its own target building (bilinear downsampling, sem2ins_masks), assigners, samplers, get_targets and
  losses.
It prints every loss side by side with |diff| and the relative difference, and whether every Hungarian matching
(kernel head and each stage, per image) picked the same pairs. Exit status 0 when all match to 1e-5 relative.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import os
import subprocess
import sys
import tempfile
import types

import torch
import torch.nn.functional as F

PAD_HW = (64, 96)
IMAGE_HW = (56, 88)  # the rest is padding: masks 0, sem_seg 255
NUM_THING, NUM_STUFF, NUM_PROPOSALS, NUM_STAGES = 80, 53, 100, 3
CONFIGS = {"panoptic": "knet_s3_r50_fpn_1x_coco-panoptic", "instance": "knet_s3_r50_fpn_1x_coco"}
RELATIVE_TOLERANCE = 1e-5


def random_rect(gen: torch.Generator, min_size: int, max_size: int) -> tuple[slice, slice]:
    h, w = (int(torch.randint(min_size, max_size, (1,), generator=gen)) for _ in range(2))
    y = int(torch.randint(0, IMAGE_HW[0] - h, (1,), generator=gen))
    x = int(torch.randint(0, IMAGE_HW[1] - w, (1,), generator=gen))
    return slice(y, y + h), slice(x, x + w)


def make_image(gen: torch.Generator, num_instances: int, panoptic: bool) -> dict:
    """Disjoint instances (an id map painted in order), stuff regions under them, a crowd region, VOID, padding."""
    sem = torch.full(PAD_HW, 255, dtype=torch.long)
    ids = torch.full(PAD_HW, -1, dtype=torch.long)
    if panoptic:
        stuff_pool = torch.randperm(NUM_STUFF, generator=gen)[:4] + NUM_THING
        sem[: IMAGE_HW[0], : IMAGE_HW[1]] = int(stuff_pool[0])
        for label in stuff_pool[1:]:
            sem[random_rect(gen, 10, 40)] = int(label)
        sem[random_rect(gen, 4, 12)] = 255  # VOID inside the image
        sem[random_rect(gen, 6, 14)] = int(torch.randint(0, NUM_THING, (1,), generator=gen))  # a crowd region
    labels = torch.randint(0, NUM_THING, (num_instances,), generator=gen)
    for i in range(num_instances):
        ids[random_rect(gen, 6, 28)] = i
    masks = torch.stack([ids == i for i in range(num_instances)]) if num_instances else torch.zeros(0, *PAD_HW).bool()
    keep = masks.flatten(1).any(1)
    masks, labels = masks[keep], labels[keep]
    for mask, label in zip(masks, labels):
        sem[mask] = int(label)
    return {"masks": masks, "labels": labels, "sem_seg": sem if panoptic else None}


def make_case(seed: int, task: str, instances: tuple[int, int]) -> dict:
    gen = torch.Generator().manual_seed(seed)
    panoptic = task == "panoptic"
    num_stuff = NUM_STUFF if panoptic else 0
    num_classes, num_kernels = NUM_THING + num_stuff, NUM_PROPOSALS + num_stuff
    targets = [make_image(gen, g, panoptic) for g in instances]
    h8, w8 = PAD_HW[0] // 8, PAD_HW[1] // 8

    def mask_logits(n: int) -> torch.Tensor:
        logits = torch.randn(len(targets), n, h8, w8, generator=gen) * 2 - 1
        for b, t in enumerate(targets):  # some proposals roughly follow some instances, in a random order
            if not len(t["masks"]):
                continue
            gts = F.interpolate(t["masks"].float()[None], size=(h8, w8), mode="bilinear", align_corners=False)[0]
            slots = torch.randperm(NUM_PROPOSALS, generator=gen)[: len(gts)]
            logits[b, slots] += 4 * gts * torch.rand(len(gts), 1, 1, generator=gen)
        return logits

    rpn = {"mask_preds": mask_logits(NUM_PROPOSALS), "seg_preds": torch.randn(2, num_classes, h8, w8, generator=gen)}
    stages = [
        {"cls_score": torch.randn(2, num_kernels, num_classes, generator=gen) * 1.5 - 2,
         "mask_preds": mask_logits(num_kernels)}
        for _ in range(NUM_STAGES)
    ]
    return {"name": f"{task}-seed{seed}-G{instances[0]},{instances[1]}", "task": task, "targets": targets,
            "rpn": rpn, "stages": stages}


def up2(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def knetlab_losses(case: dict) -> tuple[dict, list]:
    from knetlab.models import det_losses

    matches, real = [], det_losses.hungarian_match

    def recording(*args, **kwargs):
        pred, gt = real(*args, **kwargs)
        matches.append(sorted(zip(pred.tolist(), gt.tolist())))
        return pred, gt

    det_losses.hungarian_match = recording
    try:
        num_stuff = NUM_STUFF if case["task"] == "panoptic" else 0
        rpn = {"mask_logits": up2(case["rpn"]["mask_preds"]), "seg_logits": up2(case["rpn"]["seg_preds"])}
        stages = [{"cls_logits": s["cls_score"], "mask_logits": up2(s["mask_preds"])} for s in case["stages"]]
        losses = det_losses.knet_det_losses(rpn, stages, case["targets"], NUM_THING, num_stuff)
    finally:
        det_losses.hungarian_match = real
    # calls: the kernel head (= stage 0) per image, then stages 1.. per image -> [stage][image]
    per_stage = [matches[i : i + 2] for i in range(0, len(matches), 2)]
    return {k: float(v) for k, v in losses.items()}, [per_stage[0], *per_stage]


class _OpsStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """mmdet 2.x imports mmcv.ops everywhere; the lite mmcv has none and the losses need none on CPU."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)

        def missing_op(name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return type(name, (torch.nn.Module,), {})

        module.__getattr__ = missing_op
        return module

    def exec_module(self, module):
        module.__path__ = []


def reference_losses(cases_path: str, knet_src: str, out_path: str) -> None:
    """Runs in the reference venv: the official KNet.forward_train on the saved logits."""
    import logging

    try:
        _ = torch.ops.torchvision.nms
    except (AttributeError, RuntimeError):  # mmcv imports torchvision, whose compiled ops need a matching torch
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    sys.meta_path.insert(0, _OpsStub())
    sys.path.insert(0, knet_src)
    import mmdet.core
    import mmdet.models
    from mmcv.utils import Config, Registry, get_logger
    from mmdet.core import BitmapMasks

    for name in ("mmcv", "mmdet"):
        get_logger(name, log_level=logging.ERROR)
    original = Registry._register_module
    # mmdet 2.28 has its own DiceCost / MaskHungarianAssigner / MaskPseudoSampler: K-Net's must win
    Registry._register_module = lambda self, module, module_name=None, force=False: original(
        self, module, module_name, True
    )
    try:
        for module in ("knet.det.knet", "knet.det.kernel_head", "knet.det.kernel_iter_head",
                       "knet.det.kernel_update_head", "knet.det.semantic_fpn_wrapper", "knet.kernel_updator",
                       "knet.det.mask_hungarian_assigner", "knet.det.mask_pseudo_sampler"):
            __import__(module)
    finally:
        Registry._register_module = original
    torch.set_num_threads(1)
    results = []
    for case in torch.load(cases_path, weights_only=True):
        cfg = Config.fromfile(os.path.join(knet_src, "configs", "det", "knet", CONFIGS[case["task"]] + ".py"))
        cfg.model.backbone.init_cfg = None
        model = mmdet.models.build_detector(cfg.model).train()
        results.append(reference_case(model, case, BitmapMasks))
    torch.save(results, out_path)


def reference_case(model, case: dict, bitmap_masks) -> tuple[dict, list]:
    """The official KNet.forward_train with the network replaced by the case's logits; records every matching."""
    import numpy as np

    rpn, stages, targets = case["rpn"], case["stages"], case["targets"]
    batch, head, roi = len(targets), model.rpn_head, model.roi_head
    model.extract_feat = lambda img: None
    head._decode_init_proposals = lambda img, metas: (
        torch.zeros(batch, NUM_PROPOSALS, 256, 1, 1), None, rpn["mask_preds"], None, rpn["seg_preds"])
    roi._mask_forward = lambda stage, x, feats, masks, metas: {
        "cls_score": stages[stage]["cls_score"], "mask_preds": stages[stage]["mask_preds"],
        "scaled_mask_preds": up2(stages[stage]["mask_preds"]), "object_feats": feats}
    matches = [[] for _ in range(NUM_STAGES + 1)]

    def recorder(assigner, slot):
        real = assigner.assign

        def assign(*args, **kwargs):
            result = real(*args, **kwargs)
            pos = torch.nonzero(result.gt_inds > 0).flatten()
            matches[slot].append(sorted(zip(pos.tolist(), (result.gt_inds[pos] - 1).tolist())))
            return result
        return assign

    head.assigner.assign = recorder(head.assigner, 0)
    for s in range(NUM_STAGES):
        roi.mask_assigner[s].assign = recorder(roi.mask_assigner[s], s + 1)
    metas = [{"img_shape": (*IMAGE_HW, 3), "ori_shape": (*IMAGE_HW, 3), "pad_shape": (*PAD_HW, 3)}
             for _ in range(batch)]
    sem = None if targets[0]["sem_seg"] is None else torch.stack([t["sem_seg"][None] for t in targets])
    with torch.no_grad():
        losses = model.forward_train(
            torch.zeros(batch, 3, *PAD_HW), metas, gt_bboxes=[torch.zeros(len(t["labels"]), 4) for t in targets],
            gt_labels=[t["labels"] for t in targets],
            gt_masks=[bitmap_masks(t["masks"].numpy().astype(np.uint8), *PAD_HW) for t in targets],
            gt_semantic_seg=sem)
    return {k: float(v) for k, v in losses.items() if "loss" in k}, matches


def reference_key(key: str) -> str:
    """knetlab's `rpn_mask` / `s0_cls` -> the reference's `loss_rpn_mask` / `s0_loss_cls`."""
    return f"loss_{key}" if key.startswith("rpn_") else key.replace("_", "_loss_", 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference-python")
    parser.add_argument("--knet-src", required=True)
    parser.add_argument("--out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-reference", nargs=2, metavar=("CASES", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_reference:
        reference_losses(args.run_reference[0], args.knet_src, args.run_reference[1])
        return 0
    if not args.reference_python:
        parser.error("--reference-python is required")
    out = args.out or tempfile.mkdtemp(prefix="knet-det-losses-")
    os.makedirs(out, exist_ok=True)
    layouts = [("panoptic", (5, 2)), ("panoptic", (0, 3)), ("instance", (4, 0))]
    cases = [make_case(seed, task, g) for seed in args.seeds for task, g in layouts]
    cases_path, ref_path = os.path.join(out, "cases.pt"), os.path.join(out, "reference.pt")
    torch.save(cases, cases_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    subprocess.run([args.reference_python, os.path.abspath(__file__), "--knet-src", args.knet_src,
                    "--run-reference", cases_path, ref_path], check=True, env=env)
    reference = torch.load(ref_path, weights_only=True)
    worst, same_matching = 0.0, True
    for case, (ref_losses, ref_matches) in zip(cases, reference):
        mine, my_matches = knetlab_losses(case)
        same = my_matches == ref_matches
        same_matching &= same
        pairs = [sum(len(m) for m in stage) for stage in ref_matches]
        print(f"\n{case['name']}: matchings identical: {same} (matched pairs per kernel head/stage: {pairs})")
        print(f"{'key':<10} {'knetlab':>14} {'reference':>14} {'|diff|':>10} {'rel':>10}")
        for key, value in mine.items():
            ref = ref_losses[reference_key(key)]
            diff = abs(value - ref)
            rel = diff / max(abs(ref), 1e-12)
            worst = max(worst, rel if abs(ref) > 1e-9 else diff)
            print(f"{key:<10} {value:>14.8f} {ref:>14.8f} {diff:>10.2e} {rel:>10.2e}")
        extra = set(ref_losses) - {reference_key(k) for k in mine}
        if extra:
            print(f"reference-only keys: {sorted(extra)}")
            same_matching = False
    print(f"\nworst relative difference {worst:.2e} over {len(cases)} cases; all matchings identical: {same_matching}")
    return 0 if worst <= RELATIVE_TOLERANCE and same_matching else 1


if __name__ == "__main__":
    sys.exit(main())
