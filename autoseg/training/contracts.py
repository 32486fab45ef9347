"""The contract every network, loss and augmentation part keeps: checks a part's author runs in their own tests.

Like scikit-learn's estimator checks, each function exercises a part on tiny synthetic inputs and raises
``AssertionError`` naming the part and what it got wrong::

    from autoseg.training.contracts import check_augmentation, check_loss, check_network

    def test_tiny_net_keeps_the_contract():
        check_network("tiny_net")                  # a registered name, a PluginInfo or a NetworkPart

    def test_tiny_loss_keeps_the_contract():
        check_loss(TINY_LOSS, params={"w": 2.0})   # a PluginInfo, a name, or the factory itself

A check that cannot run here (the part's optional dependency or ``onnx``/``onnxruntime`` is missing) raises
:class:`unittest.SkipTest`, which pytest and unittest report as a skip. autoseg's own suite (``tests/contracts``)
runs these checks on every entry of :func:`~autoseg.training.parts.part_tables`, so installing a package that
registers a part puts that part under the contract too.

What each check demands is listed in :data:`NETWORK_CHECKS` and in the docstrings of :func:`check_network`,
:func:`check_loss` and :func:`check_augmentation`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import SkipTest

import numpy as np
import torch
from torch import nn

from autoseg.errors import MissingDependencyError, OnnxUnavailableError, TrainingConfigError
from autoseg.networks.parts import NetworkPart, get_network_part
from autoseg.networks.topology import UNetTopology
from autoseg.registry import PluginInfo, lookup
from autoseg.training.augmentation import augmentation_params, training_transforms
from autoseg.training.augmentation_presets import AugmentationPreset
from autoseg.training.losses import build_loss

__all__ = ["NETWORK_CHECKS", "check_augmentation", "check_loss", "check_network", "check_part",
           "contract_topologies"]

#: the network checks, in the order :func:`check_network` runs them
NETWORK_CHECKS = ("outputs", "check_input", "gradients", "determinism", "state_dict", "parameter_count",
                  "cost_model", "onnx")
IN_CHANNELS, NUM_CLASSES, BATCH, SEED = 2, 3, 2, 1234


def _brief(err: BaseException, limit: int = 300) -> str:
    """``Type: message``, cut to ``limit`` characters (exporters put whole graphs in their messages)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


def _require(ok: Any, where: str, what: str) -> None:
    """``AssertionError(f"{where}: {what}")`` unless ``ok``."""
    if not ok:
        raise AssertionError(f"{where}: {what}")


def _select(checks: Iterable[str] | None, known: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(known) if checks is None else tuple(checks)
    unknown = [c for c in chosen if c not in known]
    if unknown or not chosen:
        raise ValueError(f"checks={checks!r}: choose among {', '.join(known)} (None runs them all).")
    return chosen


def _ndims(ndims: Iterable[int]) -> tuple[int, ...]:
    out = tuple(ndims)
    if not out or any(n not in (2, 3) for n in out):
        raise ValueError(f"ndims={ndims!r}: give a non-empty selection of 2 and 3.")
    return out


def _created(kind: str, name_or_obj: Any, params: Mapping[str, Any] | None) -> tuple[str, Any]:
    """``(label, object)``: a registered name or a :class:`PluginInfo` is built with ``params``; any other object is
    returned as it is (``params`` must then be None)."""
    if isinstance(name_or_obj, str):
        from autoseg.training.parts import part_tables

        info = lookup(name_or_obj, part_tables()[kind], kind)
        return info.name, info.create(params)
    if isinstance(name_or_obj, PluginInfo):
        _require(name_or_obj.kind == kind, f"{kind} {name_or_obj.name!r}", f"is a {name_or_obj.kind} part")
        return name_or_obj.name, name_or_obj.create(params)
    if params:
        raise ValueError(f"params={dict(params)!r} applies to a part name or PluginInfo, not to a "
                         f"{type(name_or_obj).__name__}; bind them yourself.")
    return getattr(name_or_obj, "__name__", type(name_or_obj).__name__), name_or_obj


# ---- networks ---------------------------------------------------------------------------------------------
def contract_topologies(ndim: int) -> list[UNetTopology]:
    """The tiny topologies networks are checked on: 3 stages of 4-8-16 features; in 3D also an anisotropic one
    whose first pooling is ``(1, 2, 2)`` with ``(1, 3, 3)`` kernels before it."""
    nd = ndim

    def topo(strides: tuple[tuple[int, ...], ...], kernels: tuple[tuple[int, ...], ...]) -> UNetTopology:
        return UNetTopology(strides=strides, kernel_sizes=kernels, features_per_stage=(4, 8, 16),
                            n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1)).check()

    out = [topo(((1,) * nd, (2,) * nd, (2,) * nd), ((3,) * nd,) * 3)]
    if nd == 3:
        out.append(topo(((1, 1, 1), (1, 2, 2), (2, 2, 2)), ((1, 3, 3), (1, 3, 3), (3, 3, 3))))
    return out


