"""Attention U-Net: the plan's U-Net with additive attention gates on every skip connection.

Oktay et al. 2018, "Attention U-Net: Learning Where to Look for the Pancreas". The encoder, decoder and
heads are exactly :class:`~autoseg.networks.unet.UNet`'s (plain or residual encoder, as the topology says);
before decoder stage ``s`` concatenates the skip ``x`` of encoder stage ``s`` with the upsampled decoder
features ``g`` (the transposed-conv output, same size), the skip is multiplied by a gate::

    gate = sigmoid(psi(relu(W_x(x) + W_g(g))))        # (batch, 1, *spatial of the skip)

``W_x`` and ``W_g`` are 1x1 convs -> InstanceNorm (affine) from ``features_per_stage[s]`` to
``max(features_per_stage[s] // 2, 1)`` channels, ``psi`` a 1x1 conv -> InstanceNorm (affine) to one
channel: the norm of the rest of the network, He-initialised like it. The gate's convs have no bias: the
instance norm right after each removes any per-channel constant, so a bias would never get a gradient.

Set ``net.keep_attention = True`` to keep the gates of the last forward pass in ``net.attention_maps``
(detached; index ``s`` is the gate on encoder stage ``s``'s skip, so highest resolution first like the
deep-supervision outputs); every forward pass clears the list first.

>>> from autoseg.networks.topology import UNetTopology
>>> topo = UNetTopology(strides=((1, 1), (2, 2)), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4, 8),
...                     n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
>>> net = build(topo, in_channels=1, num_classes=2, deep_supervision=False)
>>> net.keep_attention = True
>>> tuple(net(torch.zeros(1, 1, 16, 16)).shape), [tuple(a.shape) for a in net.attention_maps]
((1, 2, 16, 16), [(1, 1, 16, 16)])
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch
from torch import nn

from autoseg.networks import memory
from autoseg.networks.memory import BYTES_PER_ELEMENT_MIXED, BYTES_PER_PARAMETER_MIXED
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet, _conv, _init_he, _norm


def gate_channels(skip_channels: int) -> int:
    """Intermediate channels of the gate on a skip with ``skip_channels`` channels (half, at least 1)."""
    return max(skip_channels // 2, 1)


class AttentionGate(nn.Module):
    """Additive attention gate: ``x * sigmoid(psi(relu(W_x x + W_g g)))``.

    Args:
        ndim: spatial dimensions (2 or 3).
        skip_channels: channels of the skip ``x``.
        gating_channels: channels of the gating signal ``g`` (same spatial size as ``x``).
    """

    def __init__(self, ndim: int, skip_channels: int, gating_channels: int) -> None:
        super().__init__()
        inter = gate_channels(skip_channels)
        one = (1,) * ndim
        self.w_x = nn.Sequential(_conv(ndim, skip_channels, inter, one, bias=False), _norm(ndim, inter))
        self.w_g = nn.Sequential(_conv(ndim, gating_channels, inter, one, bias=False), _norm(ndim, inter))
        self.psi = nn.Sequential(_conv(ndim, inter, 1, one, bias=False), _norm(ndim, 1))

    def gate(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gate, ``(batch, 1, *spatial)`` with values in (0, 1)."""
        return torch.sigmoid(self.psi(torch.relu(self.w_x(x) + self.w_g(g))))

    def forward(self, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The gated skip."""
        return x * self.gate(x, g)


class AttentionUNet(UNet):
    """:class:`~autoseg.networks.unet.UNet` with an :class:`AttentionGate` on every skip connection.

    Same arguments, attributes and forward contract as ``UNet``; in addition ``gates`` (one per decoder
    stage, indexed like ``decoder``), ``keep_attention`` (default False) and ``attention_maps``.

    Raises:
        PlanningError: the topology is inconsistent, or ``in_channels`` / ``num_classes`` is below 1.
    """

    def __init__(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
                 deep_supervision: bool = True) -> None:
        super().__init__(topology, in_channels=in_channels, num_classes=num_classes,
                         deep_supervision=deep_supervision)
        feats = topology.features_per_stage
        self.gates = nn.ModuleList(AttentionGate(topology.ndim, feats[s], feats[s])
                                   for s in range(topology.n_stages - 1))
        self.gates.apply(_init_he)
        self.keep_attention = False
        self.attention_maps: list[torch.Tensor] = []

    def transform_skip(self, stage: int, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """Gate the skip of encoder ``stage`` with the upsampled decoder features (see the module doc)."""
        gate = self.gates[stage].gate(skip, upsampled)
        if self.keep_attention:
            self.attention_maps.insert(0, gate.detach())  # decoder runs deepest first: keep stage order
        return skip * gate

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch (see :meth:`UNet.forward`); refills ``attention_maps`` when ``keep_attention``."""
        self.attention_maps = []
        return super().forward(x)


# ---- the network-part interface -------------------------------------------------------------------------
def build(topology: UNetTopology, *, in_channels: int, num_classes: int,
          deep_supervision: bool = True) -> AttentionUNet:
    """Build the attention U-Net of ``topology``, freshly initialised.

    Raises:
        PlanningError: the topology is inconsistent, or ``in_channels`` / ``num_classes`` is below 1.
    """
    return AttentionUNet(topology, in_channels=in_channels, num_classes=num_classes,
                         deep_supervision=deep_supervision)


def _gate_parameters(channels: int) -> int:
    inter = gate_channels(channels)
    w = channels * inter + 2 * inter  # 1x1 conv weight (no bias), norm affine (W_x and W_g alike)
    return 2 * w + (inter + 2)  # + psi: conv inter -> 1 (no bias), norm of one channel


def count_parameters(topology: UNetTopology, *, in_channels: int, num_classes: int) -> int:
    """Exact trainable parameters: the U-Net's (:func:`autoseg.networks.memory.count_parameters`) plus the gates'."""
    gates = sum(_gate_parameters(f) for f in topology.features_per_stage[:-1])
    return memory.count_parameters(topology, in_channels=in_channels, num_classes=num_classes) + gates


def feature_map_elements(topology: UNetTopology, patch_size: Sequence[int], *, num_classes: int) -> int:
    """The U-Net's conv-output elements (:func:`autoseg.networks.memory.feature_map_elements`) plus the gates'.

    Counted like the U-Net's, conv outputs only: per gate the outputs of ``W_x`` and ``W_g``
    (``max(C // 2, 1)`` channels each) and of ``psi`` (one channel) at the skip's size. Not counted, as
    for the U-Net's norms, nonlinearities and concatenations: the sum, ReLU, sigmoid and gated skip.

    Raises:
        PlanningError: the patch has the wrong number of axes.
    """
    sizes = memory._stage_sizes(topology, patch_size)
    gates = sum((2 * gate_channels(f) + 1) * prod(sizes[s])
                for s, f in enumerate(topology.features_per_stage[:-1]))
    return memory.feature_map_elements(topology, patch_size, num_classes=num_classes) + int(gates)


def estimate_training_bytes(topology: UNetTopology, patch_size: Sequence[int], *, batch_size: int,
                            in_channels: int, num_classes: int, bytes_per_element: float = BYTES_PER_ELEMENT_MIXED,
                            bytes_per_parameter: float = BYTES_PER_PARAMETER_MIXED) -> int:
    """Peak memory of one training step, with the U-Net's formula and calibration.

    ``feature_map_elements x batch_size x bytes_per_element + count_parameters x bytes_per_parameter``
    (see :func:`autoseg.networks.memory.estimate_training_bytes` for the factors). Measured on CPU in fp32
    (``BYTES_PER_ELEMENT_FP32`` / ``BYTES_PER_PARAMETER_FP32``, torch 2.13, 2 threads) with
    :func:`~autoseg.networks.unet.measure_training_step`, peak / estimate: 0.97 for a plain 2D network
    (8-64 features, 128x128, batch 4), 0.95 for a residual 3D one (8-64, 32^3, batch 2) and 1.00 for an
    anisotropic 3D one (8-32, 16x48x48, batch 2); the gates add 8.3-8.4 saved bytes per counted element,
    like the U-Net's convs. Tiny networks (4-16 features) measure 1.2-1.3 (fixed overheads), and at batch
    1 a 3D conv kernel's workspace can triple the peak (the U-Net's own estimate shares both limits).

    Raises:
        PlanningError: batch size below 1 or a patch with the wrong number of axes.
    """
    return memory.training_bytes(feature_map_elements(topology, patch_size, num_classes=num_classes),
                                 count_parameters(topology, in_channels=in_channels, num_classes=num_classes),
                                 batch_size=batch_size, bytes_per_element=bytes_per_element,
                                 bytes_per_parameter=bytes_per_parameter)
