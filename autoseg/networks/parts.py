"""Networks as recipe parts: each one builds itself from the plan's topology and knows what it costs.

A :class:`NetworkPart` gives the planner its feature-map estimate (the yardstick of the patch and batch rules,
comparable to nnU-Net's budgets), its exact parameter count and its training-memory estimate, and the patch it
can take (:meth:`NetworkPart.fit_patch`); the trainer and the predictor get the module from :meth:`NetworkPart.build`.

Built-ins: ``unet`` (plain encoder), ``resenc_unet`` (residual encoder), ``attention_unet`` (additive attention
gates on the skips) and ``swin_unetr`` (MONAI's SwinUNETR; ``pip install "autoseg[monai]"``). Other packages add
networks as :class:`~autoseg.registry.PluginInfo` entries of kind ``network`` whose ``build(**params)`` returns a
:class:`NetworkPart` (see the README's "writing a part").

    >>> part = get_network_part("unet")
    >>> from autoseg.networks.topology import UNetTopology
    >>> topo = UNetTopology(strides=((1, 1), (2, 2)), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4, 8),
    ...                     n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    >>> part.count_parameters(topo, in_channels=1, num_classes=2) == sum(
    ...     p.numel() for p in part.build(topo, in_channels=1, num_classes=2).parameters())
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from autoseg.errors import PluginError
from autoseg.networks import attention_unet, memory, swin_unetr
from autoseg.networks.error_head import attach_error_head
from autoseg.networks.memory import BYTES_PER_ELEMENT_MIXED, BYTES_PER_PARAMETER_MIXED
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet
from autoseg.registry import Param, PluginInfo, lookup, part_table

KIND = "network"


class NetworkPart:
    """A network and its cost model. Subclasses implement :meth:`build`; the cost methods default to the
    U-Net's analytic model of the same topology, which fits networks shaped like it (override them otherwise).

    Attributes:
        block: the encoder block type the planner must use (``plain``/``residual``), or None for the plan's.
        exports_onnx: the network can be exported to ONNX (checked by the contract suite).
        deep_supervision_heads: with deep supervision the network returns one output per decoder stage of the
            topology; False: a one-element list (full resolution), and the trainer supervises only that.
    """

    block: str | None = None
    exports_onnx: bool = True
    deep_supervision_heads: bool = True

    def build(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
              deep_supervision: bool = True) -> nn.Module:
        """The freshly initialised network. Its forward returns a list of logits (highest resolution first) when
        ``deep_supervision`` is on, else the full-resolution logits; it has ``in_channels``, ``num_classes``,
        a settable ``deep_supervision`` attribute and ``check_input(x)``.

        With deep supervision the trainer expects ``max(1, topology.n_stages - 1)`` outputs, output ``i`` at the
        resolution of ``1 / prod(strides[:i + 1])`` (as the U-Net's decoder stages give them), or a one-element
        list when :attr:`deep_supervision_heads` is False."""

    def supervised_scales(self, topology: UNetTopology) -> list[tuple[float, ...]]:
        """Relative resolution of each output the trainer supervises (highest first): ``1 / cumprod(strides)``
        per decoder stage, or full resolution alone without deep-supervision heads."""
        if not self.deep_supervision_heads:
            return [(1.0,) * topology.ndim]
        scales, cum = [], [1] * topology.ndim
        strides = topology.strides[:-1] if topology.n_stages > 1 else topology.strides
        for stride in strides:
            cum = [c * s for c, s in zip(cum, stride, strict=True)]
            scales.append(tuple(1.0 / c for c in cum))
        return scales
        raise NotImplementedError

    def topology(self, planned: UNetTopology) -> UNetTopology:
        """The topology this network uses for a planned one (the planned one with :attr:`block` applied)."""
        return planned if self.block is None else dataclasses.replace(planned, block=self.block)

    def count_parameters(self, topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
        """Trainable parameters (by default counted on a built network)."""
        net = self.build(topology, in_channels=in_channels, num_classes=num_classes)
        return sum(p.numel() for p in net.parameters() if p.requires_grad)

    def feature_map_elements(self, topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
        """The planner's yardstick: activation elements of one sample, comparable to the U-Net's count."""
        return memory.feature_map_elements(topology, patch_size, num_classes=num_classes)

    def estimate_training_bytes(self, topology: UNetTopology, patch_size: Sequence[int], *, batch_size: int,
                                in_channels: int, num_classes: int, bytes_per_element: float = BYTES_PER_ELEMENT_MIXED,
                                bytes_per_parameter: float = BYTES_PER_PARAMETER_MIXED) -> int:
        """Peak memory of one training step (see :func:`autoseg.networks.memory.estimate_training_bytes`)."""
        return memory.training_bytes(self.feature_map_elements(topology, patch_size, num_classes=num_classes),
                                     self.count_parameters(topology, in_channels=in_channels, num_classes=num_classes),
                                     batch_size=batch_size, bytes_per_element=bytes_per_element,
                                     bytes_per_parameter=bytes_per_parameter)

    def fit_patch(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        """The patch this network can take nearest to the planned one (default: the planned one)."""
        return tuple(int(v) for v in patch_size)


class UNetPart(NetworkPart):
    """nnU-Net's U-Net (plain or residual encoder as :attr:`block` says), exactly as the plans describe it;
    with ``error_head``, plus a learned error head (:mod:`autoseg.networks.error_head`)."""

    def __init__(self, block: str | None = None, error_head: bool = False) -> None:
        self.block = block
        self.error_head = error_head

    def build(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
              deep_supervision: bool = True) -> nn.Module:
        net = UNet(self.topology(topology), in_channels=in_channels, num_classes=num_classes,
                   deep_supervision=deep_supervision)
        return attach_error_head(net) if self.error_head else net

    def count_parameters(self, topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
        if self.error_head:
            return super().count_parameters(topology, in_channels=in_channels, num_classes=num_classes)
        return memory.count_parameters(self.topology(topology), in_channels=in_channels, num_classes=num_classes)

    def feature_map_elements(self, topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
        return memory.feature_map_elements(self.topology(topology), patch_size, num_classes=num_classes)


class AttentionUNetPart(NetworkPart):
    """The plan's U-Net with additive attention gates (Oktay et al. 2018) on every skip connection (and, with
    ``error_head``, a learned error head)."""

    def __init__(self, error_head: bool = False) -> None:
        self.error_head = error_head

    def build(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
              deep_supervision: bool = True) -> nn.Module:
        net = attention_unet.build(topology, in_channels=in_channels, num_classes=num_classes,
                                   deep_supervision=deep_supervision)
        return attach_error_head(net) if self.error_head else net

    def count_parameters(self, topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
        if self.error_head:
            return super().count_parameters(topology, in_channels=in_channels, num_classes=num_classes)
        return attention_unet.count_parameters(topology, in_channels=in_channels, num_classes=num_classes)

    def feature_map_elements(self, topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
        return attention_unet.feature_map_elements(topology, patch_size, num_classes=num_classes)


class SwinUNETRPart(NetworkPart):
    """MONAI's SwinUNETR (a Swin-transformer encoder with a CNN decoder); patches are multiples of 32.

    No deep-supervision heads (it is trained on its full-resolution output), and no ONNX export (torch's
    TorchScript exporter cannot export MONAI's instance norm of unknown channel size): predict with the torch backend.
    """

    exports_onnx = False
    deep_supervision_heads = False

    def __init__(self, feature_size: int | None = None, window_size: int = swin_unetr.DEFAULT_WINDOW_SIZE) -> None:
        self.kw: dict[str, Any] = {"feature_size": feature_size, "window_size": window_size}

    def build(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
              deep_supervision: bool = True) -> nn.Module:
        return swin_unetr.build(topology, in_channels=in_channels, num_classes=num_classes,
                                deep_supervision=deep_supervision, **self.kw)

    def count_parameters(self, topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
        return swin_unetr.count_parameters(topology, in_channels=in_channels, num_classes=num_classes, **self.kw)

    def feature_map_elements(self, topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
        return swin_unetr.feature_map_elements(topology, patch_size, num_classes=num_classes, **self.kw)

    def fit_patch(self, patch_size: Sequence[int]) -> tuple[int, ...]:
        return swin_unetr.patch_constraint(tuple(int(v) for v in patch_size))


#: the recipe parameter of the networks that can have a learned error head
ERROR_HEAD = Param("error_head", "bool", False, "also learn a head predicting where the segmentation is wrong "
                   "(trained on detached features; written by predict --uncertainty)")


def builtin_networks() -> tuple[PluginInfo, ...]:
    """The networks that come with autoseg."""
    return (
        PluginInfo("unet", KIND, "nnU-Net's plain-encoder U-Net, as the plans describe it (the default).",
                   (ERROR_HEAD,), lambda error_head=False: UNetPart("plain", error_head)),
        PluginInfo("resenc_unet", KIND, "nnU-Net's residual-encoder U-Net (ResEnc; the resenc presets' default).",
                   (ERROR_HEAD,), lambda error_head=False: UNetPart("residual", error_head)),
        PluginInfo("attention_unet", KIND, "The plan's U-Net with additive attention gates on the skip connections "
                   "(Oktay et al. 2018); gate maps readable for explanations.", (ERROR_HEAD,), AttentionUNetPart),
        PluginInfo("swin_unetr", KIND, "MONAI's SwinUNETR transformer hybrid (needs the monai extra; patches are "
                   "multiples of 32, the planner adapts them).",
                   (Param("feature_size", "int", None, "embedding size, a multiple of 12 (default: from the plan's "
                          "first-stage features)", low=12, optional=True),
                    Param("window_size", "int", swin_unetr.DEFAULT_WINDOW_SIZE, "attention window", low=1)),
                   SwinUNETRPart),
    )


def network_parts() -> dict[str, PluginInfo]:
    """Every network that can be used: the built-ins, then those of installed packages.

    Raises:
        PluginError: a broken entry point, or a name used twice.
    """
    return part_table(builtin_networks(), (KIND,))


def check_error_head(name: str, params: Mapping[str, Any] | None, table: Mapping[str, PluginInfo]) -> None:
    """Refuse ``error_head`` for a network that has no such parameter, in one line.

    Raises:
        PluginError: the network does not expose the features an error head reads.
    """
    info = table.get(name)
    if "error_head" in (params or {}) and info is not None and ERROR_HEAD not in info.params:
        capable = ", ".join(n for n, i in table.items() if ERROR_HEAD in i.params)
        raise PluginError(f"network {name!r} cannot have an error head (it does not expose its last decoder "
                          f"features to autoseg); error_head=true works with {capable}.")


def get_network_part(name: str, params: Mapping[str, Any] | None = None, *, origin: str = "built-in",
                     table: Mapping[str, PluginInfo] | None = None) -> NetworkPart:
    """The network part called ``name``, built with checked ``params``.

    Raises:
        PluginError: no such network (with the package to install when it came from one, else a suggestion),
            a bad parameter, or a package's entry that does not build a :class:`NetworkPart`.
    """
    table = network_parts() if table is None else table
    check_error_head(name, params, table)
    if name not in table and origin != "built-in":
        raise PluginError(f"network {name!r} is not installed: it came from {origin}; install the package that "
                          f"provides it (pip install <that package>) and run the command again.")
    info = lookup(name, table, "network")
    part = info.create(params)
    if not isinstance(part, NetworkPart):
        raise PluginError(f"network {name!r} ({info.origin}) built a {type(part).__name__}, not an "
                          "autoseg.networks.parts.NetworkPart; fix or uninstall the package that provides it.")
    return part