@dataclass(frozen=True)
class _NetCase:
    """One network part on one topology, at the patch the part accepts."""

    label: str
    part: NetworkPart
    topology: UNetTopology
    patch: tuple[int, ...]

    @property
    def where(self) -> str:
        return (f"network {self.label!r} ({self.topology.ndim}D, strides {list(map(list, self.topology.strides))}, "
                f"patch {self.patch})")

    def build(self, *, seed: int | None = None, deep_supervision: bool = True) -> nn.Module:
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return self.part.build(self.topology, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                                   deep_supervision=deep_supervision)
        except (MissingDependencyError, ModuleNotFoundError) as err:
            raise SkipTest(f"network {self.label!r} cannot be built here: {err}") from err
        except Exception as err:  # noqa: BLE001 - any failure of the part's code is reported with the case
            raise AssertionError(f"{self.where}: build(in_channels={IN_CHANNELS}, num_classes={NUM_CLASSES}, "
                                 f"deep_supervision={deep_supervision}) raised {_brief(err)}") from err

    def input(self, batch: int = BATCH, channels: int = IN_CHANNELS, patch: Sequence[int] | None = None
              ) -> torch.Tensor:
        gen = torch.Generator().manual_seed(SEED)
        return torch.randn(batch, channels, *(patch or self.patch), generator=gen)

    def head_shapes(self, batch: int = BATCH) -> list[tuple[int, ...]]:
        """The deep-supervision outputs the trainer supervises: one per decoder stage (one for a single-stage
        network), stage ``i`` at ``patch / cumprod(strides[: i + 1])``, highest resolution first."""
        n = max(1, self.topology.n_stages - 1)
        cum, shapes = [1] * self.topology.ndim, []
        for stride in self.topology.strides[:n]:
            cum = [c * s for c, s in zip(cum, stride, strict=True)]
            shapes.append((batch, NUM_CLASSES, *(p // c for p, c in zip(self.patch, cum, strict=True))))
        return shapes


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _shapes(out: Any) -> Any:
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else tuple(out.shape)


def _net_outputs(case: _NetCase) -> None:
    x = case.input()
    net = case.build(deep_supervision=True)
    with torch.no_grad():
        out = net(x)
    expected = case.head_shapes()
    _require(isinstance(out, (list, tuple)), case.where, "with deep_supervision=True forward must return a list of "
             f"logits, highest resolution first, {expected}; it returned a {type(out).__name__} {_shapes(out)}")
    _require(_shapes(out) == expected, case.where, f"with deep_supervision=True the outputs have shapes "
             f"{_shapes(out)}; expected {expected}: one (batch, num_classes, *patch / cumprod(strides)) per decoder "
             "stage, highest resolution first, the targets the trainer builds (training would stop at the first "
             "step with DeepSupervisionLoss's mismatch)")
    full = (BATCH, NUM_CLASSES, *case.patch)
    for how, net in (("built with deep_supervision=False", case.build(deep_supervision=False)),
                     ("after net.deep_supervision = False", net)):
        net.deep_supervision = False
        with torch.no_grad():
            out = net(x)
        _require(isinstance(out, torch.Tensor) and tuple(out.shape) == full, case.where,
                 f"{how}, forward must return the full-resolution logits {full}; got {_shapes(out)}")


def _net_check_input(case: _NetCase) -> None:
    net = case.build()
    for attr, value in (("in_channels", IN_CHANNELS), ("num_classes", NUM_CLASSES)):
        _require(getattr(net, attr, None) == value, case.where,
                 f"net.{attr} is {getattr(net, attr, None)!r}, expected {value}")
    _require(callable(getattr(net, "check_input", None)), case.where, "the network has no check_input(x)")
    try:
        net.check_input(case.input())
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{case.where}: check_input refused a fitting input {(BATCH, IN_CHANNELS, *case.patch)} "
                             f"({_brief(err)})") from err
    wrong = case.input(channels=IN_CHANNELS + 1)
    try:
        net.check_input(wrong)
    except Exception:  # noqa: BLE001 - any error refuses it
        return
    raise AssertionError(f"{case.where}: check_input accepted {tuple(wrong.shape)}, which has {IN_CHANNELS + 1} "
                         f"channels for a network built with in_channels={IN_CHANNELS}")


def _net_gradients(case: _NetCase) -> None:
    net = case.build(seed=SEED).train()
    gen = torch.Generator().manual_seed(SEED)
    outs = _as_list(net(case.input(batch=1)))
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).mean() for o in outs)
    loss.backward()
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if p.grad is None]
    _require(not missing, case.where, f"{len(missing)} of {len(named)} parameters got no gradient from a backward "
             f"pass through every deep-supervision output: {', '.join(missing[:8])}{' ...' * (len(missing) > 8)}")
    bad = [n for n, p in named if not torch.isfinite(p.grad).all()]
    _require(not bad, case.where, f"non-finite gradients in {', '.join(bad[:8])}")


