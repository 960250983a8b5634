"""The losses of panoptic/instance K-Net against hand computations: mmdet's sigmoid focal loss (one-hot, per-class
weights, avg factor), mask BCE, dice, the rank CE averaged over ignored pixels too, the kernel head's semantic focal
loss (stuff painting, foreground-count average), the panoptic class-weight quirk, the one-stage matching lag, perfect
predictions, images without instances, the key sets, gradients, float32 under autocast, reduce_mean over workers."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from knetlab.models import det_losses
from knetlab.models.det_losses import dice_loss, knet_det_losses, mask_bce_loss, rank_loss, sigmoid_focal_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def focal(x: float, target: int) -> float:
    """The textbook sigmoid focal term, alpha 0.25, gamma 2 (independent of mmdet's BCE-times-weight form)."""
    p = sig(x)
    return -0.25 * (1 - p) ** 2 * math.log(p) if target else -0.75 * p**2 * math.log(1 - p)


def bce(x: float, t: float) -> float:
    return -t * math.log(sig(x)) - (1 - t) * math.log(1 - sig(x))


def dice(xs: list[float], ts: list[float]) -> float:
    ps = [sig(x) for x in xs]
    inter = sum(p * t for p, t in zip(ps, ts))
    return 1 - 2 * inter / (sum(p * p for p in ps) + 1e-3 + sum(t * t for t in ts) + 1e-3)


def ce(logits: list[float], index: int) -> float:
    return -logits[index] + math.log(sum(math.exp(v) for v in logits))


def test_sigmoid_focal_loss_one_hot_weights_and_avg_factor():
    logits = torch.tensor([[0.0, math.log(3)], [1.0, -2.0]])
    labels = torch.tensor([1, 2])  # row 1 is background (label = C): an all-zero one-hot row
    weights = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    expected = (focal(0.0, 0) + focal(math.log(3), 1) + focal(-2.0, 0)) / 2
    assert sigmoid_focal_loss(logits, labels, weights, 2.0).item() == pytest.approx(expected, rel=1e-5)
    unweighted = (focal(0.0, 0) + focal(math.log(3), 1) + focal(1.0, 0) + focal(-2.0, 0)) / 4
    assert sigmoid_focal_loss(logits, labels, None, torch.tensor(4.0)).item() == pytest.approx(unweighted, rel=1e-5)


def test_mask_bce_dice_and_rank_by_hand():
    logits = torch.tensor([[[0.0, math.log(3)]], [[-3.0, 0.5]]])
    targets = torch.tensor([[[1.0, 0.5]], [[0.0, 0.25]]])
    expected_bce = (bce(0, 1) + bce(math.log(3), 0.5) + bce(-3, 0) + bce(0.5, 0.25)) / 4
    assert mask_bce_loss(logits, targets).item() == pytest.approx(expected_bce, rel=1e-5)
    expected_dice = (dice([0, math.log(3)], [1, 0.5]) + dice([-3, 0.5], [0, 0.25])) / 2
    assert dice_loss(logits, targets).item() == pytest.approx(expected_dice, rel=1e-5)
    # rank: (B=1, N=2, 1, 3); pixel 2 ignored but counted in the mean (Q13)
    rank_logits = torch.tensor([[[[0.0, 1.0, 5.0]], [[math.log(3), -1.0, 5.0]]]])
    rank_target = torch.tensor([[[1, 0, 255]]])
    expected_rank = (ce([0.0, math.log(3)], 1) + ce([1.0, -1.0], 0)) / 3
    assert rank_loss(rank_logits, rank_target).item() == pytest.approx(expected_rank, rel=1e-5)


def padded_target(thing_cols, label, sem_cols, height=4, width=16):
    """One 4 x 16 image (1 x 4 at stride 4): things over columns `thing_cols`, sem_seg {label: columns}, else 255."""
    masks = torch.zeros(len(thing_cols), height, width, dtype=torch.bool)
    for i, cols in enumerate(thing_cols):
        masks[i, :, cols] = True
    sem = torch.full((height, width), 255)
    for value, cols in sem_cols.items():
        sem[:, cols] = value
    return {"masks": masks, "labels": torch.tensor(label, dtype=torch.long), "sem_seg": sem}


def test_kernel_head_losses_by_hand_panoptic():
    # T=1, S=1. The thing covers columns 0..5 -> stride-4 target [1, .5, 0, 0]; stuff (label 1) columns 6..11 ->
    # [0, .5, 1, 0]; columns 12..15 VOID. Proposal 1 predicts the thing, proposal 0 nothing.
    target = padded_target([slice(0, 6)], [0], {0: slice(0, 6), 1: slice(6, 12)})
    xs = [3.0, 1.0, -2.0, -3.0]
    rpn_masks = torch.tensor([[[[-4.0] * 4], [xs]]])
    seg0, seg1 = [1.0, -0.5, 0.2, -1.0], [-2.0, 0.3, 1.5, 0.0]
    rpn = {"mask_logits": rpn_masks, "seg_logits": torch.tensor([[[seg0], [seg1]]])}
    losses = knet_det_losses(rpn, [], [target], 1, 1)
    assert set(losses) == {"rpn_mask", "rpn_dice", "rpn_seg", "rpn_rank"}
    t = [1.0, 0.5, 0.0, 0.0]
    assert losses["rpn_mask"].item() == pytest.approx(sum(bce(x, v) for x, v in zip(xs, t)) / 4, rel=1e-5)
    assert losses["rpn_dice"].item() == pytest.approx(4 * dice(xs, t), rel=1e-5)
    # semantic target: stuff painted on pixels 1, 2 (soft > 0), the matched thing over pixels 0, 1 -> [0, 0, 1, bg];
    # averaged over the 3 foreground pixels; the VOID pixel is background and still adds its negative terms
    seg_target = [0, 0, 1, 2]
    expected_seg = sum(focal(seg0[i], seg_target[i] == 0) + focal(seg1[i], seg_target[i] == 1) for i in range(4)) / 3
    assert losses["rpn_seg"].item() == pytest.approx(expected_seg, rel=1e-5)
    # rank: proposal 1 covers pixels 0, 1; pixels 2, 3 ignored but counted; x 0.1
    expected_rank = 0.1 * (ce([-4.0, 3.0], 1) + ce([-4.0, 1.0], 1)) / 4
    assert losses["rpn_rank"].item() == pytest.approx(expected_rank, rel=1e-5)


def test_stage_losses_panoptic_class_weights_by_hand():
    # T=2, S=2, P=2 -> N=4 kernels, C=4. Thing (label 1) over columns 0..3 -> [1, 0, 0, 0]; stuff class 3 (kernel
    # P+1) over columns 4..11 -> [0, 1, 1, 0]; stuff class 2 absent. Proposal 0 matches the thing on the kernel head.
    target = padded_target([slice(0, 4)], [1], {1: slice(0, 4), 3: slice(4, 12)})
    rpn = {"mask_logits": torch.tensor([[[[5.0, -5, -5, -5]], [[-5.0] * 4]]]), "seg_logits": torch.zeros(1, 4, 1, 4)}
    gen = torch.Generator().manual_seed(0)
    cls = torch.randn(1, 4, 4, generator=gen)
    masks = torch.randn(1, 4, 1, 4, generator=gen)
    losses = knet_det_losses(rpn, [{"cls_logits": cls, "mask_logits": masks}], [target], 2, 2)
    weights = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # Q9
    labels = [1, 4, 4, 3]  # the absent stuff class's kernel is background
    x = cls[0].tolist()
    expected_cls = sum(weights[r][c] * focal(x[r][c], labels[r] == c) for r in range(4) for c in range(4)) / 2
    assert losses["s0_cls"].item() == pytest.approx(2 * expected_cls, rel=1e-5)
    m = masks[0, :, 0].tolist()
    thing_t, stuff_t = [1.0, 0, 0, 0], [0, 1.0, 1.0, 0]
    expected_mask = (sum(bce(a, b) for a, b in zip(m[0], thing_t)) + sum(bce(a, b) for a, b in zip(m[3], stuff_t))) / 8
    assert losses["s0_mask"].item() == pytest.approx(expected_mask, rel=1e-5)
    assert losses["s0_dice"].item() == pytest.approx(4 * (dice(m[0], thing_t) + dice(m[3], stuff_t)) / 2, rel=1e-5)
    column = [[m[k][i] for k in range(4)] for i in range(4)]
    expected_rank = 0.1 * (ce(column[0], 0) + ce(column[1], 3) + ce(column[2], 3)) / 4
    assert losses["s0_rank"].item() == pytest.approx(expected_rank, rel=1e-5)


def test_matching_lags_one_stage_masks_then_classes(monkeypatch):
    # instance, T=2, one thing (label 1) over columns 0..7 -> [1, 1, 0, 0]; P=2
    target = padded_target([slice(0, 8)], [1], {})
    good, bad = [6.0, 6.0, -6.0, -6.0], [-6.0, -6.0, 6.0, 6.0]
    rpn = {"mask_logits": torch.tensor([[[good], [bad]]]), "seg_logits": torch.zeros(1, 2, 1, 4)}
    cls0 = torch.tensor([[[0.0, -3.0], [0.0, 3.0]]])  # proposal 1 says class 1
    stages = [
        {"cls_logits": cls0, "mask_logits": torch.tensor([[[good], [good]]])},  # equal masks: stage 1 by class
        {"cls_logits": torch.zeros(1, 2, 2), "mask_logits": torch.tensor([[[good], [bad]]])},
        {"cls_logits": torch.zeros(1, 2, 2), "mask_logits": torch.tensor([[[bad], [good]]])},
    ]
    calls = []
    real_match = det_losses.hungarian_match

    def spy(mask_logits, gt_masks, gt_labels, cls_logits=None):
        calls.append((mask_logits.clone(), None if cls_logits is None else cls_logits.clone()))
        return real_match(mask_logits, gt_masks, gt_labels, cls_logits)

    monkeypatch.setattr(det_losses, "hungarian_match", spy)
    losses = knet_det_losses(rpn, stages, [target], 2, 0)
    assert len(calls) == 3  # the kernel head and stage 0 share one matching; stages 1, 2 one each
    assert torch.equal(calls[0][0], rpn["mask_logits"][0]) and calls[0][1] is None
    for s in (1, 2):
        assert torch.equal(calls[s][0], stages[s - 1]["mask_logits"][0])
        assert torch.equal(calls[s][1], stages[s - 1]["cls_logits"][0])
    t = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    # stage 0 positive = proposal 0 (kernel head), stage 1 = proposal 1 (stage 0's classes), stage 2 = proposal 0
    for s, p in [(0, 0), (1, 1), (2, 0)]:
        expected = mask_bce_loss(stages[s]["mask_logits"][0, p : p + 1], t)
        assert losses[f"s{s}_mask"].item() == pytest.approx(expected.item(), rel=1e-6), s
    assert losses["s2_mask"].item() > 5  # the lag: stage 2 is scored on the proposal stage 1 got right, not its own


def block_case(perfect: bool, gen: torch.Generator):
    """Panoptic T=2, S=2, P=3, batch 2 at 8 x 16 (stride 4: 2 x 4); targets on whole 4x4 cells (binary at stride 4)."""
    def cells(*ij):
        m = torch.zeros(8, 16, dtype=torch.bool)
        for i, j in ij:
            m[4 * i : 4 * i + 4, 4 * j : 4 * j + 4] = True
        return m

    things = [[cells((0, 0), (0, 1)), cells((1, 3))], [cells((1, 0))]]
    labels = [[0, 1], [1]]
    targets, stride4 = [], []
    for b in range(2):
        sem = torch.full((8, 16), 255)
        sem[cells((0, 2), (0, 3), (1, 2))] = 2 + b  # stuff class 2 in image 0, 3 in image 1
        for m, lab in zip(things[b], labels[b]):
            sem[m] = lab
        targets.append({"masks": torch.stack(things[b]), "labels": torch.tensor(labels[b]), "sem_seg": sem})
        stride4.append(torch.stack(things[b])[:, 1::4, 1::4].float())
    if not perfect:
        return targets, torch.randn(2, 3, 2, 4, generator=gen), torch.randn(2, 4, 2, 4, generator=gen), [
            {"cls_logits": torch.randn(2, 5, 4, generator=gen), "mask_logits": torch.randn(2, 5, 2, 4, generator=gen)}
            for _ in range(3)
        ]
    big = 30.0
    masks = torch.full((2, 5, 2, 4), -big)
    cls = torch.full((2, 5, 4), -big)
    seg = torch.full((2, 4, 2, 4), -big)
    for b in range(2):
        for g, lab in enumerate(labels[b]):
            masks[b, g] = stride4[b][g] * 2 * big - big
            cls[b, g, lab] = big
            seg[b, lab][stride4[b][g] > 0] = big
        stuff = (targets[b]["sem_seg"][1::4, 1::4] == 2 + b).float()
        masks[b, 3 + b] = stuff * 2 * big - big
        cls[b, 3 + b, 2 + b] = big
        seg[b, 2 + b][stuff > 0] = big
    rpn_masks = masks[:, :3].clone()
    return targets, rpn_masks, seg, [{"cls_logits": cls.clone(), "mask_logits": masks.clone()} for _ in range(3)]


def test_perfect_prediction_gives_near_zero_losses():
    targets, rpn_masks, seg, stages = block_case(True, torch.Generator().manual_seed(0))
    losses = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg}, stages, targets, 2, 2)
    for key, value in losses.items():
        assert value.item() < (5e-3 if key.endswith("dice") else 1e-6), key
    assert losses["s2_dice"].item() > 0  # dice keeps its eps: 1 - 2|t| / (2|t| + 2e-3)


