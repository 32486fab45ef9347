"""Prediction from the notebook: ``autoseg.predict`` with one settings record instead of loose knobs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from autoseg.ensemble.cases import PredictionSummary
from autoseg.ensemble.pipeline import predict_files
from autoseg.inference.settings import FAST_STEP, InferenceSettings

__all__ = ["FAST_STEP", "InferenceSettings", "predict"]


def predict(inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
            workdir: str | os.PathLike[str], settings: InferenceSettings | None = None,
            on_warning: Callable[[str], None] | None = None, **overrides: Any) -> PredictionSummary:
    """Segment image files with trained models and write the results in the inputs' format and geometry.

    With no ``configuration``, the pipeline chosen by :func:`find_best` (``selection/best.json``: a configuration
    or an ensemble, and its postprocessing) is used; without a choice, the only trained configuration.

    Args:
        inputs: a folder of ``CASE_XXXX<ending>`` channel files (nnU-Net layout), or image files.
        output: output folder (``<case><ending>`` per case), or a file name for a single case.
        workdir: the work folder the models were trained in, or an exported bundle.
        settings: every prediction knob (:class:`~autoseg.inference.settings.InferenceSettings`: configuration,
            folds, device, tta, step_size, fast, amp, backend, deterministic, save_probabilities, overwrite,
            progress, postprocessing, label_map, uncertainty, missing, drift, num_parts, part_id, claim,
            claim_timeout); ``overrides`` replace single
            fields, e.g. ``predict(..., device="cpu", uncertainty=True)``. With ``uncertainty``, voxel-wise
            entropy and disagreement maps (and a learned error head's map, when the recipe has one) go to
            ``OUTPUT/uncertainty/`` and cases at or below the threshold
            ``find-best`` learnt on CV are flagged in ``OUTPUT/quality.csv``.
        on_warning: called with each input warning (default: :func:`warnings.warn`).

    Returns:
        What was written and skipped, warnings, per-case timings.

    Raises:
        PredictionInputError: missing, unreadable or mismatched inputs (all listed; nothing is written).
        ModelNotFoundError: no trained model for the configuration or folds.
        TypeError: an override names no setting.

    Example:
        >>> autoseg.predict("imagesTs", "predictions", workdir="autoseg_work/Dataset001")  # doctest: +SKIP
    """
    return predict_files(inputs, output, workdir, InferenceSettings.create(settings, **overrides), on_warning=on_warning)
