"""The contract every network part keeps."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import SkipTest

import numpy as np
import torch
from torch import nn

from autoseg.errors import MissingDependencyError, OnnxUnavailableError
from autoseg.networks.parts import NetworkPart, get_network_part
from autoseg.networks.topology import UNetTopology
from autoseg.registry import PluginInfo
from autoseg.training.contracts.common import (
    BATCH,
    IN_CHANNELS,
    NETWORK_CHECKS,
    NUM_CLASSES,
    SEED,
    _as_list,
    _brief,
    _created,
    _ndims,
    _require,
    _select,
    _shapes,
    contract_topologies,
)


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
        """The deep-supervision outputs the trainer supervises (:meth:`NetworkPart.supervised_scales`): one per
        decoder stage, stage ``i`` at ``patch / cumprod(strides[: i + 1])``, highest resolution first; the full
        resolution alone for a part without deep-supervision heads."""
        return [(batch, NUM_CLASSES, *(round(p * s) for p, s in zip(self.patch, scale, strict=True)))
                for scale in self.part.supervised_scales(self.topology)]


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
