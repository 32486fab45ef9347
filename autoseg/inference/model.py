"""A trained fold's network, rebuilt from what its checkpoint records: the recipe's network part, the plan's
topology and the weights. Prediction, ONNX export and fine-tuning all rebuild it here."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from autoseg.networks.checkpoint import CheckpointMeta
from autoseg.networks.parts import NetworkPart, UNetPart, get_network_part
from autoseg.planner.plans import ConfigurationPlan
from autoseg.planner.recipe import Recipe


def network_part(meta: CheckpointMeta) -> NetworkPart:
    """The network part a checkpoint was trained with (the plan's U-Net for checkpoints from before recipes).

    Raises:
        PluginError: the part is not installed (the message names the package it came from).
    """
    if meta.recipe is None:
        return UNetPart()
    choice = Recipe.from_json(meta.recipe).network
    return get_network_part(choice.name, choice.params, origin=choice.origin)


def network_from_checkpoint(ckpt: dict[str, Any], config: ConfigurationPlan,
                            source: str | os.PathLike[str] = "checkpoint") -> tuple[nn.Module, CheckpointMeta]:
    """The network of a loaded checkpoint, weights loaded, deep supervision off (full-resolution logits only).

    Raises:
        FileFormatError: the checkpoint lacks its description.
        PluginError: its network part is not installed.
    """
    meta = CheckpointMeta.from_json(ckpt, source)
    net = network_part(meta).build(config.topology, in_channels=meta.in_channels, num_classes=meta.num_outputs,
                                   deep_supervision=False)
    net.load_state_dict(ckpt["network"])
    return net, meta
