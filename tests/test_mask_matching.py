"""The Hungarian matching of panoptic/instance K-Net: each cost term by hand (mmdet's FocalLossCost, K-Net's DiceCost
and MaskCost), their weights (class x2, dice x4, mask x1), an optimal assignment sorted by proposal index, empty and
over-full cases, no gradients, clear errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from knetlab.models.mask_matching import (
    dice_cost,
    focal_class_cost,
    hungarian_match,
    mask_cost,
    matching_cost,
)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_focal_class_cost_by_hand():
    # p = 0.5 for class 0, 0.8 for class 1; pos = -log(p) 0.25 (1-p)^2, neg = -log(1-p) 0.75 p^2; cost = pos - neg
    logits = torch.tensor([[0.0, logit(0.8)]])
    cost = focal_class_cost(logits, torch.tensor([1, 0, 1]))

    def term(p):
        return -math.log(p + 1e-12) * 0.25 * (1 - p) ** 2 - (-math.log(1 - p + 1e-12) * 0.75 * p**2)

    assert cost.shape == (1, 3)
    assert cost[0].tolist() == pytest.approx([term(0.8), term(0.5), term(0.8)], rel=1e-5)
    assert term(0.8) < 0 < term(0.1)  # a confident right class is cheap, an unlikely one dear


def test_dice_cost_by_hand():
    probs = torch.tensor([[[1.0, 0.5], [0.0, 0.0]]])  # (1, 2, 2)
    gts = torch.tensor([[[1.0, 1.0], [0.0, 0.0]], [[0.0, 0.0], [0.5, 0.0]]])
    cost = dice_cost(probs, gts)
    # gt 0: sum pt = 1.5, sum p^2 = 1.25, sum t^2 = 2 -> -3 / (1.25 + 2 + 2e-3); gt 1: no overlap -> 0
    assert cost[0].tolist() == pytest.approx([-3.0 / 3.252, 0.0], abs=1e-6)


def test_mask_cost_by_hand():
    probs = torch.tensor([[[0.9, 0.2], [0.5, 0.0]]])
    gts = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    # sum pt = 0.9 + 0.25 = 1.15; sum (1-p)(1-t) = 0 + 0.8 + 0.25 + 1 = 2.05; cost = -(3.2) / 4
    assert mask_cost(probs, gts).item() == pytest.approx(-0.8, abs=1e-6)


def test_matching_cost_weighs_dice_4_mask_1_class_2():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 6, 7, generator=gen)
    gts = torch.rand(3, 6, 7, generator=gen)
    labels = torch.tensor([2, 0, 2])
    cls = torch.randn(5, 4, generator=gen)
    probs = logits.sigmoid()
    without = matching_cost(logits, gts, labels)
    torch.testing.assert_close(without, 4 * dice_cost(probs, gts) + mask_cost(probs, gts))
    torch.testing.assert_close(matching_cost(logits, gts, labels, cls), without + 2 * focal_class_cost(cls, labels))


def test_match_recovers_a_permutation_sorted_by_proposal():
    gen = torch.Generator().manual_seed(1)
    gts = (torch.rand(4, 8, 8, generator=gen) > 0.5).float()
    order = torch.tensor([3, 0, 2, 1])  # proposal p predicts gt order[p]; proposals 4, 5 predict nothing
    logits = torch.cat([(gts[order] * 2 - 1) * 10, torch.full((2, 8, 8), -10.0)])
    pred, gt = hungarian_match(logits, gts, torch.zeros(4, dtype=torch.long))
    assert pred.tolist() == [0, 1, 2, 3]
    assert gt.tolist() == order.tolist()
    assert pred.dtype == gt.dtype == torch.long


def test_match_is_optimal_against_brute_force():
    gen = torch.Generator().manual_seed(2)
    for trial in range(3):
        logits, gts = torch.randn(5, 4, 4, generator=gen), torch.rand(3, 4, 4, generator=gen)
        labels, cls = torch.randint(0, 3, (3,), generator=gen), torch.randn(5, 3, generator=gen)
        cost = matching_cost(logits, gts, labels, cls)
        best = min(sum(cost[p, g].item() for g, p in enumerate(perm)) for perm in itertools.permutations(range(5), 3))
        pred, gt = hungarian_match(logits, gts, labels, cls)
        assert len(pred) == 3 and len(set(pred.tolist())) == 3, trial
        assert pred.tolist() == sorted(pred.tolist())
        assert cost[pred, gt].sum().item() == pytest.approx(best, abs=1e-5)


def test_class_cost_decides_between_equal_masks():
    gt = torch.zeros(1, 4, 4)
    gt[0, :2] = 1
    logits = ((gt * 2 - 1) * 5).expand(2, 4, 4).clone()  # two proposals with the same mask
    cls = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])  # proposal 1 says class 1
    assert hungarian_match(logits, gt, torch.tensor([1]), cls)[0].tolist() == [1]
    assert hungarian_match(logits, gt, torch.tensor([0]), cls)[0].tolist() == [0]


def test_more_instances_than_proposals_and_empty_cases():
    gen = torch.Generator().manual_seed(3)
    pred, gt = hungarian_match(torch.randn(2, 4, 4, generator=gen), torch.rand(5, 4, 4, generator=gen),
                               torch.zeros(5, dtype=torch.long))
    assert pred.tolist() == [0, 1] and len(set(gt.tolist())) == 2
    for n, g in [(3, 0), (0, 2)]:
        pred, gt = hungarian_match(torch.randn(n, 4, 4), torch.rand(g, 4, 4), torch.zeros(g, dtype=torch.long))
        assert pred.numel() == gt.numel() == 0 and pred.dtype == torch.long


def test_match_takes_no_gradient_and_rejects_bad_inputs():
    logits = torch.randn(3, 4, 4, requires_grad=True)
    pred, gt = hungarian_match(logits, torch.rand(2, 4, 4), torch.zeros(2, dtype=torch.long))
    assert not pred.requires_grad and not gt.requires_grad and logits.grad is None
    with pytest.raises(ValueError, match="same size"):
        hungarian_match(torch.randn(3, 4, 4), torch.rand(2, 4, 5), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="gt_labels"):
        hungarian_match(torch.randn(3, 4, 4), torch.rand(2, 4, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="cls_logits"):
        hungarian_match(torch.randn(3, 4, 4), torch.rand(2, 4, 4), torch.zeros(2, dtype=torch.long), torch.randn(2, 3))
    bad = torch.randn(3, 4, 4)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        hungarian_match(bad, torch.rand(2, 4, 4), torch.zeros(2, dtype=torch.long))
