"""The U-Net a plan prescribes: plain or residual encoder, transposed-conv decoder, deep supervision.

The network is built from a :class:`~autoseg.networks.topology.UNetTopology` alone, and its parameter count
and conv outputs are exactly what :func:`autoseg.networks.memory.count_parameters` and
:func:`~autoseg.networks.memory.feature_map_elements` assume:

* a *conv unit* is conv (bias) -> InstanceNorm (affine, eps 1e-5) -> LeakyReLU(0.01, in place), with
  ``kernel // 2`` padding per axis, so anisotropic kernels such as ``(1, 3, 3)`` keep the shape;
* plain encoder stage ``i``: ``n_blocks_per_stage[i]`` conv units, the first carrying ``strides[i]``;
* residual encoder: a stem conv unit at full resolution, then per stage ``n_blocks_per_stage[i]``
  residual blocks (conv unit, conv -> norm, add the skip, LeakyReLU). The first block of a stage carries
  the stride; its skip path average-pools (kernel = stride) when strided and projects with a 1x1 conv
  (no bias) -> norm when the channels change. The last norm before each add starts at zero, as in
  nnU-Net's ``ResidualEncoderUNet``, so every block starts as its skip path;
* decoder stage (deepest first): transposed conv (kernel = stride = the stride it undoes, bias, no norm),
  concatenation with the encoder skip, ``n_conv_per_stage_decoder[s]`` conv units and a 1x1 head.

>>> from autoseg.networks.topology import UNetTopology
>>> topo = UNetTopology(strides=((1, 1), (2, 2)), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4, 8),
...                     n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
>>> net = UNet(topo, in_channels=1, num_classes=2, deep_supervision=False)
>>> tuple(net(torch.zeros(1, 1, 16, 16)).shape)
(1, 2, 16, 16)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from autoseg.errors import PlanningError
from autoseg.networks.topology import UNetTopology

if TYPE_CHECKING:
    from autoseg.planner.plans import ConfigurationPlan

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def _conv(ndim: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | None = None,
          bias: bool = True) -> nn.Module:
    """Convolution with 'same' padding (``kernel // 2`` per axis)."""
    stride = tuple(stride) if stride is not None else (1,) * ndim
    return _CONV[ndim](cin, cout, kernel_size=tuple(kernel), stride=stride,
                       padding=tuple(k // 2 for k in kernel), bias=bias)


def _norm(ndim: int, channels: int) -> nn.Module:
    return _NORM[ndim](channels, eps=1e-5, affine=True)


class ConvUnit(nn.Sequential):
    """Conv (bias) -> InstanceNorm -> LeakyReLU; the conv may carry a stride."""

    def __init__(self, ndim: int, cin: int, cout: int, kernel: Sequence[int],
                 stride: Sequence[int] | None = None) -> None:
        super().__init__(_conv(ndim, cin, cout, kernel, stride), _norm(ndim, cout),
                         nn.LeakyReLU(negative_slope=0.01, inplace=True))


class ResidualBlock(nn.Module):
    """Two convs with a skip: ``act(norm(conv(unit(x))) + skip(x))``.

    The skip path average-pools (kernel = stride) when ``stride`` is not all ones and projects with a
    1x1 conv (no bias) -> norm when ``cin != cout``; otherwise it is the identity.
    """

    def __init__(self, ndim: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        stride = tuple(stride)
        self.unit = ConvUnit(ndim, cin, cout, kernel, stride)
        self.conv = _conv(ndim, cout, cout, kernel)
        self.norm = _norm(ndim, cout)
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            skip.append(_POOL[ndim](kernel_size=stride, stride=stride))
        if cin != cout:
            skip += [_conv(ndim, cin, cout, (1,) * ndim, bias=False), _norm(ndim, cout)]
        self.skip = nn.Sequential(*skip)  # empty Sequential is the identity
        self.act = nn.LeakyReLU(negative_slope=0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        return self.act(self.norm(self.conv(self.unit(x))) + self.skip(x))


class UNet(nn.Module):
    """U-Net built from a topology (plain or residual encoder), optionally deeply supervised.

    Args:
        topology: the network's stages; checked first.
        in_channels: input image channels.
        num_classes: output channels (logits) of every segmentation head.
        deep_supervision: ``forward`` returns one output per decoder stage (highest resolution first)
            when True, only the full-resolution logits when False. A plain attribute: flip it for
            inference, and the heads of the lower stages are not computed.

    Raises:
        PlanningError: the topology is inconsistent, or ``in_channels`` / ``num_classes`` is below 1.

    Example:
        >>> net = build_network(plans.configuration("3d_fullres"), in_channels=1, num_classes=3)  # doctest: +SKIP
    """

    def __init__(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        topology.check()
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes)):
            if not isinstance(value, int) or value < 1:
                raise PlanningError(f"UNet: {name}={value!r} must be a positive integer.")
        self.topology = topology
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        nd, feats = topology.ndim, topology.features_per_stage

        self.stem: nn.Module = nn.Identity()
        prev = in_channels
        if topology.block == "residual":
            self.stem = ConvUnit(nd, in_channels, feats[0], topology.kernel_sizes[0])
            prev = feats[0]
        encoder = []
        for stride, kernel, f, nb in zip(topology.strides, topology.kernel_sizes, feats,
                                         topology.n_blocks_per_stage, strict=True):
            blocks: list[nn.Module] = []
            for b in range(nb):
                s = stride if b == 0 else (1,) * nd
                if topology.block == "plain":
                    blocks.append(ConvUnit(nd, prev, f, kernel, s))
                else:
                    blocks.append(ResidualBlock(nd, prev, f, kernel, s))
                prev = f
            encoder.append(nn.Sequential(*blocks))
        self.encoder = nn.ModuleList(encoder)

        # decoder lists are indexed by the encoder stage whose resolution they restore (0 .. n_stages - 2)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(topology.n_stages - 1):
            up = topology.strides[s + 1]
            self.upsample.append(_TRANSPOSED[nd](feats[s + 1], feats[s], kernel_size=tuple(up), stride=tuple(up),
                                                 bias=True))
            n_conv = topology.n_conv_per_stage_decoder[s]
            kernel = topology.kernel_sizes[s]
            self.decoder.append(nn.Sequential(*[ConvUnit(nd, 2 * feats[s] if c == 0 else feats[s], feats[s], kernel)
                                                for c in range(n_conv)]))
            self.heads.append(_conv(nd, feats[s], num_classes, (1,) * nd))
        if topology.n_stages == 1:  # no decoder: a single head on the only stage
            self.heads.append(_conv(nd, feats[0], num_classes, (1,) * nd))
        self.apply(_init_he)
        for module in self.modules():
            if isinstance(module, ResidualBlock):
                nn.init.zeros_(module.norm.weight)

    def check_input(self, x: torch.Tensor) -> None:
        """Check the input's rank, channels and divisibility by the strides.

        Args:
            x: batch of shape ``(batch, in_channels, *spatial)``.

        Raises:
            PlanningError: wrong rank or channels, or a spatial size not divisible by ``divisible_by``.
        """
        nd = self.topology.ndim
        if x.dim() != nd + 2 or x.shape[1] != self.in_channels:
            raise PlanningError(f"UNet: input of shape {tuple(x.shape)} does not match (batch, {self.in_channels}, "
                                f"{nd} spatial axes); give (batch, channels, *patch) with {self.in_channels} "
                                "channel(s).")
        spatial = tuple(int(v) for v in x.shape[2:])
        div = self.topology.divisible_by
        if any(size % d for size, d in zip(spatial, div, strict=True)):
            fixed = tuple(-(-size // d) * d for size, d in zip(spatial, div, strict=True))
            raise PlanningError(f"UNet: input spatial shape {spatial} is not divisible by {div} (the product of "
                                f"the strides per axis); pad the input to a multiple, e.g. {fixed}, or use a "
                                "patch size that is a multiple of it.")

    def transform_skip(self, stage: int, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        """Hook for subclasses: the skip of encoder ``stage`` as the decoder concatenates it (identity here).

        Args:
            stage: index of the encoder stage whose output ``skip`` is (0 is full resolution).
            skip: that stage's output, ``(batch, features_per_stage[stage], *spatial)``.
            upsampled: the transposed-conv output it is concatenated with (same shape).

        Returns:
            The tensor to concatenate; :class:`~autoseg.networks.attention_unet.AttentionUNet` gates it.
        """
        return skip

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: ``(batch, in_channels, *spatial)``; every spatial size a multiple of ``topology.divisible_by``.

        Returns:
            Full-resolution logits ``(batch, num_classes, *spatial)`` when ``deep_supervision`` is False;
            otherwise a list with one logits tensor per decoder stage, highest resolution first (a single
            element for a one-stage network).

        Raises:
            PlanningError: the input shape does not fit the network (see :meth:`check_input`).
        """
        self.check_input(x)
        x = self.stem(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n_dec = len(self.upsample)
        if n_dec == 0:
            out = self.heads[0](x)
            return [out] if self.deep_supervision else out
        outputs: list[torch.Tensor] = []
        for s in range(n_dec - 1, -1, -1):  # deepest first
            x = self.upsample[s](x)
            x = self.decoder[s](torch.cat((x, self.transform_skip(s, skips[s], x)), dim=1))
            if self.deep_supervision or s == 0:
                outputs.append(self.heads[s](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]


def _init_he(module: nn.Module) -> None:
    """Kaiming-normal weights (``a=1e-2``) and zero biases for every (transposed) convolution."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(config: ConfigurationPlan, *, in_channels: int, num_classes: int, deep_supervision: bool = True) -> UNet:
    """Build the U-Net of one configuration of the plans.

    Args:
        config: a :class:`~autoseg.planner.plans.ConfigurationPlan` (anything with a ``topology``).
        in_channels: input image channels (for a cascade stage, image channels plus one-hot classes).
        num_classes: output channels.
        deep_supervision: see :class:`UNet`.

    Returns:
        The network, freshly initialised.

    Raises:
        PlanningError: the configuration has no usable topology.
    """
    topology = getattr(config, "topology", None)
    if not isinstance(topology, UNetTopology):
        raise PlanningError(f"build_network: {type(config).__name__} has no UNetTopology in .topology; pass a "
                            "ConfigurationPlan from plans.json (re-run `autoseg plan` if it is missing).")
    return UNet(topology, in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision)


@dataclass(frozen=True)
class MeasuredMemory:
    """Memory of one measured training step (see :func:`measure_training_step`).

    Attributes:
        device: ``"cpu"`` or the CUDA device used.
        saved_bytes: bytes autograd keeps for the backward pass at the end of the forward pass and loss
            (unique storages; parameters excluded).
        peak_bytes: peak memory of the step: weights and batch plus the peak rise of the memory allocated
            during forward, loss, backward and the optimiser step (gradients, momentum, activations,
            temporaries); on CUDA the rise of ``torch.cuda.max_memory_allocated``.
        parameter_bytes: bytes of the weights alone.
    """

    device: str
    saved_bytes: int
    peak_bytes: int
    parameter_bytes: int


def _deep_supervision_loss(outputs: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the outputs; the target is subsampled to each output's size."""
    outs = outputs if isinstance(outputs, list) else [outputs]
    loss = outs[0].new_zeros((), dtype=torch.float32)
    for out in outs:
        steps = [t // o for t, o in zip(target.shape[1:], out.shape[2:], strict=True)]
        sub = target[(slice(None), *(slice(None, None, k) for k in steps))]
        loss = loss + nn.functional.cross_entropy(out.float(), sub)
    return loss


def _cpu_window_peak(prof: torch.profiler.profile) -> int:
    """Peak rise of allocated bytes inside a profiling window, from the profiler's allocation events.

    The profiler's running total also holds allocations of earlier windows that were freed outside any
    window, so the total just before the window's first allocation is the baseline.
    """
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        fields = node.typed[1]
        if hasattr(fields, "total_allocated"):
            events.append((node.start_time_ns, int(fields.total_allocated), int(fields.alloc_size)))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    baseline = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - baseline


def measure_training_step(network: UNet, patch_size: Sequence[int], *, batch_size: int, device: str = "cpu",
                          amp: bool = False, seed: int = 0) -> MeasuredMemory:
    """Run one SGD training step on random data and measure its memory.

    On CPU the peak comes from the profiler's allocation events (``profile_memory=True``, a private but
    stable part of ``torch.profiler``); on CUDA from ``torch.cuda.max_memory_allocated``. The network is
    moved to ``device`` and left there, with one step of updates applied.

    Args:
        network: the network (its ``deep_supervision`` setting is used as is).
        patch_size: spatial input size.
        batch_size: samples in the batch.
        device: ``"cpu"`` or a CUDA device such as ``"cuda"``.
        amp: autocast the forward pass (fp16 on CUDA, bf16 on CPU).
        seed: seed of the random batch.

    Returns:
        The measurement.

    Raises:
        PlanningError: the patch does not fit the network.
    """
    dev = torch.device(device)
    network.to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, network.in_channels, *patch_size, generator=gen).to(dev)
    target = torch.randint(0, network.num_classes, (batch_size, *patch_size), generator=gen).to(dev)
    network.check_input(x)
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    param_ptrs = {p.untyped_storage().data_ptr() for p in network.parameters()}
    param_bytes = sum(p.numel() * p.element_size() for p in network.parameters())
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(dev.type, dtype=torch.float16 if dev.type == "cuda" else torch.bfloat16,
                                enabled=amp):
                loss = _deep_supervision_loss(network(x), target)
        loss.backward()
        optimizer.step()

    optimizer.zero_grad(set_to_none=True)
    resident = param_bytes + x.numel() * x.element_size() + target.numel() * target.element_size()
    if dev.type == "cuda":  # count only this step's memory, not tensors other code left on the device
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        step()
        torch.cuda.synchronize(dev)
        rise = int(torch.cuda.max_memory_allocated(dev)) - before
    else:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        rise = _cpu_window_peak(prof)
    peak = resident + rise
    optimizer.zero_grad(set_to_none=True)
    return MeasuredMemory(device=str(dev), saved_bytes=sum(saved.values()), peak_bytes=peak,
                          parameter_bytes=param_bytes)
