"""Two autoseg recipe parts: a tiny two-level U-Net (``tiny_unet``) and soft Dice + L1 (``soft_dice_l1``).

Installed (``pip install examples/plugin_package``), they are chosen like the built-ins::

    autoseg plan DATASET --preset cpu --recipe network=tiny_unet loss=soft_dice_l1:l1_weight=0.25

The entry points in ``pyproject.toml`` point at :data:`TINY_UNET` and :data:`SOFT_DICE_L1`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.errors import PlanningError, TrainingConfigError
from autoseg.networks.parts import NetworkPart
from autoseg.networks.topology import UNetTopology
from autoseg.registry import PluginInfo
from autoseg.training.parts import loss_part

# --------------------------------------------------------------------------------------------------------- network

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_UP = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}
_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _unit(nd: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] | None = None) -> nn.Module:
    """Conv ('same' padding, optional stride) -> instance norm -> leaky ReLU."""
    conv = _CONV[nd](cin, cout, tuple(kernel), stride=tuple(stride or (1,) * nd), padding=tuple(k // 2 for k in kernel))
    return nn.Sequential(conv, _NORM[nd](cout, affine=True), nn.LeakyReLU(0.01, inplace=True))


class TinyUNet(nn.Module):
    """Two resolution levels, one conv each: ``features_per_stage[0]`` features at full resolution, twice that
    after the plan's first downsampling stride (``strides[1]``).

    With ``deep_supervision`` the forward returns what the trainer supervises: one logits tensor per decoder
    stage of the plan's topology (``n_stages - 1``, at least 1), highest resolution first. That is ``[full]`` for a
    two-stage plan and ``[full, coarse]`` for a three-stage one; deeper plans get ``coarse`` average-pooled by their
    further strides.
    """

    def __init__(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
                 deep_supervision: bool = True) -> None:
        super().__init__()
        topology.check()
        nd, f = topology.ndim, topology.features_per_stage[0]
        self.in_channels, self.num_classes, self.deep_supervision = in_channels, num_classes, deep_supervision
        self.ndim = nd
        self.stride = tuple(topology.strides[1]) if topology.n_stages > 1 else (1,) * nd
        self.n_outputs = max(1, topology.n_stages - 1)
        self.deeper_strides = [tuple(s) for s in topology.strides[2:-1]]  # pooling for outputs 3, 4, ...
        kernel = topology.kernel_sizes[0]
        self.enc0 = _unit(nd, in_channels, f, kernel)
        self.enc1 = _unit(nd, f, 2 * f, topology.kernel_sizes[min(1, topology.n_stages - 1)], self.stride)
        self.up = _UP[nd](2 * f, f, kernel_size=self.stride, stride=self.stride)
        self.dec0 = _unit(nd, 2 * f, f, kernel)
        self.head0 = _CONV[nd](f, num_classes, 1)
        self.head1 = _CONV[nd](2 * f, num_classes, 1) if self.n_outputs > 1 else None

    def check_input(self, x: torch.Tensor) -> None:
        """Raise PlanningError unless ``x`` is ``(batch, in_channels, *spatial)`` with sizes divisible by the stride."""
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise PlanningError(f"tiny_unet: input of shape {tuple(x.shape)} does not match (batch, "
                                f"{self.in_channels}, {self.ndim} spatial axes).")
        if any(int(n) % s for n, s in zip(x.shape[2:], self.stride)):
            raise PlanningError(f"tiny_unet: input spatial shape {tuple(x.shape[2:])} is not divisible by "
                                f"{self.stride}; pad it to a multiple.")

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check_input(x)
        skip = self.enc0(x)
        low = self.enc1(skip)
        full = self.head0(self.dec0(torch.cat([self.up(low), skip], dim=1)))
        if not self.deep_supervision:
            return full
        outputs = [full]
        if self.head1 is not None:
            coarse = self.head1(low)
            outputs.append(coarse)
            for stride in self.deeper_strides:
                coarse = _POOL[self.ndim](coarse, kernel_size=stride, stride=stride)
                outputs.append(coarse)
        return outputs


class TinyUNetPart(NetworkPart):
    """The part autoseg builds the network from; the cost methods keep the U-Net defaults (an overestimate)."""

    def build(self, topology: UNetTopology, *, in_channels: int, num_classes: int,
              deep_supervision: bool = True) -> nn.Module:
        return TinyUNet(topology, in_channels=in_channels, num_classes=num_classes,
                        deep_supervision=deep_supervision)


TINY_UNET = PluginInfo("tiny_unet", "network",
                       "A tiny two-level U-Net, one conv per level (for smoke tests and CPU demos).",
                       (), TinyUNetPart)

# ------------------------------------------------------------------------------------------------------------ loss


class SoftDiceL1Loss(nn.Module):
    """``1 - mean foreground soft Dice + l1_weight * mean |softmax - one-hot|`` for logits ``(B, C, *sp)`` and an
    integer label map ``(B, 1, *sp)``; voxels equal to ``ignore_label`` count in neither term."""

    def __init__(self, *, batch_dice: bool, ignore_label: int | None, l1_weight: float) -> None:
        super().__init__()
        self.batch_dice, self.ignore_label, self.l1_weight = batch_dice, ignore_label, l1_weight

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), dim=1)
        labels = target.long()
        valid = (labels != self.ignore_label) if self.ignore_label is not None else torch.ones_like(labels, dtype=bool)
        labels = torch.where(valid, labels, 0)
        onehot = F.one_hot(labels[:, 0], probs.shape[1]).movedim(-1, 1).to(probs.dtype)
        mask = valid.to(probs.dtype)
        p, g = probs * mask, onehot * mask
        axes = (0, *range(2, p.ndim)) if self.batch_dice else tuple(range(2, p.ndim))
        dice = (2 * (p * g).sum(axes) + 1e-5) / (p.sum(axes) + g.sum(axes) + 1e-5)
        dice = dice[..., 1:] if dice.shape[-1] > 1 else dice  # foreground classes only
        l1 = ((probs - onehot).abs() * mask).sum() / (mask.sum() * probs.shape[1]).clamp(min=1.0)
        return 1.0 - dice.mean() + self.l1_weight * l1


def soft_dice_l1(*, regions: bool, batch_dice: bool, ignore_label: int | None, l1_weight: float = 0.5) -> nn.Module:
    """Soft Dice (foreground classes) + L1 between the softmax and the one-hot labels (label training only).

    Args:
        l1_weight: weight of the L1 term, >= 0 (0 leaves soft Dice alone)

    Raises:
        TrainingConfigError: region training, or a negative ``l1_weight``.
    """
    if regions:
        raise TrainingConfigError("loss 'soft_dice_l1' supports label training (softmax) only, but this dataset "
                                  "trains regions; use 'dice_bce'.")
    if not (math.isfinite(l1_weight) and l1_weight >= 0):
        raise TrainingConfigError(f"loss 'soft_dice_l1': l1_weight={l1_weight!r} must be a number >= 0.")
    return SoftDiceL1Loss(batch_dice=batch_dice, ignore_label=ignore_label, l1_weight=l1_weight)


SOFT_DICE_L1 = loss_part("soft_dice_l1", soft_dice_l1)
