"""What the contract checks share: tiny sizes, messages, argument checks and the topologies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from autoseg.networks.topology import UNetTopology
from autoseg.registry import PluginInfo, lookup

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


def _as_list(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def _shapes(out: Any) -> Any:
    return [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else tuple(out.shape)