def _equal_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = _as_list(a(x)), _as_list(b(x))
    return len(ya) == len(yb) and all(torch.equal(u, v) for u, v in zip(ya, yb, strict=True))


def _net_determinism(case: _NetCase) -> None:
    a, b = case.build(seed=SEED), case.build(seed=SEED)
    sa, sb = a.state_dict(), b.state_dict()
    _require(list(sa) == list(sb), case.where, "two builds have different state_dict keys")
    differ = [k for k in sa if not torch.equal(sa[k], sb[k])]
    _require(not differ, case.where, f"two builds after torch.manual_seed({SEED}) differ in {', '.join(differ[:8])}; "
             "initialise from torch's global generator only")
    _require(_equal_outputs(a, b, case.input(batch=1)), case.where, f"two builds after torch.manual_seed({SEED}) give "
             "different outputs for the same input in eval mode")


def _net_state_dict(case: _NetCase) -> None:
    trained, fresh = case.build(seed=SEED), case.build(seed=SEED + 1)
    try:
        fresh.load_state_dict(trained.state_dict())
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{case.where}: a fresh build refuses the state_dict of another ({_brief(err)})") from err
    _require(_equal_outputs(trained, fresh, case.input(batch=1)), case.where, "a fresh build with the state_dict of "
             "another loaded gives different outputs (state outside the state_dict?)")


def _net_parameter_count(case: _NetCase) -> None:
    net = case.build()
    actual = sum(p.numel() for p in net.parameters() if p.requires_grad)
    counted = case.part.count_parameters(case.topology, in_channels=IN_CHANNELS, num_classes=NUM_CLASSES)
    _require(counted == actual, case.where, f"count_parameters says {counted}, the built network has {actual} "
             "trainable parameters")


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and math.isfinite(value) and value > 0


def _net_cost_model(case: _NetCase) -> None:
    part, topo = case.part, case.topology
    bigger = part.fit_patch(tuple(2 * p for p in case.patch))
    _require(math.prod(bigger) > math.prod(case.patch), case.where,
             f"fit_patch of the doubled patch gives {bigger}, not larger than {case.patch}")
    fme = [part.feature_map_elements(topo, p, num_classes=NUM_CLASSES) for p in (case.patch, bigger)]
    _require(_positive(fme[0]) and fme[1] > fme[0], case.where, f"feature_map_elements must be > 0 and grow with "
             f"the patch; got {fme[0]!r} at {case.patch} and {fme[1]!r} at {bigger}")

    def estimate(patch: tuple[int, ...], batch: int) -> Any:
        return part.estimate_training_bytes(topo, patch, batch_size=batch, in_channels=IN_CHANNELS,
                                            num_classes=NUM_CLASSES)

    one, two, big = estimate(case.patch, 1), estimate(case.patch, 2), estimate(bigger, 1)
    _require(_positive(one) and two > one and big > one, case.where, "estimate_training_bytes must be > 0 and grow "
             f"with batch and patch; got {one!r} (batch 1), {two!r} (batch 2), {big!r} (batch 1 at {bigger})")


