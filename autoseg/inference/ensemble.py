"""What ``predict`` runs per case: one or several configurations, then optional postprocessing and label mapping.

A single configuration exports its fold-averaged logits directly (the same labels its validation wrote). Several
configurations each export their probabilities in the input's geometry; these are averaged (nnU-Net's ensembling
of configurations) and turned into labels. The label map is then postprocessed (rules learnt by ``find-best``)
and, last, relabelled into another label convention when a ``label_map`` is given (e.g. BraTS 3 -> 4).

    >>> ens = ModelEnsemble([Predictor.from_workdir("work", "3d_fullres")])     # doctest: +SKIP
    >>> seg = ens.predict(images, geometry)                                     # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.inference.export import (LabelLayout, export_segmentation, probabilities_path, probabilities_to_labels,
                                      save_probabilities_npz)
from autoseg.inference.predictor import Predictor
from autoseg.inference.sliding_window import InferenceError
from autoseg.io.image import Geometry, label_dtype, write_label
from autoseg.preprocessing.preprocess import PreprocessedArrays
from autoseg.preprocessing.properties import CaseProperties

#: postprocessing: (label map in file layout, spacing in numpy axis order) -> label map
Postprocess = Callable[[np.ndarray, Sequence[float]], np.ndarray]


def apply_label_map(seg: np.ndarray, label_map: Mapping[int, int] | None) -> np.ndarray:
    """Relabel ``seg`` (``{old: new}``; unlisted values are kept). Swaps like ``{1: 2, 2: 1}`` work."""
    if not label_map:
        return seg
    top = max(int(seg.max(initial=0)), *map(int, label_map))
    lut = np.arange(top + 1, dtype=np.int64)
    for old, new in label_map.items():
        lut[int(old)] = int(new)
    return lut[seg].astype(label_dtype(int(lut.max(initial=0))))


def parse_label_map(text: str | Sequence[str] | Mapping[int, int] | None) -> dict[int, int] | None:
    """``"3:4"``, ``["1:1", "3:4"]`` or ``{3: 4}`` -> ``{3: 4}``.

    Raises:
        InferenceError: a pair that is not ``OLD:NEW`` with non-negative integers.
    """
    if text is None or isinstance(text, Mapping):
        return {int(k): int(v) for k, v in text.items()} if text else None
    items = [text] if isinstance(text, str) else list(text)
    out: dict[int, int] = {}
    for item in (p for i in items for p in str(i).replace(",", " ").split()):
        old, sep, new = item.partition(":")
        if not sep or not old.strip().isdigit() or not new.strip().isdigit():
            raise InferenceError(f"label map entry {item!r} is not OLD:NEW with label values >= 0; write e.g. "
                                 "--map-labels 3:4 (BraTS 2023 enhancing tumour 3 written as 4).")
        out[int(old)] = int(new)
    return out or None


@dataclass
class ModelEnsemble:
    """Predictors of one or more configurations plus what happens to their label map.

    Attributes:
        members: one :class:`Predictor` per configuration (same label layout and input channels).
        postprocess: applied to each label map (file layout) with its spacing, or None.
        label_map: output relabelling ``{old: new}`` applied last, or None.
        names: the members' configuration names (for records).
    """

    members: list[Predictor]
    postprocess: Postprocess | None = None
    label_map: dict[int, int] | None = None
    names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.members:
            raise InferenceError("an ensemble needs at least one model.")
        first = self.members[0]
        for m in self.members[1:]:
            if m.layout != first.layout or m.plans.channel_names != first.plans.channel_names:
                raise InferenceError(
                    f"configurations {first.config.name} and {m.config.name} cannot be ensembled: they differ in "
                    "input channels or label layout (they must come from the same dataset and plans).")
        self.names = self.names or [m.config.name for m in self.members]

    @property
    def layout(self) -> LabelLayout:
        return self.members[0].layout

    @property
    def plans(self):  # type: ignore[no-untyped-def]
        """The first member's plans (channel names, labels)."""
        return self.members[0].plans

    def preprocess(self, images: np.ndarray, geometry: Geometry) -> list[PreprocessedArrays]:
        """Each member's preprocessed input (identical plans share one)."""
        out: list[PreprocessedArrays] = []
        seen: dict[tuple[str, str | None], PreprocessedArrays] = {}
        for m in self.members:
            key = (m.config.data_identifier, m.config.previous_stage)
            if key not in seen:
                seen[key] = m.preprocess(images, geometry)
            out.append(seen[key])
        return out

    def logits(self, inputs: Sequence[PreprocessedArrays]) -> list[np.ndarray]:
        """Each member's fold-averaged logits on its own grid."""
        return [m.logits(p.data) for m, p in zip(self.members, inputs, strict=True)]

    def export(self, logits: Sequence[np.ndarray], props: Sequence[CaseProperties], *, probabilities: bool = False
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """Final label map (after postprocessing and label map) and, optionally, the averaged probabilities."""
        if len(self.members) == 1:
            m = self.members[0]
            seg, probs = export_segmentation(logits[0], props[0], m.plans, m.config, m.layout,
                                             return_probabilities=probabilities)
        else:
            probs = None
            for m, lg, pr in zip(self.members, logits, props, strict=True):
                p = export_segmentation(lg, pr, m.plans, m.config, m.layout, return_probabilities=True)[1]
                probs = p.astype(np.float32) if probs is None else np.add(probs, p, out=probs)
            probs /= len(self.members)
            seg = probabilities_to_labels(probs, self.layout)
            probs = probs.astype(np.float16)
        if self.postprocess is not None:
            seg = self.postprocess(seg, props[0].geometry.array_spacing)
        return apply_label_map(seg, self.label_map), probs

    def write(self, path: str | os.PathLike[str], logits: Sequence[np.ndarray], props: Sequence[CaseProperties], *,
              save_probabilities: bool = False) -> np.ndarray:
        """Export and write one case (probabilities first, to ``<case>.npz``); returns the label map written."""
        seg, probs = self.export(logits, props, probabilities=save_probabilities)
        if probs is not None:
            save_probabilities_npz(probabilities_path(Path(path)), probs, self.layout)
        write_label(path, seg, props[0].geometry)
        return seg

    def predict(self, images: np.ndarray, geometry: Geometry | Sequence[float]) -> np.ndarray:
        """Segment one case given as arrays (see :meth:`Predictor.predict`)."""
        images, geometry = self.members[0].check_images(images, geometry)
        pre = self.preprocess(images, geometry)
        return self.export(self.logits(pre), [p.properties for p in pre])[0]