def test_keys_gradients_and_random_values_panoptic_and_instance():
    gen = torch.Generator().manual_seed(1)
    targets, rpn_masks, seg, stages = block_case(False, gen)
    inputs = [rpn_masks, seg] + [s[k] for s in stages for k in ("cls_logits", "mask_logits")]
    for t in inputs:
        t.requires_grad_(True)
    losses = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg}, stages, targets, 2, 2)
    stage_keys = {f"s{i}_{k}" for i in range(3) for k in ("cls", "mask", "dice", "rank")}
    assert set(losses) == {"rpn_mask", "rpn_dice", "rpn_seg", "rpn_rank"} | stage_keys
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)

    inst_stages = [{k: v.detach()[:, :3, ..., :2] if k == "cls_logits" else v.detach()[:, :3]
                    for k, v in s.items()} for s in stages]
    inst = knet_det_losses({"mask_logits": rpn_masks.detach(), "seg_logits": seg.detach()[:, :2]}, inst_stages,
                           [{**t, "sem_seg": None} for t in targets], 2, 0)
    assert set(inst) == {"rpn_mask", "rpn_dice", "rpn_seg"} | {f"s{i}_{k}" for i in range(3)
                                                                for k in ("cls", "mask", "dice")}


def test_images_without_instances():
    gen = torch.Generator().manual_seed(2)
    targets, rpn_masks, seg, stages = block_case(False, gen)
    targets[0] = {**targets[0], "masks": torch.zeros(0, 8, 16, dtype=torch.bool), "labels": torch.zeros(0).long()}
    losses = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg}, stages, targets, 2, 2)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    # instance batch without a single instance: the mask losses are exact zeros that still backpropagate
    rpn_masks.requires_grad_(True)
    empty = [{"masks": torch.zeros(0, 8, 16, dtype=torch.bool), "labels": torch.zeros(0).long()}] * 2
    inst_stages = [{"cls_logits": s["cls_logits"][:, :3, :2], "mask_logits": s["mask_logits"][:, :3]}
                   for s in stages]
    inst = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg[:, :2]}, inst_stages, empty, 2, 0)
    for key in ("rpn_mask", "rpn_dice", "s0_mask", "s0_dice", "s2_dice"):
        assert inst[key].item() == 0, key
    assert inst["s0_cls"] > 0 and inst["rpn_seg"] > 0  # every kernel is background; averaged over max(0, 1)
    sum(inst.values()).backward()
    assert rpn_masks.grad is not None and rpn_masks.grad.abs().sum() == 0


