"""Spatial explanations of one case: maps per class or region in the input's geometry, overlays, scores.

For each method of :mod:`autoseg.inference.saliency` and each class (or region) of the plans, the map made on
the preprocessed grid is exported like an uncertainty map (resampled back, 0 outside the crop) and written with
the input's spacing, origin and direction to ``OUT/maps/<case>_<method>_<class><ending>`` (``gradcam++`` is
spelled ``gradcampp`` in file names); ``OUT/overlays/``
gets a PNG of the three axial slices (first array axis) with the most mass, the map over the first channel
with the mask explained as a contour. With ``evaluate`` the maps and the two baselines of
:mod:`autoseg.evaluation.explanation_scores` are scored on the preprocessed grid.

The target mask is the predicted mask of the class, or the reference's when ``use_reference``; the scores are
taken against the reference when there is one, else against the model's own prediction.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.evaluation.dice import dice_scores
from autoseg.evaluation.explanation_scores import MapScore, distance_map, random_map, score_map
from autoseg.evaluation.metrics import EvaluationError, classes_from_labels
from autoseg.inference.export import export_map
from autoseg.inference.predictor import Predictor
from autoseg.inference.saliency import saliency_maps
from autoseg.io.atomic import atomic_path, write_text_atomic
from autoseg.io.image import Geometry, write_image
from autoseg.preprocessing.preprocess import preprocess_arrays

SUMMARY_FIELDS = ("case", "class", "method", "layer", "file", "overlay", "mass", "mass_inside_mask", "top_slices")


@dataclass(frozen=True)
class Target:
    """A class or region to explain: its name, label values and network output index."""

    name: str
    labels: tuple[int, ...]
    output: int


def targets(predictor: Predictor) -> list[Target]:
    """Every class (softmax) or region (sigmoid) of the model, background left out."""
    layout = predictor.layout
    out = []
    for name, spec in classes_from_labels(predictor.plans.labels).items():
        labels = tuple(spec) if isinstance(spec, tuple) else (int(spec),)
        if layout.regions is not None and labels in layout.regions:
            out.append(Target(name, labels, layout.regions.index(labels)))
        elif layout.regions is None and len(labels) == 1:
            out.append(Target(name, labels, labels[0]))
    return out


def _predicted_masks(logits: np.ndarray, predictor: Predictor, tgts: Sequence[Target]) -> np.ndarray:
    if predictor.layout.regions is not None:
        return np.stack([logits[t.output] > 0 for t in tgts])
    arg = logits.argmax(0)
    return np.stack([arg == t.output for t in tgts])


@dataclass
class _Case:
    """One case prepared for explaining: preprocessed data, prediction, masks on the grid, truth in file layout."""

    case_id: str
    images: np.ndarray
    geometry: Geometry
    pre: Any
    seg: np.ndarray
    masks: np.ndarray  # explained masks on the grid (len(targets), *grid)
    predicted: np.ndarray  # predicted masks on the grid
    explained: np.ndarray  # label map whose masks are explained, file layout (the prediction or the reference)
    truth_grid: np.ndarray  # masks the scores are taken against, on the grid
    truth: np.ndarray  # label map the Dice is taken against, file layout


def prepare_case(predictor: Predictor, case_id: str, images: np.ndarray, geometry: Geometry,
                 reference: np.ndarray | None, tgts: Sequence[Target], *, use_reference: bool) -> _Case:
    """Preprocess and predict a case and build its masks on the grid."""
    images, geometry = predictor.check_images(images, geometry)
    pre = predictor.preprocess(images, geometry)
    logits = predictor.logits(pre.data)
    seg = predictor.export(logits, pre.properties)[0]
    predicted = _predicted_masks(logits, predictor, tgts)
    truth_grid, truth = predicted, seg
    if reference is not None:
        if reference.shape != images.shape[1:]:
            raise EvaluationError(f"case {case_id}: reference of shape {reference.shape} does not match the "
                                  f"images {images.shape[1:]}; pass the label file of this case.")
        ref_grid = preprocess_arrays(images, reference, geometry, predictor.plans, predictor.config).seg
        truth_grid, truth = np.stack([np.isin(ref_grid, t.labels) for t in tgts]), reference
    own = use_reference and reference is not None
    return _Case(case_id, images, geometry, pre, seg, truth_grid if own else predicted, predicted,
                 reference if own else seg, truth_grid, truth)


def _dice_fn(predictor: Predictor, case: _Case, target: Target) -> Any:
    """``keep -> Dice`` of the target with the voxels outside ``keep`` blanked in every channel."""
    cache: dict[str, np.ndarray] = {}

    def seg_for(keep: np.ndarray) -> np.ndarray:
        if keep.all():
            return case.seg
        key = "blank" if not keep.any() else ""
        if key in cache:
            return cache[key]
        data = case.pre.data.copy()
        data[:, ~keep] = 0
        seg = predictor.export(predictor.logits(data), case.pre.properties)[0]
        if key:
            cache[key] = seg
        return seg

    def dice_of(keep: np.ndarray) -> float:
        d = dice_scores(seg_for(keep), case.truth, [target.labels])[0]
        return 1.0 if np.isnan(d) else d  # absent from both: nothing to find, nothing found
    return dice_of


def score_case(predictor: Predictor, case: _Case, tgts: Sequence[Target], maps: dict[str, np.ndarray], *,
               seed: int = 0) -> list[MapScore]:
    """Scores of every map in ``maps`` (method -> ``(len(targets), *grid)``) and of the two baselines."""
    rng = np.random.default_rng(seed)
    spacing = case.pre.properties.target_spacing_t
    scores = []
    for j, t in enumerate(tgts):
        dice_of = _dice_fn(predictor, case, t)
        baselines = {"random": random_map(case.predicted[j].shape, rng),
                     "distance": distance_map(case.predicted[j], spacing)}
        for method, sal in {**baselines, **{m: v[j] for m, v in maps.items()}}.items():
            scores.append(score_map(case.case_id, t.name, method, sal, case.truth_grid[j], dice_of, seed=seed))
    return scores


def _top_slices(volume: np.ndarray, n: int = 3) -> list[int]:
    if volume.ndim < 3:
        return [0]
    mass = np.clip(volume, 0, None).reshape(volume.shape[0], -1).sum(1)
    return sorted(int(i) for i in np.argsort(-mass, kind="stable")[:n])


def write_overlay(path: Path, image: np.ndarray, saliency: np.ndarray, mask: np.ndarray, title: str) -> list[int]:
    """PNG of the three slices with the most mass: the first channel in grey, the map on top, the mask's contour."""
    from matplotlib.figure import Figure

    slices = _top_slices(saliency)
    pick = (lambda a, i: a[i]) if saliency.ndim >= 3 else (lambda a, i: a)
    fig = Figure(figsize=(2.4 * len(slices), 2.6))
    vmax = float(saliency.max()) or 1.0
    for n, i in enumerate(slices):
        ax = fig.add_subplot(1, len(slices), n + 1)
        ax.imshow(pick(image, i), cmap="gray")
        ax.imshow(np.ma.masked_less_equal(pick(saliency, i), 0), cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
        if pick(mask, i).any():
            ax.contour(pick(mask, i).astype(float), levels=[0.5], colors="white", linewidths=0.6)
        ax.set_title(f"slice {i}", fontsize=7)
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=60)
    return slices