def _net_onnx(case: _NetCase) -> None:
    if not case.part.exports_onnx:
        return
    from autoseg.inference.onnx_backend import EXPORT_RTOL, compare_with_torch, network_to_onnx, require

    try:
        require("onnx")
        require("onnxruntime")
    except OnnxUnavailableError as err:
        raise SkipTest(f"{case.where}: ONNX check skipped, {err}") from err
    net = case.build(seed=SEED)
    try:
        data = network_to_onnx(net, in_channels=IN_CHANNELS, patch_size=case.patch)
        diff, scale = compare_with_torch(data, net, in_channels=IN_CHANNELS, spatial=case.patch)
    except Exception as err:  # noqa: BLE001 - the exporter and ONNX Runtime raise many types
        raise AssertionError(f"{case.where}: exports_onnx is True but the ONNX export or its run failed "
                             f"({_brief(err)}); fix it or set exports_onnx = False on the part") from err
    _require(diff <= EXPORT_RTOL * max(1.0, scale), case.where, f"ONNX Runtime's logits differ from torch's by "
             f"{diff:.3g} (logits up to {scale:.3g}; allowed {EXPORT_RTOL} of that)")


_NETWORK_CHECKS: dict[str, Callable[[_NetCase], None]] = {
    "outputs": _net_outputs, "check_input": _net_check_input, "gradients": _net_gradients,
    "determinism": _net_determinism, "state_dict": _net_state_dict, "parameter_count": _net_parameter_count,
    "cost_model": _net_cost_model, "onnx": _net_onnx}


def _network_cases(label: str, part: NetworkPart, ndims: Sequence[int]) -> list[_NetCase]:
    cases = []
    for nd in ndims:
        for planned in contract_topologies(nd):
            topo = part.topology(planned)
            wanted = tuple(4 * d for d in topo.divisible_by)
            patch = tuple(int(v) for v in part.fit_patch(wanted))
            _require(len(patch) == nd and min(patch) >= 1, f"network {label!r}",
                     f"fit_patch({wanted}) gave {patch}, not {nd} positive sizes")
            cases.append(_NetCase(label, part, topo, patch))
    return cases


def check_network(name_or_part: str | PluginInfo | NetworkPart, *, ndims: Iterable[int] = (2, 3),
                  params: Mapping[str, Any] | None = None, checks: Iterable[str] | None = None) -> None:
    """Check a network part against the contract, on :func:`contract_topologies` at the patch its ``fit_patch``
    gives for ``4 x divisible_by`` (2 input channels, 3 classes; batch 2 for the output shapes, 1 elsewhere). Torch's
    global generator is seeded by the checks and restored afterwards.

    The checks (:data:`NETWORK_CHECKS`; ``checks`` picks some, None runs all in that order):

    * ``outputs``: with deep supervision, a list with one ``(B, num_classes, *patch / cumprod(strides))`` per decoder
      stage, highest resolution first (the targets the trainer builds); without (built so, or the attribute set to
      False), the full-resolution tensor;
    * ``check_input``: ``in_channels``/``num_classes`` attributes; ``check_input`` accepts the patch and refuses a
      wrong channel count;
    * ``gradients``: after one backward pass through every output, each trainable parameter has a finite ``grad``;
    * ``determinism``: two builds after ``torch.manual_seed`` give identical state dicts and outputs;
    * ``state_dict``: a fresh build with another's state dict loaded gives identical outputs;
    * ``parameter_count``: ``count_parameters`` equals the built network's trainable parameters;
    * ``cost_model``: ``feature_map_elements`` and ``estimate_training_bytes`` are positive and grow with the patch
      (and the estimate with the batch);
    * ``onnx`` (when ``exports_onnx``): exported with ``network_to_onnx``, ONNX Runtime matches torch within
      ``EXPORT_RTOL`` (1e-4) of the largest logit; a skip when onnx or onnxruntime is missing.

    Args:
        name_or_part: a registered network's name, a :class:`PluginInfo` of kind ``network``, or a ``NetworkPart``.
        ndims: the dimensionalities to check (2 and/or 3; 3D includes the anisotropic topology).
        params: the part's parameters (with a name or PluginInfo).
        checks: the checks to run.

    Raises:
        AssertionError: the part breaks the contract (the message names it, the case and what failed).
        unittest.SkipTest: the part cannot be built here (a missing optional dependency), or onnx is missing.
        ValueError: unknown ``checks`` or ``ndims``.
    """
    if isinstance(name_or_part, str):
        label, part = name_or_part, get_network_part(name_or_part, params)
    else:
        label, part = _created("network", name_or_part, params)
    _require(isinstance(part, NetworkPart), f"network {label!r}", f"is a {type(part).__name__}, not a NetworkPart")
    selected = _select(checks, NETWORK_CHECKS)
    cases = _network_cases(label, part, _ndims(ndims))
    state = torch.get_rng_state()
    try:
        for check in selected:
            for case in cases:
                _NETWORK_CHECKS[check](case)
    finally:
        torch.set_rng_state(state)


