"""Checkpoints: written atomically, loaded with ``weights_only=True`` (loading never runs code).

A checkpoint holds the network and optimizer state, the grad scaler, the epoch to continue from, the RNG
states of torch / numpy / Python, the best EMA pseudo Dice and a description of the run (configuration,
fold, mirror axes, label layout) so a model folder describes itself.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import FileFormatError
from autoseg.io.atomic import atomic_path
from autoseg.io.model_folder import FINAL, LATEST  # noqa: F401  (re-exported: the checkpoint file names)


def rng_state() -> dict[str, Any]:
    """RNG states of torch, numpy and Python, in types ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(cached)],
            "python": list(random.getstate()[1]) + [random.getstate()[0]]}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[-1], tuple(py[:-1]), None))


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a crash never leaves a half-written file under its name).

    The state is written through a file object: ``torch.save`` to a path names the archive's inner folder after
    the (random) temporary file, so the same state would give different bytes on every save.
    """
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        sink = _KeepWriteError(fh)
        try:
            torch.save(state, sink)
        except RuntimeError as err:  # torch reports a failed write (disk full) as "unexpected pos ..."
            if sink.error is None:
                raise
            raise sink.error from err


class _KeepWriteError:
    """A file object that remembers the ``OSError`` of a failed write (errno, e.g. ENOSPC), which torch hides."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: Any) -> int:
        try:
            return self.fh.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.fh.flush()


def load_checkpoint(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code.

    Raises:
        FileFormatError: missing, truncated, not a checkpoint, or containing objects other than tensors and
            plain containers (a file that would need code to load is refused).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: checkpoint not found; train first (`autoseg train`) or check the path.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for corrupt or unsafe files
        raise FileFormatError(f"{path}: cannot be loaded as a safe checkpoint ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}). It is corrupt, truncated or holds "
                              "objects that would run code when loaded; delete it and retrain or resume from "
                              "another checkpoint.") from err
    if not isinstance(state, dict) or "network" not in state:
        raise FileFormatError(f"{path}: not an autoseg checkpoint (no 'network' entry).")
    return state


#: version of :class:`CheckpointMeta`; checkpoints written before it was recorded are version 1
META_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """The description of a run that every checkpoint carries next to the weights (a model folder describes itself).

    Stored as top-level entries of the checkpoint, so older files (without ``meta_version``) load unchanged.

    Attributes:
        configuration: the configuration trained.
        fold: the fold (``"0"``..., or ``"all"``).
        in_channels: network input channels (image channels, plugin channels, one-hot cascade labels).
        num_outputs: network output channels (labels, or regions).
        mirror_axes: the axes mirrored in training, and so at test time.
        cascade_labels: labels one-hot encoded from a cascade's first stage (empty otherwise).
        epochs: the epochs the run was asked for.
        settings: the :class:`~autoseg.training.settings.TrainSettings` as JSON.
        init_from: what fine-tuning copied (``TransferReport`` JSON), when the run started from another model.
        recipe: the training recipe as JSON (:class:`~autoseg.planner.recipe.Recipe`); None in checkpoints written
            before recipes existed (they hold the plan's U-Net).
        meta_version: :data:`META_VERSION` when written.
    """

    configuration: str
    fold: str
    in_channels: int
    num_outputs: int
    mirror_axes: tuple[int, ...] = ()
    cascade_labels: tuple[int, ...] = ()
    epochs: int | None = None
    settings: dict[str, Any] | None = None
    init_from: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    meta_version: int = META_VERSION

    def to_json(self) -> dict[str, Any]:
        """Plain entries for the checkpoint (``init_from`` only when set)."""
        out: dict[str, Any] = {"configuration": self.configuration, "fold": self.fold,
                               "mirror_axes": list(self.mirror_axes), "in_channels": self.in_channels,
                               "num_outputs": self.num_outputs, "epochs": self.epochs,
                               "cascade_labels": list(self.cascade_labels), "settings": self.settings,
                               "meta_version": self.meta_version}
        if self.init_from is not None:
            out["init_from"] = self.init_from
        if self.recipe is not None:
            out["recipe"] = self.recipe
        return out

    @classmethod
    def from_json(cls, state: dict[str, Any], source: str | os.PathLike[str] = "checkpoint") -> CheckpointMeta:
        """Read the entries of a loaded checkpoint.

        Raises:
            FileFormatError: an entry the predictor needs is missing or of the wrong type, or the version is newer.
        """
        version = int(state.get("meta_version", 1))
        if version > META_VERSION:
            raise FileFormatError(f"{source}: checkpoint description version {version} is newer than this autoseg "
                                  f"reads ({META_VERSION}); upgrade autoseg.")
        try:
            return cls(configuration=str(state.get("configuration", "")), fold=str(state.get("fold", "")),
                       in_channels=int(state["in_channels"]), num_outputs=int(state["num_outputs"]),
                       mirror_axes=tuple(int(a) for a in state.get("mirror_axes", ())),
                       cascade_labels=tuple(int(v) for v in state.get("cascade_labels", ())),
                       epochs=None if state.get("epochs") is None else int(state["epochs"]),
                       settings=state.get("settings"), init_from=state.get("init_from"), recipe=state.get("recipe"),
                       meta_version=version)
        except (KeyError, TypeError, ValueError) as err:
            raise FileFormatError(f"{source}: not an autoseg checkpoint (entry {err} missing or malformed); train "
                                  "the fold again or use the checkpoint_final.pt that `autoseg train` wrote.") from err
