"""Turn network output on the preprocessed grid back into a segmentation in the input's exact geometry.

Steps (the reverse of preprocessing): resample the logits to the cropped image's shape (order
``order_probabilities``, the coarse axis separately for anisotropic data), convert to labels (argmax, or
sigmoid > 0.5 per region with later regions painted over earlier ones in ``regions_class_order``), put the
crop back into the full image, undo the transpose and the dummy axis of 2D files. The file is written with
the input's spacing, origin and direction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.io.atomic import atomic_path
from autoseg.io.image import write_label
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.cropping import uncrop
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import case_resampling, resample_data


@dataclass(frozen=True)
class LabelLayout:
    """How network outputs map to label values.

    ``regions`` None: softmax over ``num_outputs`` classes, output ``i`` is label ``i``. Otherwise output
    ``i`` is region ``regions[i]`` (a tuple of labels, sigmoid), painted with ``regions_class_order[i]``.
    """

    num_outputs: int
    regions: tuple[tuple[int, ...], ...] | None = None
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def from_labels(cls, labels: dict, regions_class_order: Sequence[int] | None = None) -> LabelLayout:
        """Layout from dataset.json ``labels`` (and ``regions_class_order`` for region datasets)."""
        entries = {k: v for k, v in labels.items() if k != "ignore"}
        as_tuple = {k: tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v])) for k, v in entries.items()}
        if any(len(v) > 1 for v in as_tuple.values()):
            regions = tuple(v for v in as_tuple.values() if v != (0,))
            order = tuple(int(v) for v in regions_class_order) if regions_class_order else tuple(max(r) for r in regions)
            return cls(len(regions), regions, order)
        return cls(max(v[0] for v in as_tuple.values()) + 1)

    @property
    def class_values(self) -> tuple[int, ...]:
        """Per output the label value it stands for (regions: the painted value)."""
        return self.regions_class_order if self.regions is not None else tuple(range(self.num_outputs))


def _to_file_axes(arr: np.ndarray, props: CaseProperties, plans: Plans, n_lead: int) -> np.ndarray:
    back = tuple(plans.transpose_backward)
    arr = arr.transpose(tuple(range(n_lead)) + tuple(a + n_lead for a in back))
    if props.file_ndim == 2:
        arr = arr.reshape(arr.shape[:n_lead] + arr.shape[n_lead + 1:])
    return arr


def resample_logits(logits: np.ndarray, props: CaseProperties, config: ConfigurationPlan) -> np.ndarray:
    """Logits on the preprocessed grid -> float32 logits on the cropped original grid."""
    axis = case_resampling(config.resampling, props.target_spacing_t, props.spacing_t)
    rs = config.resampling
    return resample_data(np.asarray(logits, dtype=np.float32), props.shape_after_crop_t,
                         order=rs.order_probabilities, separate_axis=axis, order_z=rs.order_z)


def logits_to_labels(logits: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """Label map from logits ``(K, *spatial)`` (argmax, or regions painted in order)."""
    if layout.regions is None:
        return np.argmax(logits, axis=0).astype(np.int16)
    seg = np.zeros(logits.shape[1:], np.int16)
    for i in np.argsort(layout.regions_class_order, kind="stable"):
        seg[logits[i] > 0] = layout.regions_class_order[i]  # sigmoid(x) > 0.5  <=>  x > 0
    return seg


def probabilities(logits: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """Softmax (labels) or sigmoid (regions) of ``(K, *spatial)`` logits, float32."""
    x = np.asarray(logits, dtype=np.float32)
    if layout.regions is not None:
        return 1.0 / (1.0 + np.exp(-x))
    x = np.exp(x - x.max(axis=0, keepdims=True))
    return x / x.sum(axis=0, keepdims=True)


def export_segmentation(logits: np.ndarray, props: CaseProperties, plans: Plans, config: ConfigurationPlan,
                        layout: LabelLayout, *, return_probabilities: bool = False
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Segmentation (and optionally probabilities) in the input file's array layout.

    Args:
        logits: ``(K, *spatial)`` network output on the preprocessed grid.
        props: the case's preprocessing record.
        plans: the plans (for the transpose).
        config: the configuration (for the resampling orders).
        layout: how outputs map to labels.
        return_probabilities: also return ``(K, *file_spatial)`` float32 probabilities.

    Returns:
        Label map with the file's spatial shape (numpy order), and the probabilities or None.
    """
    cropped = resample_logits(logits, props, config)
    seg = uncrop(logits_to_labels(cropped, layout), props.bbox_t, props.shape_before_crop_t, fill=0)
    probs = None
    if return_probabilities:
        p = probabilities(cropped, layout)
        probs = uncrop(p, props.bbox_t, props.shape_before_crop_t, fill=0)
        if layout.regions is None:  # outside the crop everything is background
            probs[0][uncrop(np.zeros(p.shape[1:], bool), props.bbox_t, props.shape_before_crop_t, fill=True)] = 1
        probs = _to_file_axes(probs, props, plans, 1)
    return _to_file_axes(seg, props, plans, 0), probs


def write_prediction(path: str | os.PathLike[str], logits: np.ndarray, props: CaseProperties, plans: Plans,
                     config: ConfigurationPlan, layout: LabelLayout, *, save_probabilities: bool = False) -> np.ndarray:
    """Export and write a prediction with the input's geometry; probabilities go to ``<name>.npz``.

    Returns:
        The segmentation written (file array layout).
    """
    seg, probs = export_segmentation(logits, props, plans, config, layout, return_probabilities=save_probabilities)
    path = Path(path)
    if probs is not None:
        stem = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
        with atomic_path(path.with_name(stem + ".npz")) as tmp, open(tmp, "wb") as fh:
            np.savez_compressed(fh, probabilities=probs.astype(np.float16), class_values=np.asarray(layout.class_values))
    write_label(path, seg, props.geometry)
    return seg