def test_float32_under_autocast():
    gen = torch.Generator().manual_seed(3)
    targets, rpn_masks, seg, stages = block_case(False, gen)
    half = [rpn_masks.bfloat16(), seg.bfloat16()] + [s[k].bfloat16() for s in stages for k in s]
    rebuild = lambda ts: ({"mask_logits": ts[0], "seg_logits": ts[1]},  # noqa: E731
                          [{"cls_logits": ts[2 + 2 * i], "mask_logits": ts[3 + 2 * i]} for i in range(3)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = knet_det_losses(*rebuild(half), targets, 2, 2)
    full = knet_det_losses(*rebuild([t.float() for t in half]), targets, 2, 2)
    for key in full:
        assert amp[key].dtype == torch.float32
        assert amp[key].item() == pytest.approx(full[key].item(), rel=1e-6), key


def test_bad_inputs_give_one_line_errors():
    targets, rpn_masks, seg, stages = block_case(False, torch.Generator().manual_seed(4))
    rpn = {"mask_logits": rpn_masks, "seg_logits": seg}
    with pytest.raises(ValueError, match=r'rpn\["seg_logits"\] has shape \(2, 4, 2, 4\); expected \(2, 5, 2, 4\)'):
        knet_det_losses(rpn, stages, targets, 3, 2)
    with pytest.raises(ValueError, match="targets has 1 entries for a batch of 2"):
        knet_det_losses(rpn, stages, targets[:1], 2, 2)
    with pytest.raises(ValueError, match=r'stages\[1\]\["mask_logits"\] is \(2, 4, 2, 4\)'):
        knet_det_losses(rpn, [stages[0], {**stages[1], "mask_logits": stages[1]["mask_logits"][:, :4]}], targets, 2, 2)
    with pytest.raises(ValueError, match=r'stages\[0\]\["cls_logits"\] is \(2, 5, 3\)'):
        knet_det_losses(rpn, [{**stages[0], "cls_logits": stages[0]["cls_logits"][..., :3]}], targets, 2, 2)
    with pytest.raises(ValueError, match=r'targets\[1\]\["sem_seg"\] holds label 9'):
        knet_det_losses(rpn, stages, [targets[0], {**targets[1], "sem_seg": targets[1]["sem_seg"] * 0 + 9}], 2, 2)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reduce_mean_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))
    try:
        targets, rpn_masks, seg, stages = block_case(False, torch.Generator().manual_seed(5))
        if rank == 1:  # fewer positives on worker 1: image 0 loses its instances
            targets[0] = {**targets[0], "masks": targets[0]["masks"][:0], "labels": targets[0]["labels"][:0]}
        losses = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg}, stages, targets, 2, 2)
        torch.save({k: v.detach() for k, v in losses.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_class_loss_averages_the_positive_count_over_workers(tmp_path):
    mp.spawn(_reduce_mean_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    targets, rpn_masks, seg, stages = block_case(False, torch.Generator().manual_seed(5))
    alone = knet_det_losses({"mask_logits": rpn_masks, "seg_logits": seg}, stages, targets, 2, 2)
    worker0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    # worker 0 has 3 things + 2 stuff = 5 positives, worker 1 has 1 thing + 2 stuff = 3: the avg factor is 4
    assert worker0["s0_cls"].item() == pytest.approx(alone["s0_cls"].item() * 5 / 4, rel=1e-5)
    for key in ("s0_mask", "s0_dice", "s0_rank", "rpn_seg", "rpn_mask"):  # per-worker means, not reduced
        assert worker0[key].item() == pytest.approx(alone[key].item(), rel=1e-6), key
