"""How good is a saliency map? Deletion and insertion curves, their AUCs, and the map's mass inside the reference.

For one case, one class and one map on the preprocessed grid:

* **deletion**: rank the voxels from most to least salient (ties in random order); for each fraction ``f`` of
  :data:`FRACTIONS`, blank (set to 0, the value of an absent channel after normalisation) the top
  ``round(f x |R|)`` voxels in every channel, ``|R|`` the number of voxels of the reference mask (at least 1),
  predict, and score the class's Dice. A map that points at what the network uses makes the Dice fall fast:
  **lower AUC is better**.
* **insertion**: the reverse: only the top ``round(f x |R|)`` voxels are kept, the rest blanked; **higher AUC
  is better**.
* **mass inside**: the share of the map's positive mass inside the reference mask (pointing-game style);
  **higher is better**. A uniform map scores the mask's volume share.

The fractions count in units of the mask's own volume (0 to 2 masks, finer below one), not of the image: a
tumour fills a few % of the volume, so on a grid of image fractions any map that ranks the mask first erases it
within the first step and the curves only test whether the map covers the mask. Counted in masks, the first
steps blank parts of the tumour, and a map that ranks the voxels the network relies on first (inside the mask
too) lowers the Dice sooner than one that only covers the mask.

The AUC is the trapezoid area under Dice over ``f`` divided by the span of ``f`` (so in [0, 1]).

Two baseline maps every method has to beat: a **random** map (uniform noise) and a **distance** map,
``1 / (1 + d)`` with ``d`` the distance in mm to the predicted mask of the class (1 inside it): it needs no
network and already "explains" that the mask is where the mask is.

>>> auc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0])
0.5
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from autoseg.evaluation.metrics import EvaluationError
from autoseg.io.atomic import write_text_atomic

#: voxels blanked (deletion) or kept (insertion), in multiples of the reference mask's volume
FRACTIONS = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
BASELINES = ("random", "distance")
METRICS = (("deletion_auc", "lower"), ("insertion_auc", "higher"), ("mass_inside", "higher"))


def auc(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions`` divided by the fractions' span."""
    f, v = np.asarray(fractions, np.float64), np.asarray(values, np.float64)
    if f.ndim != 1 or f.shape != v.shape or f.size < 2 or not (np.diff(f) > 0).all():
        raise EvaluationError(f"auc: {f.size} fractions and {v.size} values; give at least two increasing "
                              "fractions and one value each.")
    return float(((v[1:] + v[:-1]) * np.diff(f)).sum() / 2 / (f[-1] - f[0]))


