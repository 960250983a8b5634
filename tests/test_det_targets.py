"""The stride-4 training targets of panoptic/instance K-Net: bilinear soft downsampling (align_corners=False, no
antialiasing), one stuff mask per present stuff class (crowd things and VOID make none), the kernel head's semantic
target (stuff painted first, then matched things in proposal order, soft > 0 covers) and the rank target (later
positive kernels win, 255 elsewhere); clear errors for bad targets."""

from __future__ import annotations

import pytest
import torch

from knetlab.models.det_targets import (
    ImageTargets,
    build_image_targets,
    downsample_masks,
    last_covering_index,
    rank_targets,
    semantic_targets,
    stuff_masks_from_semantic,
)


def test_downsampling_is_bilinear_between_the_two_middle_pixels_of_each_4x4_cell():
    masks = torch.zeros(3, 8, 8, dtype=torch.bool)
    masks[0, 1, 1] = True  # one of the four sampled pixels of cell (0, 0): 1/4
    masks[1, :4, :4] = True  # a whole cell: 1
    masks[2, 0, :] = True  # the cell's first row is never sampled: 0
    out = downsample_masks(masks, (2, 2))
    assert out.dtype == torch.float32
    assert out[0].tolist() == [[0.25, 0.0], [0.0, 0.0]]
    assert out[1].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert out[2].abs().sum() == 0
    assert downsample_masks(torch.zeros(0, 8, 8, dtype=torch.bool), (2, 2)).shape == (0, 2, 2)


def test_stuff_masks_one_per_present_stuff_class_ascending():
    sem = torch.tensor([[4, 4, 1, 255], [6, 4, 0, 6]])  # T=3, S=4: things 0..2 (crowd too), stuff 3..6
    labels, masks = stuff_masks_from_semantic(sem, 3, 4)
    assert labels.tolist() == [4, 6]
    assert masks.tolist() == [
        [[True, True, False, False], [False, True, False, False]],
        [[False, False, False, False], [True, False, False, True]],
    ]
    with pytest.raises(ValueError, match=r"sem_seg holds label 7; valid: 0\.\.6"):
        stuff_masks_from_semantic(torch.tensor([[7, 3]]), 3, 4)


def test_build_image_targets_panoptic_and_instance():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, :4, :] = True
    sem = torch.full((8, 8), 255)
    sem[:4] = 1  # the instance's thing label
    sem[4:, :4] = 5
    target = {"masks": masks, "labels": torch.tensor([1]), "sem_seg": sem}
    pan = build_image_targets(target, (2, 2), 3, 4)
    assert pan.masks.tolist() == [[[1.0, 1.0], [0.0, 0.0]]]
    assert pan.labels.tolist() == [1]
    assert pan.stuff_labels.tolist() == [5]
    assert pan.stuff_masks.tolist() == [[[0.0, 0.0], [1.0, 0.0]]]
    inst = build_image_targets({**target, "sem_seg": None}, (2, 2), 3, 0)
    assert inst.stuff_masks.shape == (0, 2, 2) and inst.stuff_labels.numel() == 0
    assert build_image_targets(target, (2, 2), 3, 0).stuff_labels.numel() == 0  # instance: sem_seg ignored


def test_build_image_targets_errors_name_the_target_and_value():
    ok = {"masks": torch.zeros(2, 8, 8, dtype=torch.bool), "labels": torch.tensor([0, 2]), "sem_seg": None}
    with pytest.raises(ValueError, match=r'targets\[3\]\["masks"\] is 8x8 but the predictions are 3x2'):
        build_image_targets(ok, (3, 2), 3, 0, where="targets[3]")
    with pytest.raises(ValueError, match=r'targets\[0\]\["labels"\] holds 3; thing labels are 0\.\.2'):
        build_image_targets({**ok, "labels": torch.tensor([0, 3])}, (2, 2), 3, 0)
    with pytest.raises(ValueError, match=r'\["labels"\] is torch.int64 \(1,\)'):
        build_image_targets({**ok, "labels": torch.tensor([0])}, (2, 2), 3, 0)
    with pytest.raises(ValueError, match=r'\["sem_seg"\] is missing'):
        build_image_targets(ok, (2, 2), 3, 4)
    with pytest.raises(ValueError, match=r'\["sem_seg"\] has shape \(4, 8\)'):
        build_image_targets({**ok, "sem_seg": torch.zeros(4, 8, dtype=torch.long)}, (2, 2), 3, 4)
    with pytest.raises(ValueError, match='has no "masks"'):
        build_image_targets({"labels": ok["labels"]}, (2, 2), 3, 0)


def test_last_covering_index():
    cover = torch.tensor([[True, True, False], [False, True, False], [True, False, False]])
    assert last_covering_index(cover, 0).tolist() == [2, 1, -1]
    assert last_covering_index(torch.zeros(0, 3, dtype=torch.bool), 0).tolist() == [-1, -1, -1]


def test_semantic_target_paints_stuff_then_matched_things_in_proposal_order():
    image = ImageTargets(
        masks=torch.tensor([[[1.0, 0.5, 0.0, 0.0]], [[0.0, 0.0, 0.25, 0.0]], [[0.0, 0.0, 0.0, 1.0]]]),
        labels=torch.tensor([3, 4, 2]),
        stuff_masks=torch.tensor([[[0.0, 1.0, 1.0, 0.0]]]),
        stuff_labels=torch.tensor([7]),
    )
    # gt 1 matched to an earlier proposal than gt 0; gt 2 unmatched (not painted); background 9
    assert semantic_targets(image, torch.tensor([1, 0]), 9).tolist() == [[3, 3, 4, 9]]
    assert semantic_targets(image, torch.tensor([0]), 9).tolist() == [[3, 3, 7, 9]]
    empty = ImageTargets(torch.zeros(0, 1, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 4),
                         torch.zeros(0, dtype=torch.long))
    assert semantic_targets(empty, torch.zeros(0, dtype=torch.long), 9).tolist() == [[9, 9, 9, 9]]


def test_rank_target_later_positive_kernels_win_soft_covers():
    targets = torch.tensor([[[[1.0, 0.5, 0.0, 0.0]], [[0.0, 0.25, 1.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]]])
    positive = torch.tensor([[True, True, False]])
    assert rank_targets(targets, positive).tolist() == [[[0, 1, 1, 255]]]
    assert rank_targets(targets, torch.tensor([[True, False, True]])).tolist() == [[[2, 2, 2, 2]]]
