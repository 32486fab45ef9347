"""The global model: weights as a list of arrays (what Flower carries), and the server's copy as an ordinary autoseg
model folder (``models/<configuration>/fold_all/checkpoint_final.pt``), so ``predict``, ``find-best`` and ``export``
use it unchanged. The checkpoint is written atomically after every round and records the round for resuming."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.inference.export import LabelLayout
from autoseg.io.atomic import write_text_atomic
from autoseg.io.model_folder import configuration_folder, fold_folder
from autoseg.networks.checkpoint import FINAL, CheckpointMeta, load_checkpoint, save_checkpoint
from autoseg.planner.plans import Plans
from autoseg.training.augmentation import augmentation_params
from autoseg.training.components import derived_seed
from autoseg.training.parts import build_part
from autoseg.training.settings import TrainSettings

#: the fold name of the global model (trained on every site's cases)
GLOBAL_FOLD = "all"


def build_network(plans: Plans, configuration: str) -> torch.nn.Module:
    """The configuration's network with the initial weights ``autoseg train`` would give it (seeded by the plans)."""
    config = plans.configuration(configuration)
    torch.manual_seed(derived_seed(plans.seed, configuration, GLOBAL_FOLD, "init"))
    layout = LabelLayout.from_labels(plans.labels, None)
    part = build_part("network", plans.recipe(configuration).network)
    return part.build(config.topology, in_channels=len(plans.channel_names), num_classes=layout.num_outputs)


def to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """A state dict's tensors in its order, as numpy arrays."""
    return [t.detach().cpu().numpy() for t in state.values()]


def to_state(arrays: list[np.ndarray], like: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """Arrays back into a state dict shaped and typed like ``like`` (averaged integer buffers are rounded)."""
    if len(arrays) != len(like):
        from autoseg.errors import FederationError

        raise FederationError(f"received {len(arrays)} weight arrays for a network of {len(like)} tensors; every "
                              "site and the server must use the same plans and autoseg version.")
    out = OrderedDict()
    for (name, ref), arr in zip(like.items(), arrays, strict=True):
        a = np.asarray(arr)
        if not ref.dtype.is_floating_point:
            a = np.rint(a)
        out[name] = torch.as_tensor(a.reshape(tuple(ref.shape))).to(ref.dtype)
    return out


def zero_momentum(network_state: dict[str, torch.Tensor], plans: Plans, configuration: str) -> list[np.ndarray]:
    """A fresh optimiser's momentum buffers (zeros, one per trainable parameter in the network's order): SGD's first
    step from a zero buffer is the step from no buffer."""
    names = [n for n, _ in build_network(plans, configuration).named_parameters()]
    return [np.zeros(tuple(network_state[n].shape), dtype=np.float32) for n in names]


def pack(state: dict[str, torch.Tensor], momentum: list[np.ndarray] | None) -> list[np.ndarray]:
    """What travels: the network's tensors, then (when shared) the optimiser's momentum buffers."""
    return to_arrays(state) + list(momentum or [])


def unpack(arrays: list[np.ndarray], like: dict[str, torch.Tensor]
           ) -> tuple[OrderedDict[str, torch.Tensor], list[np.ndarray] | None]:
    """Weights (shaped like ``like``) and the momentum buffers that follow them (None when none travelled)."""
    arrays = list(arrays)
    return to_state(arrays[:len(like)], like), ([np.asarray(a, dtype=np.float32) for a in arrays[len(like):]]
                                                or None)


def global_checkpoint(workdir: Path, configuration: str) -> Path:
    """Where the server keeps the global model."""
    return fold_folder(workdir, configuration, GLOBAL_FOLD) / FINAL


def save_global(workdir: Path, plans: Plans, configuration: str, state: dict[str, torch.Tensor], *, round_: int,
                epochs: int, momentum: list[np.ndarray] | None = None, velocity: list[np.ndarray] | None = None
                ) -> Path:
    """Write the global model atomically as an ordinary checkpoint (plus ``plans.json`` next to the configuration);
    the global momentum buffers (when shared) and the server's velocity (server momentum) go with it for a resumed
    coordinator."""
    config = plans.configuration(configuration)
    layout = LabelLayout.from_labels(plans.labels, None)
    recipe = plans.recipe(configuration)
    meta = CheckpointMeta(configuration=configuration, fold=GLOBAL_FOLD, in_channels=len(plans.channel_names),
                          num_outputs=layout.num_outputs, mirror_axes=tuple(augmentation_params(
                              config.patch_size, mirror_axes=recipe.mirror_axes_for(config.ndim)).mirror_axes),
                          epochs=epochs, settings=TrainSettings(epochs=epochs).to_json(), recipe=recipe.to_json())
    path = global_checkpoint(workdir, configuration)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = configuration_folder(workdir, configuration)
    if not (folder / "plans.json").is_file():
        plans.save(folder / "plans.json")
    if (workdir / "dataset.json").is_file() and not (folder / "dataset.json").is_file():  # labels, region order
        write_text_atomic(folder / "dataset.json", (workdir / "dataset.json").read_text(encoding="utf-8"))
    extra = {"federated_momentum": [torch.as_tensor(m) for m in momentum]} if momentum is not None else {}
    if velocity is not None:
        extra["federated_velocity"] = [torch.as_tensor(v) for v in velocity]
    save_checkpoint(path, {"network": state, "epoch": epochs, "federated_round": round_, **meta.to_json(), **extra})
    return path


def load_global(workdir: Path, configuration: str) -> tuple[dict[str, Any], int, list[np.ndarray] | None,
                                                          list[np.ndarray] | None] | None:
    """The saved global weights, the rounds they include, the global momentum buffers (None: not shared) and the
    server's velocity (None: no server momentum), or None before the first round."""
    path = global_checkpoint(workdir, configuration)
    if not path.is_file():
        return None
    state = load_checkpoint(path)
    momentum, velocity = state.get("federated_momentum"), state.get("federated_velocity")
    return (state["network"], int(state.get("federated_round", 0)),
            None if momentum is None else [m.numpy() for m in momentum],
            None if velocity is None else [v.numpy() for v in velocity])
