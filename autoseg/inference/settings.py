"""Prediction settings: every knob of ``predict`` in one record, as :class:`~autoseg.training.settings.TrainSettings`
is for training. The API, the deploy pipeline and the predictor pass this record down instead of loose knobs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from autoseg.device import Runtime

#: ``fast=True``: no test-time mirroring and this window step (about 8x and 2-3x fewer network passes in 3D)
FAST_STEP = 0.75
#: nnU-Net's window step (a fraction of the patch)
DEFAULT_STEP = 0.5


@dataclass(frozen=True)
class InferenceSettings:
    """How cases are predicted. ``None`` means "the choice of ``find-best``" or "automatic".

    Attributes:
        configuration: configuration name(s); several are ensembled (averaged probabilities). Default: the
            pipeline ``find-best`` chose (``selection/best.json``), else the only trained configuration.
        folds: folds to use (default: the chosen ones, else every trained fold); their logits are averaged.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        tta: test-time mirroring over the axes the model was trained with.
        step_size: window step as a fraction of the patch (default 0.5; :data:`FAST_STEP` with ``fast``).
        fast: no mirroring and a larger step; see the README for its measured Dice cost.
        amp: mixed precision (None: fp16 on CUDA, bf16 on CPUs that compute it natively).
        backend: ``torch``, or ``onnx`` for ONNX Runtime (float32).
        deterministic: float32 and deterministic algorithms, so the same inputs give the same files.
        save_probabilities: also write ``<case>.npz`` probabilities (for ensembling).
        overwrite: redo cases whose output exists (default: skip them).
        progress: show a progress bar.
        postprocessing: None = the learnt rules when following ``find-best``'s choice; True = the learnt rules;
            False / ``"none"`` = none; a path = that rules file.
        label_map: write labels in another convention, ``{old: new}`` or ``"3:4"`` (default: a bundle's own).
        uncertainty: also write voxel-wise entropy and disagreement maps and per-case quality scores.
        missing: channels (names or indices) that were not acquired; they are filled as the model saw them blanked.
        drift: compare each input with the training fingerprint (warnings and flags in ``quality.csv``).
    """

    configuration: str | tuple[str, ...] | None = None
    folds: tuple[str, ...] | None = None
    device: str = "auto"
    tta: bool = True
    step_size: float | None = None
    fast: bool = False
    amp: bool | None = None
    backend: str = "torch"
    deterministic: bool = False
    save_probabilities: bool = False
    overwrite: bool = False
    progress: bool = True
    postprocessing: bool | str | os.PathLike[str] | None = None
    label_map: Mapping[int, int] | str | Sequence[str] | None = None
    uncertainty: bool = False
    missing: tuple[str | int, ...] = ()
    drift: bool = True

    def __post_init__(self) -> None:
        if self.configuration is not None and not isinstance(self.configuration, str):
            object.__setattr__(self, "configuration", tuple(str(c) for c in self.configuration))
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(str(f) for f in self.folds))
        object.__setattr__(self, "missing", tuple(self.missing))

    @classmethod
    def create(cls, settings: InferenceSettings | None = None, **overrides: Any) -> InferenceSettings:
        """``settings`` (default: the defaults) with single fields replaced.

        Raises:
            TypeError: an override names no field (the message lists them).
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown prediction setting(s) {', '.join(unknown)}; the settings are "
                            f"{', '.join(sorted(names))}.")
        return replace(settings or cls(), **overrides)

    @property
    def window_step(self) -> float:
        """The sliding-window step actually used."""
        return self.step_size or (FAST_STEP if self.fast else DEFAULT_STEP)

    @property
    def mirroring(self) -> bool:
        """Whether test-time mirroring runs."""
        return self.tta and not self.fast

    def runtime(self) -> Runtime:
        """Device and precision (``deterministic`` turns mixed precision off; ONNX runs float32).

        Raises:
            TrainingError: the device is not available.
        """
        amp = False if self.backend != "torch" else self.amp
        return Runtime.create(self.device, amp=amp, deterministic=self.deterministic, purpose="inference")
