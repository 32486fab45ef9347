"""The losses chosen by name (dice_topk, dice_focal, tversky next to dice_ce / dice_bce) on tiny tensors."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from autoseg.errors import TrainingConfigError
from autoseg.training.losses import (
    LOSSES,
    DeepSupervisionLoss,
    DiceBCELoss,
    DiceCELoss,
    SoftDiceLoss,
    TverskyLoss,
    build_loss,
    deep_supervision_weights,
)

IGNORE = 3  # label mode: 3 classes (0, 1, 2) and ignore label 3
BOTH_MODES = ["dice_topk", "dice_focal", "tversky"]
CASES = [(name, False) for name in ["dice_ce", *BOTH_MODES]] + [(name, True) for name in ["dice_bce", *BOTH_MODES]]


def _case(regions: bool, dim: int = 3, ignore: bool = True, seed: int = 0
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits (2, 3, 8...), a target in the mode's convention, and the (2, 1, 8...) bool mask of ignored voxels
    (the first two slices along the first spatial axis), None without ignore."""
    gen = torch.Generator().manual_seed(seed)
    spatial = (8,) * dim
    logits = torch.randn(2, 3, *spatial, generator=gen) * 2
    ignored = torch.zeros(2, 1, *spatial, dtype=torch.bool)
    ignored[:, :, :2] = True
    if regions:
        target = (torch.rand(2, 3, *spatial, generator=gen) > 0.5).float()
        if ignore:
            target = torch.cat([target, ignored.float()], 1)
    else:
        target = torch.randint(0, 3, (2, 1, *spatial), generator=gen)
        if ignore:
            target[ignored] = IGNORE
    return logits, target, ignored if ignore else None


def _loss(name: str, regions: bool, ignore: bool = True, batch_dice: bool = True, **params: float) -> torch.nn.Module:
    return LOSSES[name](regions=regions, batch_dice=batch_dice, ignore_label=IGNORE if ignore else None, **params)


