"""One slice of a case for the worst-case figures: image (first channel), reference and prediction.

The slice is cut across the coarsest axis (axis 0 when the spacing is near isotropic) where the reference covers
the most voxels (the prediction when the reference is empty), and cropped around the reference and prediction
on it with a margin, so a small structure in a large image stays visible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.evaluation.metrics import ClassSpec, class_values
from autoseg.io.image import read_image, read_label

#: an axis counts as the slice axis when its spacing is this much coarser than the finest
ANISOTROPY = 1.2


@dataclass
class CaseView:
    """The 2D arrays one worst-case figure shows.

    Attributes:
        case_id: the case.
        image: the first channel on the slice (float).
        reference: class name -> mask on the slice (None when there is no reference).
        prediction: class name -> mask on the slice (None when there is no prediction).
        aspect: height / width of one pixel (spacing ratio), for display.
        where: which slice, in words (``slice 31 of 62 along axis 0``).
        problems: what could not be shown and why.
    """

    case_id: str
    image: np.ndarray
    reference: dict[str, np.ndarray] | None
    prediction: dict[str, np.ndarray] | None
    aspect: float
    where: str
    problems: list[str]


def masks(seg: np.ndarray, classes: Mapping[str, ClassSpec]) -> dict[str, np.ndarray]:
    """class name -> boolean mask (a region is the union of its label values)."""
    return {name: np.isin(seg, class_values(spec)) for name, spec in classes.items()}


def _slice_axis(spacing: tuple[float, ...]) -> int:
    sp = np.asarray(spacing, dtype=float)
    return int(np.argmax(sp)) if sp.max() > ANISOTROPY * sp.min() else 0


def _crop_box(fg: np.ndarray, margin_fraction: float = 0.6, min_margin: int = 12) -> tuple[slice, ...]:
    """A box around the foreground of a 2D mask with a margin (the whole slice when it is empty)."""
    if not fg.any():
        return tuple(slice(0, n) for n in fg.shape)
    box = []
    for axis in range(2):
        hit = np.flatnonzero(fg.any(axis=1 - axis))
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        pad = max(min_margin, int(round((hi - lo) * margin_fraction)))
        box.append(slice(max(lo - pad, 0), min(hi + pad, fg.shape[axis])))
    return tuple(box)


def load_case_view(case_id: str, image_path: Path, label_path: Path | None, prediction_path: Path | None,
                   classes: Mapping[str, ClassSpec]) -> CaseView:
    """Read the files of a case and cut the slice to show.

    Args:
        case_id: the case.
        image_path: its first channel file.
        label_path: its reference (None or missing: not shown).
        prediction_path: its CV prediction (None or missing: not shown).
        classes: class name -> label value or region.

    Returns:
        The view; what could not be read is listed in ``problems``.

    Raises:
        ImageReadError: the image itself cannot be read.
    """
    img = read_image(image_path, dtype="compact")  # 16-bit CT stays 16-bit; only the slice becomes float
    volume = img.array[0]
    spacing = img.geometry.array_spacing
    problems: list[str] = []
    segs: dict[str, np.ndarray | None] = {}
    for what, path in (("reference", label_path), ("prediction", prediction_path)):
        segs[what] = None
        if path is None or not path.is_file():
            problems.append(f"no {what} file for {case_id}")
            continue
        seg = read_label(path).array
        if seg.shape != volume.shape:
            problems.append(f"{what} {path.name} has shape {seg.shape}, the image {volume.shape}: not shown")
            continue
        segs[what] = seg
    ref, pred = segs["reference"], segs["prediction"]
    if volume.ndim == 2:
        volume, spacing = volume[None], (1.0, *spacing)
        ref, pred = (None if s is None else s[None] for s in (ref, pred))
    axis = _slice_axis(spacing)
    others = tuple(a for a in range(3) if a != axis)
    index = volume.shape[axis] // 2
    for s in (ref, pred):
        counts = (s > 0).sum(axis=others) if s is not None else np.zeros(1)
        if counts.any():
            index = int(np.argmax(counts))
            break

    def cut(a: np.ndarray) -> np.ndarray:
        return np.take(a, index, axis=axis)

    box = _crop_box(np.logical_or.reduce([cut(s) > 0 for s in (ref, pred) if s is not None]
                                         or [np.zeros(cut(volume).shape, dtype=bool)]))
    shown = [s for a, s in enumerate(spacing) if a != axis]
    where = f"slice {index + 1} of {volume.shape[axis]} along axis {axis}" if volume.shape[axis] > 1 else "2D image"
    return CaseView(
        case_id, cut(volume)[box].astype(np.float32),
        None if ref is None else {k: m[box] for k, m in masks(cut(ref), classes).items()},
        None if pred is None else {k: m[box] for k, m in masks(cut(pred), classes).items()},
        float(shown[0] / shown[1]) if shown[1] > 0 else 1.0, where, problems)
