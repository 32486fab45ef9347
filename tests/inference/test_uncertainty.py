"""Uncertainty building blocks: mirror variants, agreement between label maps, entropy, probability scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoseg.inference.export import LabelLayout
from autoseg.inference.sliding_window import mirror_variants, predict_logits
from autoseg.inference.uncertainty import (
    entropy_map,
    pairwise_dice,
    predict_members,
    probability_scores,
    vote_disagreement,
)


class Asymmetric(torch.nn.Module):
    """A fixed conv net whose output changes under mirroring (so TTA variants disagree)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_variants_average_to_tta_logits():
    net = Asymmetric().eval()
    image = torch.rand(1, 20, 18, 24)
    kw = dict(patch_size=(16, 16, 16), num_outputs=3, step_size=0.5)
    tta = predict_logits(net, image, mirror_axes=(0, 1, 2), **kw)
    variants = mirror_variants((0, 1, 2))
    assert len(variants) == 8 and variants[0] == ()
    mean = sum(predict_logits(net, image, variant=v, **kw) for v in variants) / len(variants)
    assert torch.allclose(mean, tta, atol=1e-5)
    # a variant is the flipped prediction of the flipped image
    flipped = predict_logits(net, image, variant=(2,), **kw)
    direct = torch.flip(predict_logits(net, torch.flip(image, [3]), **kw), [3])
    assert torch.allclose(flipped, direct, atol=1e-5)


def test_predict_members_matches_fold_averaged_tta():
    nets = [Asymmetric().eval(), Asymmetric().eval()]
    with torch.no_grad():
        nets[1].conv.weight.mul_(-1)
    data = np.random.default_rng(0).random((1, 20, 20, 20), dtype=np.float32)
    layout = LabelLayout(3)
    out = predict_members(nets, data, patch_size=(16, 16, 16), layout=layout, mirror_axes=(0, 1), step_size=0.5,
                          device=torch.device("cpu"), amp=False)
    expected = sum(predict_logits(n, data, patch_size=(16, 16, 16), num_outputs=3, mirror_axes=(0, 1))
                   for n in nets) / 2
    np.testing.assert_allclose(out.logits, expected.numpy(), atol=1e-5)
    assert 0 <= out.tta_agreement <= 1 and 0 <= out.fold_agreement <= 1
    assert out.disagreement.shape == data.shape[1:] and out.disagreement.max() <= 0.5  # two folds: 0 or 0.5


def test_pairwise_dice_and_votes():
    a = np.array([0, 1, 1, 1, 2, 2])
    b = np.array([0, 1, 1, 0, 2, 0])
    # class 1: |a|=3, |b|=2, inter 2 -> 0.8; class 2: |a|=2, |b|=1, inter 1 -> 2/3
    assert pairwise_dice([a, b], [(1,), (2,)]) == pytest.approx((0.8 + 2 / 3) / 2)
    assert pairwise_dice([a, a, a], [(1,), (2,), (5,)]) == 1.0  # class 5 absent everywhere: agreement
    assert math.isnan(pairwise_dice([a], [(1,)]))
    # regions are unions of labels
    assert pairwise_dice([a, b], [(1, 2)]) == pytest.approx(2 * 3 / (5 + 3))
    votes = vote_disagreement([a, b, b])
    np.testing.assert_allclose(votes, [0, 0, 0, 1 / 3, 0, 1 / 3], atol=1e-6)


def test_entropy_and_probability_scores():
    layout = LabelLayout(2)
    confident = np.zeros((2, 10, 10), np.float32)
    confident[0] = 1.0
    confident[:, 3:6, 3:6] = [[[0.0]], [[1.0]]]
    unsure = confident.copy()
    unsure[:, 3:6, 3:6] = [[[0.4]], [[0.6]]]
    assert entropy_map(confident, layout).max() == pytest.approx(0.0, abs=1e-5)
    assert entropy_map(unsure, layout)[4, 4] == pytest.approx(0.971, abs=1e-3)
    sure, soft = probability_scores(confident, layout), probability_scores(unsure, layout)
    assert sure["confidence"] == pytest.approx(1.0, abs=1e-5) and sure["expected_dice"] == pytest.approx(1.0)
    assert soft["confidence"] < 0.1 and soft["expected_dice"] == pytest.approx(2 * 0.6 * 9 / (0.6 * 9 + 9))
    # nothing predicted but some probability mass: expected Dice is the chance the class is truly absent
    faint = np.stack([np.full((4, 4), 0.9, np.float32), np.full((4, 4), 0.1, np.float32)])
    assert probability_scores(faint, layout)["expected_dice"] == pytest.approx(math.exp(-1.6), rel=1e-4)
    # regions: binary entropy per region
    regions = LabelLayout(1, ((1,),), (1,))
    assert entropy_map(np.full((1, 3), 0.5, np.float32), regions) == pytest.approx(1.0)