def _value_and_grad(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.clone().requires_grad_(True)
    value = loss(x, target)
    value.backward()
    assert x.grad is not None
    return value.detach(), x.grad


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize(("name", "regions"), CASES)
def test_every_loss_is_finite_and_backpropagates(name: str, regions: bool, dim: int, ignore: bool) -> None:
    logits, target, ignored = _case(regions, dim, ignore)
    value, grad = _value_and_grad(_loss(name, regions, ignore), logits, target)
    assert value.ndim == 0 and torch.isfinite(value)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    if ignored is not None:
        assert (grad * ignored).abs().max() == 0  # no gradient reaches an ignored voxel


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize(("name", "regions"), CASES)
def test_ignored_voxels_change_neither_value_nor_gradient(name: str, regions: bool, batch_dice: bool) -> None:
    logits, target, ignored = _case(regions, dim=2)
    assert ignored is not None
    loss = _loss(name, regions, batch_dice=batch_dice)
    value, grad = _value_and_grad(loss, logits, target)
    changed_logits = torch.where(ignored, torch.randn(logits.shape) * 30, logits)
    changed_target = target.clone()
    if regions:  # the region values under the ignore mask are arbitrary
        changed_target[:, :-1] = torch.where(ignored, 1 - target[:, :-1], target[:, :-1])
    value2, grad2 = _value_and_grad(loss, changed_logits, changed_target)
    assert value2.item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7)
    assert torch.allclose(grad2, grad, atol=1e-8)
    # and the value is the loss of the annotated part alone
    annotated = target[:, :-1, 2:] if regions else target[:, :, 2:]
    alone = LOSSES[name](regions=regions, batch_dice=batch_dice, ignore_label=None)(logits[:, :, 2:], annotated)
    assert value.item() == pytest.approx(alone.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize(("name", "regions"), CASES)
def test_all_ignored_patch_gives_finite_value_and_zero_gradient(name: str, regions: bool) -> None:
    logits, target, _ = _case(regions, dim=2)
    if regions:
        target[:, -1] = 1.0
    else:
        target[:] = IGNORE
    value, grad = _value_and_grad(_loss(name, regions), logits, target)
    assert torch.isfinite(value) and value.item() == pytest.approx(-1.0, abs=1e-6)  # overlap of nothing, no CE
    assert grad.abs().max() == 0


@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("regions", [False, True])
@pytest.mark.parametrize(("name", "params"), [("dice_focal", {"gamma": 0.0}), ("dice_topk", {"k": 100.0}),
                                              ("tversky", {"alpha": 0.5, "beta": 0.5, "ce_weight": 1.0})])
def test_limit_cases_equal_dice_plus_cross_entropy(name: str, params: dict[str, float], regions: bool,
                                                   batch_dice: bool, ignore: bool) -> None:
    logits, target, _ = _case(regions, dim=3, ignore=ignore, seed=4)
    if regions:
        reference = DiceBCELoss(batch_dice=batch_dice, use_ignore=ignore)
    else:
        reference = DiceCELoss(batch_dice=batch_dice, ignore_label=IGNORE if ignore else None)
    value, grad = _value_and_grad(_loss(name, regions, ignore, batch_dice, **params), logits, target)
    ref_value, ref_grad = _value_and_grad(reference, logits, target)
    assert abs(value.item() - ref_value.item()) < 1e-6
    assert torch.allclose(grad, ref_grad, atol=1e-7)


@pytest.mark.parametrize("regions", [False, True])
def test_tversky_at_one_half_is_exactly_the_soft_dice(regions: bool) -> None:
    logits, target, _ = _case(regions, dim=2, ignore=False, seed=5)
    nonlin = "sigmoid" if regions else "softmax"
    for batch_dice in (False, True):
        dice = SoftDiceLoss(apply_nonlin=nonlin, batch_dice=batch_dice, do_bg=regions)(logits, target)
        tv = TverskyLoss(apply_nonlin=nonlin, batch_dice=batch_dice, do_bg=regions, alpha=0.5, beta=0.5)
        assert torch.equal(tv(logits, target), dice)
        # ce_weight=0 leaves the Tversky term alone
        only = _loss("tversky", regions, ignore=False, batch_dice=batch_dice, alpha=0.5, beta=0.5, ce_weight=0.0)
        assert torch.equal(only(logits, target), dice)


@pytest.mark.parametrize(("name", "regions"), CASES)
def test_perfect_prediction_beats_a_wrong_one(name: str, regions: bool) -> None:
    _, target, ignored = _case(regions, dim=2, seed=6)
    assert ignored is not None
    if regions:
        truth = target[:, :-1]
        perfect, wrong = (2 * truth - 1) * 20, (1 - 2 * truth) * 20
    else:
        labels = target.clamp(max=2)[:, 0]
        perfect = torch.nn.functional.one_hot(labels, 3).movedim(-1, 1).float() * 20
        wrong = torch.nn.functional.one_hot((labels + 1) % 3, 3).movedim(-1, 1).float() * 20
    loss = _loss(name, regions)
    good, bad = loss(perfect, target).item(), loss(wrong, target).item()
    assert good == pytest.approx(-1.0, abs=1e-4)  # overlap term -1, cross-entropy ~0
    assert bad > good + 1.0


def test_topk_averages_the_cross_entropy_of_the_hardest_voxels() -> None:
    # 10 voxels in a row, 2 classes, all of class 1; logit of class 1 minus class 0 is `margin`,
    # so the per-voxel cross-entropy is log(1 + exp(-margin))
    margins = [3.0, -2.0, 0.5, 4.0, -1.0, 2.0, 1.0, 5.0, -3.0, 0.0]
    logits = torch.stack([torch.zeros(10), torch.tensor(margins)]).reshape(1, 2, 10)
    target = torch.ones(1, 1, 10, dtype=torch.long)
    ce = [math.log1p(math.exp(-m)) for m in margins]
    dice = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=False)(logits, target).item()
    # k = 20 % of 10 voxels: the two hardest are margins -3 and -2
    value = _loss("dice_topk", False, ignore=False, k=20.0)(logits, target).item()
    assert value == pytest.approx(dice + (ce[8] + ce[1]) / 2, rel=1e-6)
    assert value > dice + sum(ce) / 10  # harder than the plain mean
    # k = 30 %: three hardest (-3, -2, -1)
    value = _loss("dice_topk", False, ignore=False, k=30.0)(logits, target).item()
    assert value == pytest.approx(dice + (ce[8] + ce[1] + ce[4]) / 3, rel=1e-6)
    # ignoring the hardest voxel: 20 % of the 9 counted voxels is 1 voxel, the next hardest (-2)
    with_ignore = target.clone()
    with_ignore[0, 0, 8] = IGNORE
    dice9 = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=False)(
        logits, target, loss_mask=with_ignore != IGNORE).item()
    value = _loss("dice_topk", False, k=20.0)(logits, with_ignore).item()
    assert value == pytest.approx(dice9 + ce[1], rel=1e-6)


