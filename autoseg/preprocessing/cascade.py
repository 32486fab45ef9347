"""The cascade's extra inputs: a first-stage segmentation brought onto a case's preprocessed grid, one-hot.

Training (:mod:`autoseg.training.cascade`) and prediction (:class:`autoseg.inference.predictor.Predictor`) use the
same two steps, so the second stage sees its inputs made the same way in both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from autoseg.planner.plans import Plans
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import resample_seg


def previous_stage_to_grid(seg: np.ndarray, props: CaseProperties, plans: Plans, order: int, order_z: int) -> np.ndarray:
    """A label map in file layout -> the preprocessed grid described by ``props`` (int8/int16 ``(1, *spatial)``)."""
    if props.file_ndim == 2:
        seg = seg[None]
    seg = seg.transpose(tuple(plans.transpose_forward))
    seg = seg[tuple(slice(a, b) for a, b in props.bbox_t)].astype(np.int16)
    seg = resample_seg(seg, props.shape_after_resampling_t, order=order, separate_axis=props.separate_axis,
                       order_z=order_z)
    return seg.astype(np.int8 if seg.max(initial=0) <= 127 else np.int16)[None]


def one_hot(seg: np.ndarray, labels: Sequence[int]) -> np.ndarray:
    """``(len(labels), *spatial)`` float32 one-hot of a ``(1, *spatial)`` or spatial label map."""
    s = seg[0] if seg.ndim and seg.shape[0] == 1 else seg
    return np.stack([(s == v) for v in labels]).astype(np.float32)