def ranking(saliency: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat voxel indices from most to least salient, ties in random order."""
    flat = np.asarray(saliency, np.float64).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def blanking_curve(saliency: np.ndarray, dice_of: Callable[[np.ndarray], float], fractions: Sequence[float], *,
                   insertion: bool, rng: np.random.Generator, unit: int | None = None) -> list[float]:
    """Dice for each fraction: ``dice_of(keep)`` with ``keep`` the voxels left unblanked (bool, map's shape).

    Deletion blanks the top ``f * unit`` voxels (rounded half up) (at most all of them); insertion keeps only them.
    ``unit`` is the number of voxels a fraction of 1 stands for: the mask's volume, default the whole map.
    """
    order = ranking(saliency, rng)
    unit = order.size if unit is None else int(unit)
    values = []
    for f in fractions:
        top = np.zeros(order.size, bool)
        top[order[:min(order.size, int(float(f) * unit + 0.5))]] = True  # rounded half up
        keep = top if insertion else ~top
        values.append(float(dice_of(keep.reshape(np.shape(saliency)))))
    return values


def mass_inside(saliency: np.ndarray, reference: np.ndarray) -> float:
    """Share of the map's positive mass inside ``reference`` (NaN for a map with no positive mass)."""
    pos = np.clip(np.asarray(saliency, np.float64), 0, None)
    total = pos.sum()
    return float(pos[np.asarray(reference, bool)].sum() / total) if total > 0 else math.nan


def random_map(shape: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """The random baseline: uniform noise."""
    return rng.random(tuple(shape)).astype(np.float32)


def distance_map(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """The distance baseline: ``1 / (1 + d)``, ``d`` the distance in mm to ``mask`` (uniform for an empty mask)."""
    from scipy.ndimage import distance_transform_edt

    mask = np.asarray(mask, bool)
    if not mask.any():
        return np.ones(mask.shape, np.float32)
    d = distance_transform_edt(~mask, sampling=[float(s) for s in spacing])
    return (1.0 / (1.0 + d)).astype(np.float32)


@dataclass(frozen=True)
class MapScore:
    """Scores of one map (case, class, method)."""

    case_id: str
    class_name: str
    method: str
    deletion: tuple[float, ...]
    insertion: tuple[float, ...]
    mass_inside: float

    @property
    def deletion_auc(self) -> float:
        return auc(FRACTIONS[:len(self.deletion)], self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(FRACTIONS[:len(self.insertion)], self.insertion)


def score_map(case_id: str, class_name: str, method: str, saliency: np.ndarray, reference: np.ndarray,
              dice_of: Callable[[np.ndarray], float], *, seed: int = 0) -> MapScore:
    """Deletion and insertion curves over :data:`FRACTIONS` of the reference's volume and the mass inside
    ``reference``."""
    unit = max(1, int(np.count_nonzero(reference)))
    curves = [blanking_curve(saliency, dice_of, FRACTIONS, insertion=ins, rng=np.random.default_rng(seed), unit=unit)
              for ins in (False, True)]
    return MapScore(case_id, class_name, method, tuple(curves[0]), tuple(curves[1]),
                    mass_inside(saliency, reference))


@dataclass
class ExplanationEvaluation:
    """Scores of every map, with the table and the verdict against the baselines."""

    scores: list[MapScore] = field(default_factory=list)

    def methods(self) -> list[str]:
        return list(dict.fromkeys(s.method for s in self.scores))

    def mean(self, method: str, metric: str, class_name: str | None = None) -> float:
        """Mean of ``metric`` over the cases (and classes, unless ``class_name``), NaN ignored."""
        vals = [getattr(s, metric) for s in self.scores
                if s.method == method and (class_name is None or s.class_name == class_name)]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else math.nan

    def not_beating(self) -> dict[str, list[str]]:
        """Per non-baseline method, the ``metric vs baseline`` comparisons it does not win (means over all; equal
        to 3 decimals, the table's precision, is not a win)."""
        out: dict[str, list[str]] = {}
        for m in self.methods():
            if m in BASELINES:
                continue
            lost = []
            for metric, better in METRICS:
                mine = self.mean(m, metric)
                for b in BASELINES:
                    other = self.mean(b, metric)
                    mine_r, other_r = round(mine, 3), round(other, 3)  # a tie at the table's precision loses
                    wins = mine_r < other_r if better == "lower" else mine_r > other_r
                    if not wins:
                        lost.append(f"{metric} vs {b}")
            out[m] = lost
        return out

    def format_table(self) -> str:
        """One row per method: mean deletion AUC, insertion AUC and mass inside, then the verdict."""
        rows = [["method", "deletion AUC (lower better)", "insertion AUC (higher better)", "mass inside ref"]]
        for m in self.methods():
            rows.append([m, *(f"{self.mean(m, metric):.3f}" for metric, _ in METRICS)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        n_cases = len({s.case_id for s in self.scores})
        lines.insert(0, f"Explanation quality, mean over {n_cases} case(s) and the classes (curves over 0 to "
                        f"{FRACTIONS[-1]:g} reference volumes):")
        for m, lost in self.not_beating().items():
            lines.append(f"{m}: beats both baselines on every metric" if not lost
                         else f"{m}: does NOT beat {', '.join(lost)}")
        return "\n".join(lines)

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per case, class and method: the AUCs, the mass inside and both curves."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["case", "class", "method", "deletion_auc", "insertion_auc", "mass_inside", "deletion_curve",
                    "insertion_curve"])
        for s in self.scores:
            w.writerow([s.case_id, s.class_name, s.method, f"{s.deletion_auc:.6f}", f"{s.insertion_auc:.6f}",
                        f"{s.mass_inside:.6f}", " ".join(f"{v:.4f}" for v in s.deletion),
                        " ".join(f"{v:.4f}" for v in s.insertion)])
        write_text_atomic(path, buf.getvalue())