def test_topk_for_regions_ranks_voxel_region_pairs() -> None:
    # 1 sample, 2 regions x 5 voxels; BCE of a logit x against target 1 is log(1 + exp(-x))
    x = torch.tensor([[[2.0, -1.0, 0.0, 3.0, 1.0], [-4.0, 0.5, 1.5, 2.5, 4.0]]])
    target = torch.ones(1, 2, 5)
    bce = sorted((math.log1p(math.exp(-v)) for v in x.flatten().tolist()), reverse=True)
    dice = SoftDiceLoss(apply_nonlin="sigmoid", batch_dice=True, do_bg=True)(x, target).item()
    value = _loss("dice_topk", True, ignore=False, k=20.0)(x, target).item()  # 20 % of 10 pairs
    assert value == pytest.approx(dice + (bce[0] + bce[1]) / 2, rel=1e-6)


def test_focal_down_weights_confident_voxels() -> None:
    margins = torch.tensor([4.0, 1.0, -1.0, 0.0])
    logits = torch.stack([torch.zeros(4), margins]).reshape(1, 2, 4)
    target = torch.ones(1, 1, 4, dtype=torch.long)
    p = torch.sigmoid(margins).double()
    expected_focal = ((1 - p) ** 2 * -torch.log(p)).mean().item()
    dice = SoftDiceLoss(apply_nonlin="softmax", batch_dice=True, do_bg=False)(logits, target).item()
    value = _loss("dice_focal", False, ignore=False, gamma=2.0)(logits, target).item()
    assert value == pytest.approx(dice + expected_focal, rel=1e-5)
    plain = DiceCELoss(batch_dice=True)(logits, target).item()
    assert value < plain
    # a fractional gamma stays finite even where the prediction is certain
    certain = torch.stack([torch.zeros(4), torch.full((4,), 200.0)]).reshape(1, 2, 4).requires_grad_(True)
    _loss("dice_focal", False, ignore=False, gamma=0.5)(certain, target).backward()
    assert certain.grad is not None and torch.isfinite(certain.grad).all()