def write_maps(predictor: Predictor, case: _Case, tgts: Sequence[Target], method: str, maps: np.ndarray,
               output: Path, ending: str, layer: str) -> list[dict[str, Any]]:
    """Write each target's map in the input's geometry and its overlay; one summary row per target."""
    rows = []
    for j, t in enumerate(tgts):
        full = export_map(maps[j], case.pre.properties, predictor.plans, predictor.config)
        stem = f"{case.case_id}_{method.replace('+', 'p')}_{t.name}"
        path, png = output / "maps" / f"{stem}{ending}", output / "overlays" / f"{stem}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        png.parent.mkdir(parents=True, exist_ok=True)
        write_image(path, full.astype(np.float32), case.geometry)
        explained = np.isin(case.explained, t.labels)
        top = write_overlay(png, case.images[0], full, explained, f"{case.case_id} {t.name}: {method}")
        total = float(np.clip(full, 0, None).sum())
        inside = float(np.clip(full, 0, None)[explained].sum()) / total if total > 0 else float("nan")
        rows.append({"case": case.case_id, "class": t.name, "method": method,
                     "layer": layer if method.startswith("gradcam") else "", "file": str(path),
                     "overlay": str(png), "mass": f"{total:.6g}", "mass_inside_mask": f"{inside:.4f}",
                     "top_slices": " ".join(map(str, top))})
    return rows


def write_summary(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
    """The summary CSV: one row per case, class and method (see :data:`SUMMARY_FIELDS`)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_FIELDS), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def explain_case(predictor: Predictor, networks: Sequence[Any], case: _Case, tgts: Sequence[Target], *,
                 methods: Sequence[str], layer: str | None, output: Path, ending: str
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Maps of every method for a prepared case, written with overlays; returns the grid maps and summary rows."""
    maps, rows = {}, []
    outputs = [t.output for t in tgts]
    for method in methods:
        maps[method] = saliency_maps(networks, case.pre.data, case.masks, outputs, method=method,
                                     patch_size=predictor.config.patch_size, layer=layer,
                                     step_size=predictor.step_size, device=predictor.device)
        rows += write_maps(predictor, case, tgts, method, maps[method], output, ending, layer or "decoder.0")
    return maps, rows


@dataclass
class SpatialExplanation:
    """What a spatial ``explain`` wrote, and the scores when evaluated.

    Attributes:
        rows: the summary rows (one per case, class and method).
        evaluation: an :class:`~autoseg.evaluation.explanation_scores.ExplanationEvaluation`, or None.
    """

    rows: list[dict[str, Any]]
    evaluation: Any = None

    def format_table(self) -> str:
        cases = len({r["case"] for r in self.rows})
        methods = ", ".join(dict.fromkeys(r["method"] for r in self.rows))
        text = f"{len(self.rows)} map(s) of {cases} case(s) ({methods}); mass inside the explained mask:"
        lines = [text] + [f"  {r['case']}  {r['class']}  {r['method']}: {r['mass_inside_mask']}" for r in self.rows]
        if self.evaluation is not None:
            lines += ["", self.evaluation.format_table()]
        return "\n".join(lines)
