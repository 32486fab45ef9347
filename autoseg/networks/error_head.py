"""A learned error head: a small extra output that predicts, per voxel, whether the segmentation is wrong there.

Chosen in the recipe (``network=unet:error_head=true``; ``unet``, ``resenc_unet`` and ``attention_unet``). The
head (3x3 conv, instance norm, leaky ReLU, 1x1 conv to one channel) reads the features the full-resolution
segmentation head reads (the input of ``network.heads[0]``), **detached**: its loss sends no gradient into the
segmentation network, so the segmentation trains exactly as without it (the trainer clips the two gradient
groups separately for the same reason).

The network's ``forward`` is unchanged, except that the full-resolution output carries one more channel, the
error logit, last, while the network is in training mode or inside :func:`emitting_error`. Everything that runs
the network in evaluation mode (validation, prediction, ONNX export, explanations) sees the segmentation alone;
:class:`ErrorOutput` is the module that returns both, for ``predict --uncertainty``.

The head's weights are part of the network's ``state_dict`` (``error_head.*``), beside unchanged keys of the
segmentation network, so a checkpoint of either kind can fine-tune the other (``--init-from``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from autoseg.errors import PlanningError

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


class ErrorHead(nn.Module):
    """3x3 conv + instance norm + leaky ReLU + 1x1 conv -> one error logit per voxel, on detached features.

    Attributes:
        emit: add the error logit to the output in evaluation mode too (see :func:`emitting_error`).
    """

    def __init__(self, ndim: int, features: int) -> None:
        super().__init__()
        self.emit = False
        self._features: torch.Tensor | None = None
        self.body = nn.Sequential(_CONV[ndim](features, features, 3, padding=1),
                                  _NORM[ndim](features, eps=1e-5, affine=True), nn.LeakyReLU(0.01, inplace=True),
                                  _CONV[ndim](features, 1, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.body(features.detach())

    def _keep(self, module: nn.Module, args: tuple[Any, ...]) -> None:  # pre-hook of the segmentation head
        self._features = args[0] if (self.training or self.emit) else None

    def _append(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:  # hook of the network
        features, self._features = self._features, None
        if features is None:
            return None
        err = self(features)
        if isinstance(output, (list, tuple)):
            return [torch.cat((output[0], err.to(output[0].dtype)), dim=1), *output[1:]]
        return torch.cat((output, err.to(output.dtype)), dim=1)


def attach_error_head(network: nn.Module, name: str = "network") -> nn.Module:
    """Give ``network`` an error head on the features of its full-resolution head ``heads[0]``; returns it.

    Raises:
        PlanningError: the network does not expose those features (no ``heads[0]`` convolution).
    """
    heads = getattr(network, "heads", None)
    conv = heads[0] if isinstance(heads, nn.ModuleList) and len(heads) else None
    if not isinstance(conv, (nn.Conv2d, nn.Conv3d)):
        raise PlanningError(f"{name}: error_head=true needs a network whose full-resolution head is heads[0] "
                            "(unet, resenc_unet, attention_unet); remove error_head from the recipe.")
    head = ErrorHead(conv.weight.dim() - 2, conv.in_channels)
    network.add_module("error_head", head)
    conv.register_forward_pre_hook(head._keep)
    network.register_forward_hook(head._append)
    return network


def error_head_of(network: Any) -> ErrorHead | None:
    """The network's error head (looking through a DDP wrapper), or None."""
    head = getattr(getattr(network, "module", network), "error_head", None)
    return head if isinstance(head, ErrorHead) else None


@contextlib.contextmanager
def emitting_error(network: nn.Module) -> Iterator[None]:
    """Inside, the network's full-resolution output carries the error logit in evaluation mode too."""
    head = error_head_of(network)
    if head is None:
        yield
        return
    old, head.emit = head.emit, True
    try:
        yield
    finally:
        head.emit = old


class ErrorOutput(nn.Module):
    """The full-resolution segmentation logits with the error logit as one more, last channel (evaluation)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if error_head_of(network) is None:
            raise PlanningError("ErrorOutput: the network has no error head; train with network=...:error_head=true.")
        self.network = network
        self.in_channels = network.in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with emitting_error(self.network):
            out = self.network(x)
        return out[0] if isinstance(out, (list, tuple)) else out


def gradient_groups(network: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters in groups whose gradient norms are clipped separately: the segmentation network's, then the
    error head's (one group without an error head), so the error head never rescales the segmentation's steps."""
    head = error_head_of(network)
    if head is None:
        return [list(network.parameters())]
    own = {id(p) for p in head.parameters()}
    return [[p for p in network.parameters() if id(p) not in own], list(head.parameters())]