def test_tversky_with_beta_above_alpha_punishes_misses_more_than_false_alarms() -> None:
    # 8 voxels, foreground on the first 4; A misses one foreground voxel, B adds one false voxel
    target = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).reshape(1, 1, 8)
    miss = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0])
    false_alarm = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])

    def logits(pred: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(pred, 2).T.float().reshape(1, 2, 8) * 30

    recall = _loss("tversky", False, ignore=False, alpha=0.3, beta=0.7, ce_weight=0.0)
    assert recall(logits(miss), target).item() == pytest.approx(-3 / (3 + 0.7), abs=1e-5)
    assert recall(logits(false_alarm), target).item() == pytest.approx(-4 / (4 + 0.3), abs=1e-5)
    assert recall(logits(miss), target) > recall(logits(false_alarm), target)
    precision = _loss("tversky", False, ignore=False, alpha=0.7, beta=0.3, ce_weight=0.0)
    assert precision(logits(miss), target) < precision(logits(false_alarm), target)


@pytest.mark.parametrize(("name", "regions"), CASES)
def test_build_loss_deep_supervision_for_every_name(name: str, regions: bool) -> None:
    gen = torch.Generator().manual_seed(7)
    shapes = [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 2, 2)]
    outputs = [torch.randn(*s, generator=gen, requires_grad=True) for s in shapes]
    if regions:
        targets = [torch.cat([(torch.rand(2, 3, *s[2:], generator=gen) > 0.5).float(),
                              (torch.rand(2, 1, *s[2:], generator=gen) > 0.8).float()], 1) for s in shapes]
    else:
        targets = [torch.randint(0, 4, (2, 1, *s[2:]), generator=gen) for s in shapes]  # 3 = ignore
    loss = build_loss(regions=regions, batch_dice=False, ignore_label=IGNORE, n_outputs=3, name=name)
    value = loss(outputs, targets)
    value.backward()
    assert torch.isfinite(value)
    assert outputs[0].grad.abs().sum() > 0 and outputs[1].grad.abs().sum() > 0
    assert outputs[2].grad is None  # zero-weight lowest resolution is skipped
    single = build_loss(regions=regions, batch_dice=False, ignore_label=IGNORE, n_outputs=1, name=name)
    w = deep_supervision_weights(3)
    expected = w[0] * single(outputs[0], targets[0]) + w[1] * single(outputs[1], targets[1])
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("ignore", [None, IGNORE])
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("regions", [False, True])
def test_default_build_loss_is_unchanged(regions: bool, batch_dice: bool, ignore: int | None) -> None:
    logits, target, _ = _case(regions, dim=3, ignore=ignore is not None, seed=8)
    if regions:
        direct: torch.nn.Module = DiceBCELoss(batch_dice=batch_dice, use_ignore=ignore is not None)
    else:
        direct = DiceCELoss(batch_dice=batch_dice, ignore_label=ignore)
    ref_value, ref_grad = _value_and_grad(direct, logits, target)
    default_name = "dice_bce" if regions else "dice_ce"
    for kwargs in ({}, {"name": None}, {"name": default_name, "params": {}}):
        loss = build_loss(regions=regions, batch_dice=batch_dice, ignore_label=ignore, n_outputs=1, **kwargs)
        assert type(loss) is type(direct)
        value, grad = _value_and_grad(loss, logits, target)
        assert torch.equal(value, ref_value) and torch.equal(grad, ref_grad)
    # with deep supervision (and DDP's tiny weight for the unused head)
    outputs = [logits, logits[:, :, ::2, ::2, ::2], logits[:, :, ::4, ::4, ::4]]
    targets = [target, target[:, :, ::2, ::2, ::2], target[:, :, ::4, ::4, ::4]]
    ds = build_loss(regions=regions, batch_dice=batch_dice, ignore_label=ignore, n_outputs=3, unused_weight=1e-6)
    expected = DeepSupervisionLoss(direct, [2 / 3, 1 / 3, 1e-6])(outputs, targets)
    assert torch.equal(ds(outputs, targets), expected)