# ---- losses -----------------------------------------------------------------------------------------------
LOSS_CLASSES, LOSS_IGNORE, LOSS_SIZE = 3, 3, 8


@dataclass(frozen=True)
class _LossCase:
    """One mode of a loss on one synthetic batch: logits ``(2, 3, 8...)``, the mode's target and the ignored voxels
    (the first two slices along the first spatial axis)."""

    label: str
    factory: Callable[..., nn.Module]
    regions: bool
    ndim: int
    ignore: bool
    batch_dice: bool

    @property
    def where(self) -> str:
        return (f"loss {self.label!r} ({'regions' if self.regions else 'labels'}, {self.ndim}D, "
                f"ignore_label={self.ignore_label}, batch_dice={self.batch_dice})")

    @property
    def ignore_label(self) -> int | None:
        return LOSS_IGNORE if self.ignore else None

    def kwargs(self) -> dict[str, Any]:
        return {"regions": self.regions, "batch_dice": self.batch_dice, "ignore_label": self.ignore_label}

    def loss(self) -> nn.Module:
        try:
            return self.factory(**self.kwargs())
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"{self.where}: the factory raised {_brief(err)} although it accepts "
                                 "this mode without an ignore label") from err

    def ignored(self) -> torch.Tensor:
        mask = torch.zeros(2, 1, *(LOSS_SIZE,) * self.ndim, dtype=torch.bool)
        if self.ignore:
            mask[:, :, :2] = True
        return mask

    def data(self, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the target in the mode's convention (int16 labels as the pipeline gives them, or float
        region masks with the last ignore channel)."""
        gen = torch.Generator().manual_seed(seed)
        spatial = (LOSS_SIZE,) * self.ndim
        logits = torch.randn(2, LOSS_CLASSES, *spatial, generator=gen) * 2
        if self.regions:
            target = (torch.rand(2, LOSS_CLASSES, *spatial, generator=gen) > 0.5).float()
            return logits, torch.cat([target, self.ignored().float()], 1) if self.ignore else target
        target = torch.randint(0, LOSS_CLASSES, (2, 1, *spatial), generator=gen).to(torch.int16)
        return logits, target.masked_fill(self.ignored(), LOSS_IGNORE)


def _value_and_grad(case: _LossCase, loss: nn.Module, logits: Any, target: Any) -> tuple[torch.Tensor, Any]:
    xs = [x.detach().clone().requires_grad_(True) for x in _as_list(logits)]
    try:
        value = loss(xs if isinstance(logits, list) else xs[0], target)
    except Exception as err:  # noqa: BLE001
        raise AssertionError(f"{case.where}: the loss raised {_brief(err)}") from err
    _require(isinstance(value, torch.Tensor) and value.ndim == 0, case.where,
             f"the loss must be a scalar tensor; got {_shapes(value) if isinstance(value, torch.Tensor) else value!r}")
    _require(torch.isfinite(value), case.where, f"the loss is {value.item()}")
    value.backward()
    grads = [x.grad for x in xs]  # with deep supervision a zero-weight output may get none
    _require(grads[0] is not None and all(g is None or torch.isfinite(g).all() for g in grads), case.where,
             "backward gives no or non-finite gradients for the (full-resolution) logits")
    return value.detach(), grads if isinstance(logits, list) else grads[0]


def _loss_basics(case: _LossCase) -> None:
    logits, target = case.data()
    _, grad = _value_and_grad(case, case.loss(), logits, target)
    _require(grad.abs().sum() > 0, case.where, "the gradient of the logits is zero everywhere")
    if case.ignore:
        _require((grad * case.ignored()).abs().max() == 0, case.where, "ignored voxels get a gradient")


def _loss_ignore(case: _LossCase) -> None:
    """Other logits (and region values) at ignored voxels change neither the value nor the other gradients."""
    logits, target = case.data()
    loss, ignored = case.loss(), case.ignored()
    value, grad = _value_and_grad(case, loss, logits, target)
    gen = torch.Generator().manual_seed(SEED + 1)
    changed = torch.where(ignored, torch.randn(logits.shape, generator=gen) * 30, logits)
    changed_target = target.clone()
    if case.regions:
        changed_target[:, :-1] = torch.where(ignored, 1 - target[:, :-1], target[:, :-1])
    value2, grad2 = _value_and_grad(case, loss, changed, changed_target)
    _require(math.isclose(value.item(), value2.item(), rel_tol=1e-5, abs_tol=1e-6), case.where,
             f"changing the logits (and region values) of ignored voxels changes the loss {value.item():.7g} -> "
             f"{value2.item():.7g}")
    keep = ~ignored.expand_as(grad)
    _require(torch.allclose(grad[keep], grad2[keep], rtol=1e-5, atol=1e-7), case.where,
             "changing the logits of ignored voxels changes the gradient of the other voxels")


def _loss_ranking(case: _LossCase) -> None:
    _, target = case.data()
    if case.regions:
        truth = target[:, :LOSS_CLASSES]
        good, bad = (2 * truth - 1) * 20, (1 - 2 * truth) * 20
    else:
        labels = target.long().clamp(max=LOSS_CLASSES - 1)[:, 0]
        good = nn.functional.one_hot(labels, LOSS_CLASSES).movedim(-1, 1).float() * 20
        bad = nn.functional.one_hot((labels + 1) % LOSS_CLASSES, LOSS_CLASSES).movedim(-1, 1).float() * 20
    loss = case.loss()
    v_good, _ = _value_and_grad(case, loss, good, target)
    v_bad, _ = _value_and_grad(case, loss, bad, target)
    _require(v_good < v_bad, case.where, f"a near-perfect prediction scores {v_good.item():.5g}, not lower than a "
             f"wrong one ({v_bad.item():.5g})")


def _loss_deep_supervision(case: _LossCase) -> None:
    """Through ``build_loss(..., n_outputs=3, factory=...)`` with outputs and targets at full, 1/2 and 1/4 size."""
    logits, target = case.data()
    loss = build_loss(**case.kwargs(), n_outputs=3, factory=case.factory)
    steps = [1, 2, 4]
    outs = [logits[(slice(None), slice(None), *(slice(None, None, s),) * case.ndim)] for s in steps]
    targets = [target[(slice(None), slice(None), *(slice(None, None, s),) * case.ndim)] for s in steps]
    _, grads = _value_and_grad(case, loss, outs, targets)
    _require(grads[0].abs().sum() > 0, case.where, "with deep supervision the full-resolution output gets no gradient")


def _loss_modes(label: str, factory: Callable[..., nn.Module]) -> list[bool]:
    """The modes (``regions`` False/True) the loss accepts; it may refuse one with TrainingConfigError."""
    modes = []
    for regions in (False, True):
        try:
            factory(regions=regions, batch_dice=True, ignore_label=None)
        except TrainingConfigError:
            continue
        except Exception as err:  # noqa: BLE001
            raise AssertionError(f"loss {label!r}: factory(regions={regions}, batch_dice=True, ignore_label=None) "
                                 f"raised {_brief(err)}; refuse a mode with TrainingConfigError") from err
        modes.append(regions)
    _require(modes, f"loss {label!r}", "refuses both label and region training")
    return modes


def check_loss(name_or_factory: str | PluginInfo | Callable[..., nn.Module], *,
               params: Mapping[str, Any] | None = None) -> None:
    """Check a loss part against the conventions of :mod:`autoseg.training.losses`.

    For label mode (3 classes, int16 targets ``(B, 1, *sp)``) and region mode (3 regions, float targets plus the
    last ignore channel), each the part accepts (it may refuse one with ``TrainingConfigError``, not both), in 2D
    and 3D, with and without ignore label 3, with and without batch Dice: the loss is a finite scalar; backward
    gives finite, non-zero gradients and none at ignored voxels; changing what lies under ignored voxels changes
    neither the value nor the other gradients; a near-perfect prediction scores lower than a wrong one; and
    ``build_loss(..., n_outputs=3, factory=...)`` works on lists of outputs and targets (full, 1/2, 1/4 size).

    Args:
        name_or_factory: a registered loss's name, a :class:`PluginInfo` of kind ``loss``, or a factory
            ``f(*, regions, batch_dice, ignore_label) -> nn.Module``.
        params: the part's parameters (with a name or PluginInfo).

    Raises:
        AssertionError: the part breaks the contract (the message names it, the case and what failed).
    """
    label, factory = _created("loss", name_or_factory, params)
    _require(callable(factory), f"loss {label!r}", f"build gave a {type(factory).__name__}, not a factory")
    for regions in _loss_modes(label, factory):
        for ndim in (2, 3):
            for ignore in (False, True):
                for batch_dice in (False, True):
                    case = _LossCase(label, factory, regions, ndim, ignore, batch_dice)
                    _loss_basics(case)
                    if ignore:
                        _loss_ignore(case)
                    _loss_ranking(case)
                    _loss_deep_supervision(case)


# ---- augmentations ----------------------------------------------------------------------------------------
#: patches augmentations are checked on: 2D, 3D and a dummy-2D 3D one (augmented slice by slice)
AUGMENTATION_PATCHES = {2: ((24, 24),), 3: ((16, 16, 16), (4, 16, 16))}
AUGMENTATION_LABELS = (0, 1, 3)  # no 2: an interpolated in-between label would show
AUGMENTATION_BATCH, AUGMENTATION_SEEDS = 4, (0, 1, 2)


def _synthetic_batch(shape: Sequence[int], seed: int = SEED) -> dict[str, np.ndarray]:
    """A loader's batch: 2-channel images following a blob label map of :data:`AUGMENTATION_LABELS`, seg -1 on a
    border slab (outside the imaged region)."""
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    seg = np.zeros((AUGMENTATION_BATCH, 1, *shape), dtype=np.int16)
    for b in range(AUGMENTATION_BATCH):
        centre = rng.uniform(-0.3, 0.3, len(shape))
        radius = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)))
        seg[b, 0][radius < 0.7] = AUGMENTATION_LABELS[1]
        seg[b, 0][radius < 0.35] = AUGMENTATION_LABELS[2]
        seg[b, 0, -2:] = -1
    data = np.concatenate([seg * 1.0, -seg * 0.5], 1) + rng.normal(0, 0.1, (AUGMENTATION_BATCH, 2, *shape))
    return {"data": data.astype(np.float32), "seg": seg}


def _augmented(pipeline: Any, batch: Mapping[str, np.ndarray], seed: int) -> dict[str, Any]:
    """The pipeline's output for a copy of ``batch`` at numpy seed ``seed``; Python's and torch's generators are
    moved to other states first, so a step drawing from them shows as non-deterministic."""
    random.seed(seed + 101)
    torch.manual_seed(seed + 202)
    np.random.seed(seed)
    return pipeline(**{k: v.copy() for k, v in batch.items()})


def _check_augmented(where: str, out: Mapping[str, Any], batch: Mapping[str, np.ndarray], patch: tuple[int, ...]
                     ) -> None:
    data, target = out.get("data"), out.get("target")
    _require(isinstance(data, torch.Tensor) and isinstance(target, torch.Tensor), where,
             f"the pipeline must give torch tensors data and target; got {type(data).__name__}, "
             f"{type(target).__name__}")
    want_data, want_target = (AUGMENTATION_BATCH, batch["data"].shape[1], *patch), (AUGMENTATION_BATCH, 1, *patch)
    _require(tuple(data.shape) == want_data and tuple(target.shape) == want_target, where,
             f"data {tuple(data.shape)} and target {tuple(target.shape)}; expected {want_data} and {want_target} "
             "(the network patch)")
    _require(bool(torch.isfinite(data).all()), where, "the augmented data holds non-finite values")
    allowed = {max(0, int(v)) for v in np.unique(batch["seg"])}
    new = sorted(set(torch.unique(target).tolist()) - allowed)
    _require(not new, where, f"the target holds label values {new} the input did not have ({sorted(allowed)})")


def _augmentation_preset(name_or_factory: Any, params: Mapping[str, Any] | None) -> tuple[str, AugmentationPreset]:
    label, made = _created("augmentation", name_or_factory, params)
    preset = made if isinstance(made, AugmentationPreset) else made() if callable(made) else made
    _require(isinstance(preset, AugmentationPreset), f"augmentation {label!r}",
             f"the factory gave a {type(preset).__name__}, not an AugmentationPreset")
    return label, preset


def check_augmentation(name_or_factory: str | PluginInfo | Callable[[], AugmentationPreset] | AugmentationPreset, *,
                       params: Mapping[str, Any] | None = None, ndims: Iterable[int] = (2, 3)) -> None:
    """Check an augmentation part: the pipeline of ``training_transforms(augmentation_params(patch), ...,
    preset=...)`` (label training, no ignore label, no deep supervision) on a synthetic batch of 4 samples with
    labels 0, 1, 3 and a -1 border, for the patches of :data:`AUGMENTATION_PATCHES` (2D, 3D, dummy 2D), at three
    numpy seeds: data and target have the patch's shape and are torch tensors, the data is finite, the target holds
    no label value the input did not have, and the same numpy seed gives the same batch (with Python's and torch's
    generators in other states).

    Args:
        name_or_factory: a registered augmentation's name, a :class:`PluginInfo` of kind ``augmentation``, a factory
            ``f() -> AugmentationPreset`` or a preset.
        params: the part's parameters (with a name or PluginInfo).
        ndims: the dimensionalities to check.

    Raises:
        AssertionError: the part breaks the contract (the message names it, the patch and what failed).
    """
    label, preset = _augmentation_preset(name_or_factory, params)
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        for patch in (p for nd in _ndims(ndims) for p in AUGMENTATION_PATCHES[nd]):
            where = f"augmentation {label!r} (patch {patch})"
            aug = augmentation_params(patch)
            pipeline = training_transforms(aug, label_values=AUGMENTATION_LABELS, regions=None, ignore_label=None,
                                           ds_scales=None, preset=preset)
            batch = _synthetic_batch(aug.initial_patch_size)
            outs = [_augmented(pipeline, batch, seed) for seed in AUGMENTATION_SEEDS]
            for out in outs:
                _check_augmented(where, out, batch, patch)
            again = _augmented(pipeline, batch, AUGMENTATION_SEEDS[0])
            _require(all(torch.equal(outs[0][k], again[k]) for k in ("data", "target")), where,
                     f"numpy seed {AUGMENTATION_SEEDS[0]} gives a different batch the second time (randomness not "
                     "from numpy.random?)")
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])


# ---- dispatch ---------------------------------------------------------------------------------------------
_CHECKS: dict[str, Callable[..., None]] = {"network": check_network, "loss": check_loss,
                                           "augmentation": check_augmentation}


def check_part(kind: str, name: str, **kwargs: Any) -> None:
    """Run the contract of ``kind`` (``network``, ``loss`` or ``augmentation``) on the registered part ``name``;
    ``kwargs`` go to that check (``params=...``, ...).

    Raises:
        AssertionError: the part breaks the contract.
        ValueError: a kind without a contract (optimisers and schedules have none yet).
    """
    if kind not in _CHECKS:
        raise ValueError(f"kind {kind!r} has no contract check; checked kinds: {', '.join(_CHECKS)}.")
    _CHECKS[kind](name, **kwargs)
