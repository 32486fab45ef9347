"""Fine-tuning: start a network from another model's weights (``autoseg train --init-from SOURCE``).

The source is a checkpoint file, a fold folder, a work folder or an exported bundle. Every tensor whose name and
shape match the new network is copied; the rest keep their fresh initialisation and are reported by name (the
usual ones: the first convolution when the channel count differs, the output heads when the classes differ, and
whole stages when the plans chose another topology). Loading goes through :func:`load_checkpoint`, so a source
never runs code. The optimizer, epoch and learning rate start afresh: this is a new training run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autoseg.errors import TrainingConfigError
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint

#: below this share of matched parameters the report says the source hardly helps
LOW_MATCH = 0.5


@dataclass(frozen=True)
class TransferReport:
    """What :func:`load_matching_weights` copied.

    Attributes:
        source: the checkpoint file the weights came from.
        matched: tensor names copied from the source.
        reshaped: ``(name, source shape, network shape)`` of tensors present in both with different shapes.
        missing: network tensors the source does not have.
        unused: source tensors the network does not have.
        matched_fraction: share of the network's parameters (elements) that were copied.
    """

    source: Path
    matched: tuple[str, ...] = ()
    reshaped: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    missing: tuple[str, ...] = ()
    unused: tuple[str, ...] = field(default_factory=tuple)
    matched_fraction: float = 0.0

    def lines(self) -> list[str]:
        """A human-readable summary: how much matched, then every layer that did not."""
        out = [f"initialised from {self.source}: {len(self.matched)} tensors matched "
               f"({self.matched_fraction:.0%} of the parameters)"]
        out += [f"  not matched (shape {tuple(a)} in the source, {tuple(b)} here): {name}"
                for name, a, b in self.reshaped]
        out += [f"  not in the source: {name}" for name in self.missing]
        if self.unused:
            out.append(f"  source tensors without a place here: {len(self.unused)} (e.g. {self.unused[0]})")
        if self.matched_fraction < LOW_MATCH:
            out.append("  few layers matched: the plans chose another network; to transfer more, plan the new "
                       "dataset with the source's topology (same patch-size rules, features and stages).")
        return out

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form (stored with the training settings)."""
        return {"source": str(self.source), "matched": len(self.matched), "matched_fraction": self.matched_fraction,
                "reshaped": [[n, list(a), list(b)] for n, a, b in self.reshaped], "missing": list(self.missing),
                "unused": len(self.unused)}


def find_source_checkpoint(source: str | os.PathLike[str], configuration: str) -> Path:
    """The checkpoint file ``source`` designates.

    A file is taken as it is. A fold folder gives its final (else latest) checkpoint. A work folder or bundle
    gives ``models/<configuration>/fold_all`` if trained, else its lowest fold; when that configuration is absent
    and exactly one other was trained, that one.

    Raises:
        TrainingConfigError: nothing usable at ``source`` (the message lists what is there).
    """
    path = Path(source)
    if path.is_file():
        return path
    if not path.is_dir():
        raise TrainingConfigError(f"--init-from {path}: not found; give a checkpoint file (.pt), a fold folder, a "
                                  "work folder or an exported bundle.")
    for name in (FINAL, LATEST):
        if (path / name).is_file():
            return path / name
    models = path / "models"
    trained = sorted(d.name for d in models.iterdir() if d.is_dir()) if models.is_dir() else []
    config = configuration if configuration in trained else (trained[0] if len(trained) == 1 else None)
    if config is None:
        found = f"its models are {', '.join(trained)}" if trained else "it holds no models/ folder"
        raise TrainingConfigError(f"--init-from {path}: no trained {configuration!r} model ({found}). Point at a "
                                  "fold folder or checkpoint file to choose one.")
    folds = sorted((d for d in (models / config).glob("fold_*") if (d / FINAL).is_file()),
                   key=lambda d: (d.name != "fold_all", d.name))
    if not folds:
        raise TrainingConfigError(f"--init-from {path}: {models / config} has no finished fold "
                                  f"({FINAL}); finish training there first or point at a checkpoint file.")
    return folds[0] / FINAL


def load_matching_weights(network: nn.Module, source: str | os.PathLike[str], *,
                          configuration: str) -> TransferReport:
    """Copy every tensor of ``source`` whose name and shape match ``network``'s; report the rest.

    Args:
        network: the freshly built network (its other weights stay as initialised).
        source: checkpoint file, fold folder, work folder or bundle (see :func:`find_source_checkpoint`).
        configuration: the configuration being trained (picks the model inside a work folder or bundle).

    Returns:
        The report (``report.lines()`` to print it).

    Raises:
        TrainingConfigError: no usable checkpoint, or not a single convolution matches (another dimensionality or
            an unrelated network).
        FileFormatError: the checkpoint is corrupt or unsafe (it would run code).

    Example:
        >>> report = load_matching_weights(net, "pretrained_bundle", configuration="3d_fullres")  # doctest: +SKIP
        >>> print("\\n".join(report.lines()))  # doctest: +SKIP
    """
    path = find_source_checkpoint(source, configuration)
    src: dict[str, torch.Tensor] = load_checkpoint(path)["network"]
    own = network.state_dict()
    take = {k: v for k, v in src.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not any(v.dim() >= 2 for v in take.values()):  # normalisation vectors alone may match by chance
        raise TrainingConfigError(f"--init-from {path}: none of its {len(src)} tensors fits this network (another "
                                  "dimensionality or topology). Use a model of the same configuration kind (2d or "
                                  "3d), ideally planned with the same topology.")
    network.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in take.items()}})
    elements = sum(v.numel() for k, v in own.items() if v.is_floating_point())
    copied = sum(v.numel() for k, v in take.items() if v.is_floating_point())
    return TransferReport(
        source=path, matched=tuple(sorted(take)),
        reshaped=tuple((k, tuple(src[k].shape), tuple(own[k].shape)) for k in sorted(own)
                       if k in src and k not in take),
        missing=tuple(k for k in sorted(own) if k not in src), unused=tuple(k for k in sorted(src) if k not in own),
        matched_fraction=copied / elements if elements else 0.0)