@pytest.mark.parametrize(("name", "params", "words"), [
    ("dice_topk", {"k": 0}, ["'dice_topk'", "k=0", "0 < k <= 100"]),
    ("dice_topk", {"k": 150.0}, ["'dice_topk'", "k=150.0", "0 < k <= 100"]),
    ("dice_topk", {"k": float("nan")}, ["'dice_topk'", "k=nan", "0 < k <= 100"]),
    ("dice_topk", {"k": "ten"}, ["'dice_topk'", "k='ten'", "not a number"]),
    ("dice_focal", {"gamma": -1}, ["'dice_focal'", "gamma=-1", "gamma >= 0"]),
    ("tversky", {"alpha": -0.1}, ["'tversky'", "alpha=-0.1", "alpha >= 0"]),
    ("tversky", {"beta": -1.0}, ["'tversky'", "beta=-1.0", "beta >= 0"]),
    ("tversky", {"alpha": 0.0, "beta": 0.0}, ["'tversky'", "alpha=0.0", "alpha + beta > 0"]),
    ("tversky", {"ce_weight": -1.0}, ["'tversky'", "ce_weight=-1.0", "ce_weight >= 0"]),
])
@pytest.mark.parametrize("regions", [False, True])
def test_bad_parameters_name_loss_parameter_value_and_range(name: str, params: dict[str, object], words: list[str],
                                                            regions: bool) -> None:
    for make in (lambda: LOSSES[name](regions=regions, batch_dice=True, ignore_label=None, **params),
                 lambda: build_loss(regions=regions, batch_dice=True, ignore_label=None, n_outputs=1, name=name,
                                    params=params)):
        with pytest.raises(TrainingConfigError) as err:
            make()
        for word in words:
            assert word in str(err.value)


def test_unknown_names_and_parameters_suggest_the_closest() -> None:
    kwargs = {"regions": False, "batch_dice": True, "ignore_label": None, "n_outputs": 1}
    with pytest.raises(TrainingConfigError, match="did you mean 'dice_focal'") as err:
        build_loss(**kwargs, name="dice_focall")
    assert all(name in str(err.value) for name in LOSSES)
    with pytest.raises(TrainingConfigError, match="'nonsense'") as err:
        build_loss(**kwargs, name="nonsense")
    assert "did you mean" not in str(err.value) and "dice_ce" in str(err.value)
    with pytest.raises(TrainingConfigError, match="did you mean 'gamma'"):
        build_loss(**kwargs, name="dice_focal", params={"gama": 1.0})
    with pytest.raises(TrainingConfigError, match="no parameter 'k'.*tunable: none"):
        build_loss(**kwargs, name="dice_ce", params={"k": 5.0})
    with pytest.raises(TrainingConfigError, match="'batch_dice' is set from the configuration"):
        build_loss(**kwargs, name="dice_topk", params={"batch_dice": False})


def test_dice_ce_and_dice_bce_point_to_each_other() -> None:
    with pytest.raises(TrainingConfigError, match="use 'dice_bce'"):
        build_loss(regions=True, batch_dice=True, ignore_label=None, n_outputs=1, name="dice_ce")
    with pytest.raises(TrainingConfigError, match="use 'dice_ce'"):
        build_loss(regions=False, batch_dice=True, ignore_label=None, n_outputs=1, name="dice_bce")


def test_params_reach_the_loss() -> None:
    kwargs = {"regions": False, "batch_dice": True, "ignore_label": None, "n_outputs": 1}
    logits, target, _ = _case(False, dim=2, ignore=False, seed=9)
    k5 = build_loss(**kwargs, name="dice_topk", params={"k": 5})(logits, target)
    k50 = build_loss(**kwargs, name="dice_topk", params={"k": 50.0})(logits, target)
    assert k5 > k50  # fewer, harder voxels


def test_factories_are_introspectable_for_a_registry() -> None:
    assert {"dice_ce", "dice_bce", "dice_topk", "dice_focal", "tversky"} <= set(LOSSES)
    for name, factory in LOSSES.items():
        params = inspect.signature(factory, eval_str=True).parameters
        assert list(params)[:3] == ["regions", "batch_dice", "ignore_label"], name
        for p in params.values():
            assert p.kind is inspect.Parameter.KEYWORD_ONLY, (name, p.name)
            if p.name not in ("regions", "batch_dice", "ignore_label"):
                assert p.annotation is float and isinstance(p.default, float), (name, p.name)
        doc = inspect.getdoc(factory) or ""
        summary, _, details = doc.partition("\n\n")
        assert summary and "\n" not in summary and details, name
