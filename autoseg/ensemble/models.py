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

from autoseg.inference.export import (
    LabelLayout,
    export_map,
    export_segmentation,
    output_names,
    probabilities_path,
    probabilities_to_labels,
    save_probabilities_npz,
    write_probability_images,
)
from autoseg.inference.predictor import Predictor
from autoseg.inference.sliding_window import InferenceError
from autoseg.inference.uncertainty import (
    MemberOutputs,
    combined_score,
    entropy_map,
    error_head_scores,
    probability_scores,
)
from autoseg.io.image import Geometry, file_ending, label_dtype, write_image, write_label
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


def map_path(folder: Path, seg_path: Path, name: str) -> Path:
    """``folder/<case>_<name><ending>`` for the segmentation ``seg_path`` (2D image formats: ``.tif``)."""
    ending = file_ending(seg_path)
    stem = seg_path.name[: -len(ending)]
    return folder / f"{stem}_{name}{'.tif' if ending in ('.png', '.bmp') else ending}"


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

    def preprocess(self, images: np.ndarray, geometry: Geometry, missing: Sequence[int] = ()
                   ) -> list[PreprocessedArrays]:
        """Each member's preprocessed input (identical plans share one); ``missing`` channels are blanked."""
        out: list[PreprocessedArrays] = []
        seen: dict[tuple[str, str | None], PreprocessedArrays] = {}
        for m in self.members:
            key = (m.config.data_identifier, m.config.previous_stage)
            if key not in seen:
                seen[key] = m.preprocess(images, geometry, missing)
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

    def member_outputs(self, inputs: Sequence[PreprocessedArrays]) -> list[MemberOutputs]:
        """Each member's logits with its folds' and mirror variants' agreement (for ``--uncertainty``)."""
        return [m.members(p.data) for m, p in zip(self.members, inputs, strict=True)]

    def uncertainty(self, outputs: Sequence[MemberOutputs], props: Sequence[CaseProperties], probs: np.ndarray
                    ) -> tuple[dict[str, float | None], dict[str, np.ndarray]]:
        """Per-case scores and voxel maps (file layout) of one case; see :mod:`autoseg.inference.uncertainty`.

        Args:
            outputs: from :meth:`member_outputs`.
            props: each member's preprocessing record.
            probs: the final averaged probabilities in file layout (from :meth:`export`).

        Returns:
            Scores (``tta_agreement``, ``fold_agreement``, ``confidence``, ``expected_dice``, and with learned
            error heads ``error_head`` and ``error_head_tta``; None where not defined) and maps (``entropy``,
            ``disagreement`` when there are at least two members, ``error`` with error heads).
        """
        entropy = entropy_map(probs, self.layout)
        scores: dict[str, float | None] = dict(probability_scores(probs, self.layout, entropy))
        tta = [o.tta_agreement for o in outputs if o.tta_agreement is not None]
        folds = [o.fold_agreement for o in outputs if o.fold_agreement is not None]
        scores["tta_agreement"] = float(np.mean(tta)) if tta else None
        scores["fold_agreement"] = float(np.mean(folds)) if folds else None
        scores["combined"] = combined_score(scores)
        maps = {"entropy": entropy}
        grids = [(o.disagreement, m, p) for o, m, p in zip(outputs, self.members, props, strict=True)
                 if o.disagreement is not None]
        if grids:
            maps["disagreement"] = sum(export_map(d, p, m.plans, m.config) for d, m, p in grids) / len(grids)
        errors = [(o.error, m, p) for o, m, p in zip(outputs, self.members, props, strict=True) if o.error is not None]
        if errors:
            maps["error"] = sum(export_map(e, p, m.plans, m.config) for e, m, p in errors) / len(errors)
            scores.update(error_head_scores(probabilities_to_labels(probs, self.layout), maps["error"],
                                            scores["tta_agreement"]))
        return scores, maps

    def write(self, path: str | os.PathLike[str], logits: Sequence[np.ndarray], props: Sequence[CaseProperties], *,
              save_probabilities: bool = False, outputs: Sequence[MemberOutputs] | None = None,
              maps_dir: str | os.PathLike[str] | None = None, probabilities_dir: str | os.PathLike[str] | None = None
              ) -> tuple[np.ndarray, dict[str, float | None] | None]:
        """Export and write one case (probabilities first, to ``<case>.npz``; with ``probabilities_dir`` also one
        float32 image per class or region there, see :func:`write_probability_images`).

        With ``outputs`` (from :meth:`member_outputs`) the uncertainty maps are also written, to
        ``maps_dir/<case>_entropy<ending>``, ``<case>_disagreement<ending>`` and, with error heads,
        ``<case>_error<ending>`` (float32, the input's geometry; 2D image formats get ``.tif``), and the case's
        scores are returned.

        Returns:
            The label map written, and the scores (None without ``outputs``).
        """
        path = Path(path)
        seg, probs = self.export(logits, props, probabilities=save_probabilities or outputs is not None
                                 or probabilities_dir is not None)
        if probs is not None and save_probabilities:
            save_probabilities_npz(probabilities_path(path), probs, self.layout)
        if probs is not None and probabilities_dir is not None:
            write_probability_images(probabilities_dir, path, probs, output_names(self.plans.labels, self.layout),
                                     props[0].geometry)
        scores = None
        if outputs is not None:
            assert probs is not None
            scores, maps = self.uncertainty(outputs, props, probs)
            del probs
            folder = Path(maps_dir) if maps_dir is not None else path.parent
            folder.mkdir(parents=True, exist_ok=True)
            for name, arr in maps.items():
                write_image(map_path(folder, path, name), arr.astype(np.float32, copy=False), props[0].geometry)
        write_label(path, seg, props[0].geometry)
        return seg, scores

    def predict(self, images: np.ndarray, geometry: Geometry | Sequence[float], *, missing: Sequence[int] = ()
                ) -> np.ndarray:
        """Segment one case given as arrays (see :meth:`Predictor.predict`); ``missing`` channels are blanked."""
        images, geometry = self.members[0].check_images(images, geometry)
        pre = self.preprocess(images, geometry, missing)
        return self.export(self.logits(pre), [p.properties for p in pre])[0]
