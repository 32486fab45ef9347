"""Losses and online-validation metrics on tiny hand-made tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.training.losses import (
    DeepSupervisionLoss,
    DiceBCELoss,
    DiceCELoss,
    SoftDiceLoss,
    build_loss,
    deep_supervision_weights,
)
from autoseg.training.metrics import pseudo_dice, tp_fp_fn


def _perfect_logits(labels: torch.Tensor, n_classes: int, margin: float = 50.0) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels[:, 0].long(), n_classes).movedim(-1, 1).float()
    return onehot * margin


def test_perfect_prediction_gives_dice_minus_one_and_zero_ce() -> None:
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1, 2]).reshape(1, 1, 2, 2, 2).repeat(2, 1, 1, 1, 1)
    logits = _perfect_logits(labels, 3)
    dice = SoftDiceLoss(apply_nonlin="softmax", batch_dice=False, do_bg=False)(logits, labels)
    assert dice.item() == pytest.approx(-1.0, abs=1e-5)
    total = DiceCELoss(batch_dice=True)(logits, labels)
    assert total.item() == pytest.approx(-1.0, abs=1e-5)  # CE ~ 0


def test_two_voxel_hand_computed_value() -> None:
    # two voxels, two classes; logits 0 everywhere -> p = 0.5 for both classes at both voxels
    logits = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1, 0]]])
    s = 1e-5
    # foreground: I = 0.5, sum_pred = 1.0, sum_gt = 1
    expected_dice = -(2 * 0.5 + s) / (1.0 + 1 + s)
    dice = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=False)(logits, target)
    assert dice.item() == pytest.approx(expected_dice, rel=1e-6)
    total = DiceCELoss(batch_dice=True)(logits, target)
    assert total.item() == pytest.approx(expected_dice + math.log(2), rel=1e-6)
    # with background included: class 0 has the same statistics
    dice_bg = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=True)(logits, target)
    assert dice_bg.item() == pytest.approx(expected_dice, rel=1e-6)


def test_per_sample_vs_batch_dice_differ() -> None:
    logits = torch.tensor([[[4.0, -4.0]], [[-4.0, 4.0]]]).reshape(2, 2, 1)  # B=2, C=2, 1 voxel each
    target = torch.tensor([[[1]], [[1]]])
    per_sample = SoftDiceLoss(apply_nonlin="softmax", batch_dice=False, do_bg=False)(logits, target)
    batch = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=False)(logits, target)
    assert per_sample.item() != pytest.approx(batch.item(), abs=1e-3)


def test_ignored_voxels_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 4, 4, 4))
    target[:, :, :2] = 3  # ignore label
    logits = torch.randn(2, 3, 4, 4, 4)
    changed = logits.clone()
    changed[:, :, :2] = torch.randn(2, 3, 2, 4, 4) * 10
    for batch_dice in (True, False):
        loss = DiceCELoss(batch_dice=batch_dice, ignore_label=3)
        assert loss(logits, target).item() == pytest.approx(loss(changed, target).item(), rel=1e-6)
    # and the loss equals the loss on the annotated half alone
    loss = DiceCELoss(batch_dice=True, ignore_label=3)
    alone = DiceCELoss(batch_dice=True)(logits[:, :, 2:], target[:, :, 2:])
    assert loss(logits, target).item() == pytest.approx(alone.item(), rel=1e-6)


def test_all_ignored_batch_is_finite_with_zero_ce() -> None:
    target = torch.full((2, 1, 3, 3), 4)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    value = DiceCELoss(batch_dice=False, ignore_label=4)(logits, target)
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(-1.0, abs=1e-6)  # Dice of nothing vs nothing, CE 0
    value.backward()
    assert torch.isfinite(logits.grad).all()


def test_region_loss_known_value() -> None:
    logits = torch.zeros(1, 2, 2)  # sigmoid 0.5 everywhere
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    s = 1e-5
    d0 = (2 * 0.5 + s) / (1.0 + 1 + s)
    d1 = (2 * 1.0 + s) / (1.0 + 2 + s)
    expected = -(d0 + d1) / 2 + math.log(2)
    value = DiceBCELoss(batch_dice=True)(logits, target)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_region_loss_ignore_channel_masks_both_terms() -> None:
    torch.manual_seed(1)
    regions = (torch.rand(2, 3, 4, 4) > 0.5).float()
    ignore = torch.zeros(2, 1, 4, 4)
    ignore[:, :, :2] = 1  # top half ignored
    target = torch.cat([regions, ignore], 1)
    logits = torch.randn(2, 3, 4, 4)
    changed = logits.clone()
    changed[:, :, :2] = 20.0
    loss = DiceBCELoss(batch_dice=False, use_ignore=True)
    assert loss(logits, target).item() == pytest.approx(loss(changed, target).item(), rel=1e-6)
    alone = DiceBCELoss(batch_dice=False)(logits[:, :, 2:], regions[:, :, 2:])
    assert loss(logits, target).item() == pytest.approx(alone.item(), rel=1e-6)
    with pytest.raises(AutosegError, match="ignore"):
        loss(logits, regions)


def test_deep_supervision_weights() -> None:
    assert deep_supervision_weights(5) == pytest.approx([0.5333, 0.2667, 0.1333, 0.0667, 0.0], abs=1e-4)
    assert deep_supervision_weights(1) == [1.0]
    assert sum(deep_supervision_weights(3)) == pytest.approx(1.0)
    with pytest.raises(AutosegError, match="n_outputs"):
        deep_supervision_weights(0)


def test_deep_supervision_loss_skips_zero_weights_and_checks_lengths() -> None:
    calls: list[tuple[int, ...]] = []

    class Recording(torch.nn.Module):
        def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(output.shape))
            return output.mean()

    loss = DeepSupervisionLoss(Recording(), [0.75, 0.25, 0.0])
    outs = [torch.ones(1, 1, 4), torch.full((1, 1, 2), 2.0), torch.ones(1, 1, 1)]
    assert loss(outs, [None, None, None]).item() == pytest.approx(0.75 + 0.5)
    assert calls == [(1, 1, 4), (1, 1, 2)]
    with pytest.raises(AutosegError, match="targets"):
        loss(outs, [None, None])


@pytest.mark.parametrize("regions", [False, True])
def test_build_loss_with_deep_supervision_flows_gradients(regions: bool) -> None:
    torch.manual_seed(2)
    n_out = 3
    shapes = [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2)]
    outputs = [torch.randn(*s, requires_grad=True) for s in shapes]
    if regions:
        targets = [torch.cat([(torch.rand(2, 3, *s[2:]) > 0.5).float(), torch.zeros(2, 1, *s[2:])], 1)
                   for s in shapes]
    else:
        targets = [torch.randint(0, 4, (2, 1, *s[2:])) for s in shapes]  # 3 = ignore
    loss = build_loss(regions=regions, batch_dice=False, ignore_label=3, n_outputs=n_out)
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value)
    assert outputs[0].grad.abs().sum() > 0 and outputs[1].grad.abs().sum() > 0
    assert outputs[2].grad is None  # zero-weight lowest resolution is skipped
    single = build_loss(regions=regions, batch_dice=True, ignore_label=None, n_outputs=1)
    tgt = targets[0][:, :3] if regions else targets[0].clamp(max=2)
    assert torch.isfinite(single(outputs[0], tgt))


def test_soft_dice_rejects_unknown_nonlinearity() -> None:
    with pytest.raises(AutosegError, match="softmax"):
        SoftDiceLoss(apply_nonlin="relu", batch_dice=True, do_bg=True)  # type: ignore[arg-type]


def test_tp_fp_fn_labels_hand_example_with_ignore() -> None:
    # 6 voxels, 3 classes; predictions by argmax
    pred = torch.tensor([0, 1, 1, 2, 2, 1])
    gt = torch.tensor([0, 1, 2, 2, 9, 9])  # 9 = ignore
    logits = torch.nn.functional.one_hot(pred, 3).T.float().reshape(1, 3, 6)
    target = gt.reshape(1, 1, 6)
    tp, fp, fn = tp_fp_fn(logits, target, regions=False, ignore_label=9)
    assert tp.dtype == np.int64
    assert tp.tolist() == [1, 1] and fp.tolist() == [1, 0] and fn.tolist() == [0, 1]
    tp2, fp2, fn2 = tp_fp_fn(logits, gt.clamp(max=2).reshape(1, 1, 6), regions=False, ignore_label=None)
    assert tp2.tolist() == [1, 2] and fp2.tolist() == [2, 0] and fn2.tolist() == [0, 2]  # last two count
    assert pseudo_dice(tp, fp, fn) == pytest.approx([2 / 3, 2 / 3])


def test_tp_fp_fn_regions_and_nan_dice() -> None:
    logits = torch.tensor([[[3.0, -3.0, 3.0], [-1.0, -1.0, -1.0]]])  # (1, 2 regions, 3 voxels)
    target = torch.tensor([[[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # last = ignore
    tp, fp, fn = tp_fp_fn(logits, target, regions=True, ignore_label=5)
    assert tp.tolist() == [1, 0] and fp.tolist() == [0, 0] and fn.tolist() == [1, 0]
    dice = pseudo_dice(tp, fp, fn)
    assert dice[0] == pytest.approx(2 / 3) and np.isnan(dice[1])
    with pytest.raises(AutosegError, match="ignore"):
        tp_fp_fn(logits, target[:, :2], regions=True, ignore_label=5)
