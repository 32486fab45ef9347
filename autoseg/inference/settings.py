"""Prediction settings: every knob of ``predict`` in one record, as :class:`~autoseg.training.settings.TrainSettings`
is for training. The API, the deploy pipeline and the predictor pass this record down instead of loose knobs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from autoseg.device import Runtime
from autoseg.errors import PredictionInputError

#: ``fast=True``: no test-time mirroring and this window step (about 8x and 2-3x fewer network passes in 3D)
FAST_STEP = 0.75
#: nnU-Net's window step (a fraction of the patch)
DEFAULT_STEP = 0.5
#: seconds without a heartbeat after which a ``--claim`` claim counts as abandoned (its holder is taken for dead)
DEFAULT_CLAIM_TIMEOUT = 600.0


def check_part(num_parts: int, part_id: int) -> None:
    """Refuse a part that does not exist, in one line naming the flags.

    Raises:
        PredictionInputError: ``num_parts < 1``, or ``part_id`` outside ``0 .. num_parts - 1``.
    """
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise PredictionInputError(f"--num-parts {num_parts!r}: give a whole number of parts, 1 or more "
                                   "(num_parts).")
    if isinstance(part_id, bool) or not isinstance(part_id, int) or not 0 <= part_id < num_parts:
        raise PredictionInputError(f"--part-id {part_id!r} does not exist with --num-parts {num_parts}: give "
                                   f"--part-id 0 to {num_parts - 1} (part_id; parts count from 0).")


#: what ``predict`` writes per case: the segmentation image, and with ``dicom-seg`` a DICOM Segmentation besides
OUTPUT_FORMATS = ("nifti", "dicom-seg")


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
        probability_images: also write one float32 image per class or region (its probability, in the input's
            geometry) to ``OUTPUT/probabilities/<case>_<name><ending>``, for viewers.
        output_format: ``nifti`` (the segmentation in the input's format; NIfTI for DICOM series), or ``dicom-seg``:
            also ``OUTPUT/<case>.dcm``, a DICOM Segmentation object referencing the input series (DICOM inputs only).
        overwrite: redo cases whose output exists (default: skip them).
        progress: show a progress bar.
        postprocessing: None = the learnt rules when following ``find-best``'s choice; True = the learnt rules;
            False / ``"none"`` = none; a path = that rules file.
        label_map: write labels in another convention, ``{old: new}`` or ``"3:4"`` (default: a bundle's own).
        uncertainty: also write voxel-wise entropy and disagreement maps and per-case quality scores.
        missing: channels (names or indices) that were not acquired; they are filled as the model saw them blanked.
        drift: compare each input with the training fingerprint (warnings and flags in ``quality.csv``).
        num_parts: split the cases into this many parts (sorted case ids; case ``i`` goes to part ``i % num_parts``)
            and predict only part ``part_id``; see :mod:`autoseg.ensemble.sharding`.
        part_id: which part this process predicts, ``0 .. num_parts - 1``.
        claim: share the cases (of this part) dynamically with every other ``claim`` process writing to the same
            output folder, through claim files in ``OUTPUT/.claims/`` (not with ``overwrite``).
        claim_timeout: seconds without a heartbeat after which another process's claim is taken over (its holder
            is also taken for dead at once when it ran on this host and its process is gone).
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
    probability_images: bool = False
    output_format: str = "nifti"
    overwrite: bool = False
    progress: bool = True
    postprocessing: bool | str | os.PathLike[str] | None = None
    label_map: Mapping[int, int] | str | Sequence[str] | None = None
    uncertainty: bool = False
    missing: tuple[str | int, ...] = ()
    drift: bool = True
    num_parts: int = 1
    part_id: int = 0
    claim: bool = False
    claim_timeout: float = DEFAULT_CLAIM_TIMEOUT

    def __post_init__(self) -> None:
        check_part(self.num_parts, self.part_id)
        if self.output_format not in OUTPUT_FORMATS:
            raise PredictionInputError(f"--output-format {self.output_format!r} is not known; choose one of "
                                       f"{', '.join(OUTPUT_FORMATS)} (output_format).")
        if not self.claim_timeout > 0:
            raise PredictionInputError(f"--claim-timeout {self.claim_timeout!r}: give a number of seconds above 0 "
                                       "(claim_timeout).")
        if self.claim and self.overwrite:
            raise PredictionInputError("--claim and --overwrite do not go together: a claim cannot tell an output "
                                       "another process just wrote from an old one; delete the old outputs (or use "
                                       "a new output folder) and run with --claim alone.")
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
    def shared(self) -> bool:
        """Whether other processes may write to the same output folder (parts or claims)."""
        return self.num_parts > 1 or self.claim

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
