"""Clinical tables from segmentations: the volume of every class and one row per lesion.

A class is a label value or a region (union of label values, BraTS style). Per class: voxel count and
volume in ml. Lesions are connected components with *full* connectivity by default (26 neighbours in 3D,
8 in 2D, as in the BraTS lesion-wise rules and :mod:`autoseg.evaluation.lesions`); lesion 1 is the
largest (ties keep raster order). Per lesion: voxels, ml, centroid in world mm (ITK physical space,
``origin + direction @ (spacing * index)`` with the index in ITK order x, y, z) and the RANO-style
**longest axial diameter**: the largest distance between the centres of two lesion voxels in the same
axial slice, over all slices (a line of L voxels gives ``(L - 1) * spacing``, one voxel 0), with the
slice where it was measured (lowest index on ties). Axial = perpendicular to world z: slices are taken
along the array axis whose direction is closest to world z, so flipped or permuted images measure
correctly. Distances use the convex hull of each row's outermost voxels; directions are taken to be
orthonormal (as ITK writes them). A 2D image is a single plane (no slice, no z).

Example::

    seg = read_label("case_001.nii.gz")
    m = measure_case(seg.array, seg.geometry, {"whole": (1, 2, 3), "enh": (3,)}, case_id="case_001")
    m.volumes[0].volume_ml, m.lesions[0].longest_axial_diameter_mm
    measure_folder("predictions", dataset_json="Dataset001/dataset.json")  # volumes.csv, lesions.csv
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from autoseg.evaluation.evaluate import detect_file_ending
from autoseg.evaluation.metrics import EvaluationError, class_values, classes_from_labels
from autoseg.io.atomic import write_text_atomic
from autoseg.io.dataset import DatasetSpec, read_dataset_json
from autoseg.io.image import Geometry, read_label, spacing_is_valid
from autoseg.parallel import imap_ordered

VOLUME_COLUMNS = ("case", "class", "voxels", "volume_ml")
LESION_COLUMNS = ("case", "class", "lesion", "voxels", "volume_ml", "centroid_x_mm", "centroid_y_mm",
                  "centroid_z_mm", "longest_axial_diameter_mm", "slice")


@dataclass(frozen=True)
class ClassVolume:
    """Volume of one class or region in one case."""

    class_name: str
    voxels: int
    volume_ml: float


@dataclass(frozen=True)
class LesionMeasurement:
    """One connected component of a class: size, world centroid and longest axial diameter."""

    class_name: str
    lesion: int  # 1 = largest
    voxels: int
    volume_ml: float
    centroid_mm: tuple[float, ...]  # world coordinates, ITK order (x, y[, z])
    longest_axial_diameter_mm: float
    slice: int | None  # index along CaseMeasurements.axial_axis; None in 2D


@dataclass
class CaseMeasurements:
    """Volumes (class order) and lesions (by class, then size) of one case; ``axial_axis`` is the array
    axis along which axial slices are counted (None in 2D)."""

    case_id: str
    volumes: list[ClassVolume] = field(default_factory=list)
    lesions: list[LesionMeasurement] = field(default_factory=list)
    axial_axis: int | None = None

    def volume_rows(self) -> list[list[str]]:
        """``volumes.csv`` rows (see :data:`VOLUME_COLUMNS`)."""
        return [[self.case_id, v.class_name, str(v.voxels), _cell(v.volume_ml)] for v in self.volumes]

    def lesion_rows(self) -> list[list[str]]:
        """``lesions.csv`` rows (see :data:`LESION_COLUMNS`); 2D images leave z and slice empty."""
        rows = []
        for les in self.lesions:
            xyz = [_cell(c) for c in les.centroid_mm] + [""] * (3 - len(les.centroid_mm))
            rows.append([self.case_id, les.class_name, str(les.lesion), str(les.voxels), _cell(les.volume_ml),
                         *xyz, _cell(les.longest_axial_diameter_mm), "" if les.slice is None else str(les.slice)])
        return rows


class TablePaths(NamedTuple):
    """The files :func:`measure_folder` wrote."""
    volumes: Path
    lesions: Path


def _cell(v: float) -> str:
    return "nan" if math.isnan(v) else repr(round(float(v), 6))


def axial_axis(geometry: Geometry) -> int | None:
    """The array axis (numpy order) closest to world z, along which axial slices are counted; None in 2D.

    Example:
        >>> axial_axis(Geometry.identity(3))  # array (z, y, x): slices along axis 0
        0
    """
    if geometry.ndim != 3:
        return None
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    itk_axis = int(np.argmax(np.abs(direction[2])))  # column j = world direction of ITK index axis j
    return 2 - itk_axis


def _world(index: np.ndarray, geometry: Geometry) -> tuple[float, ...]:
    """World point (ITK order) of a (fractional) array index given in numpy order."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(geometry.ndim, geometry.ndim)
    point = np.asarray(geometry.origin) + direction @ (np.asarray(geometry.spacing) * np.asarray(index)[::-1])
    return tuple(float(p) for p in point)


def _max_distance(points: np.ndarray) -> float:
    """Largest distance between two of the points (convex hull first; collinear sets checked pairwise)."""
    if len(points) > 3:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # all points on one line: the pairwise check below is exact
            pass
    return float(pdist(points).max()) if len(points) > 1 else 0.0


def longest_axial_diameter(mask: np.ndarray, in_plane_spacing: Sequence[float]) -> tuple[float, int]:
    """Longest in-plane voxel-centre distance of a mask over its slices (slices along axis 0).

    Args:
        mask: boolean ``(slices, rows, columns)`` array.
        in_plane_spacing: mm between rows and between columns.

    Returns:
        ``(diameter_mm, slice)``: the diameter and the lowest slice index where it occurs (0 for an
        empty mask).

    Example:
        >>> m = np.zeros((2, 1, 5), bool); m[1, 0, :] = True
        >>> longest_axial_diameter(m, (1.0, 0.5))
        (2.0, 1)
    """
    s_row, s_col = (float(s) for s in in_plane_spacing)
    rows = mask.any(axis=2)
    first = mask.argmax(axis=2)
    last = mask.shape[2] - 1 - mask[:, :, ::-1].argmax(axis=2)
    sl, row = np.nonzero(rows)  # C order: grouped by slice
    if not sl.size:
        return 0.0, 0
    f, lst = first[sl, row], last[sl, row]
    starts = np.flatnonzero(np.r_[True, sl[1:] != sl[:-1]])
    # an upper bound per slice (its bounding-box diagonal) lets most slices be skipped
    height = (np.maximum.reduceat(row, starts) - np.minimum.reduceat(row, starts)) * s_row
    width = (np.maximum.reduceat(lst, starts) - np.minimum.reduceat(f, starts)) * s_col
    bounds = np.hypot(height, width)
    ends = np.r_[starts[1:], sl.size]
    best, best_slice = -1.0, 0
    for k in np.lexsort((sl[starts], -bounds)).tolist():
        if bounds[k] < best - 1e-9:
            break
        a, b = starts[k], ends[k]
        r, lo, hi = row[a:b], f[a:b], lst[a:b]
        two = lo != hi
        pts = np.concatenate([np.stack([r, lo], 1), np.stack([r[two], hi[two]], 1)]) * (s_row, s_col)
        d = _max_distance(pts)
        if d > best + 1e-9 or (d > best - 1e-9 and sl[a] < best_slice):
            best, best_slice = d, int(sl[a])
    return best, best_slice


def _structure(ndim: int, connectivity: int | None) -> np.ndarray:
    conn = ndim if connectivity is None else connectivity
    if isinstance(conn, bool) or not isinstance(conn, (int, np.integer)) or not 1 <= conn <= ndim:
        raise EvaluationError(f"connectivity {connectivity!r} is invalid for {ndim}D images; give 1 (faces: "
                              f"{2 * ndim} neighbours) up to {ndim} (full: {3 ** ndim - 1} neighbours), or None.")
    return ndimage.generate_binary_structure(ndim, int(conn))


def _class_table(classes: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    if not classes:
        raise EvaluationError("no classes to measure; give at least one class (name -> label value or values) "
                              "or a dataset.json.")
    try:
        return {str(name): class_values(v) for name, v in classes.items()}
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"classes {dict(classes)!r}: every value must be an integer label or a list of "
                              "integer labels.") from err


def measure_case(seg: np.ndarray, geometry: Geometry, classes: Mapping[str, int | Sequence[int]], *,
                 case_id: str, connectivity: int | None = None) -> CaseMeasurements:
    """Volume of every class and size, centroid and longest axial diameter of every lesion of one case.

    Args:
        seg: label map in numpy order (``z, y, x`` or ``y, x``).
        geometry: the file's geometry (spacing, origin, direction in ITK order).
        classes: name -> label value or region (tuple of label values, measured as their union).
        case_id: written in every row.
        connectivity: neighbourhood of a lesion, as in ``scipy.ndimage.generate_binary_structure``:
            1 = faces (6 in 3D, 4 in 2D) up to ``ndim``; None = full (26 / 8, the BraTS lesion rule).

    Returns:
        The case's measurements; empty classes get a 0 volume and no lesion.

    Raises:
        EvaluationError: array and geometry disagree, bad spacing, no or non-integer classes, or bad connectivity.

    Example:
        >>> seg = np.zeros((3, 8, 8), np.uint8); seg[1, 2, 1:6] = 1
        >>> m = measure_case(seg, Geometry.identity(3), {"tumour": (1,)}, case_id="c1")
        >>> m.volumes[0].voxels, m.lesions[0].longest_axial_diameter_mm, m.lesions[0].slice
        (5, 4.0, 1)
    """
    seg = np.asarray(seg)
    if seg.ndim not in (2, 3) or seg.ndim != geometry.ndim:
        raise EvaluationError(f"case {case_id}: a {seg.ndim}D label map of shape {seg.shape} does not fit its "
                              f"{geometry.ndim}D geometry, or is not 2D/3D; give one spatial label map per case.")
    if not spacing_is_valid(geometry.spacing):
        raise EvaluationError(f"case {case_id}: spacing {geometry.spacing} is invalid; every value must be a "
                              "positive number of mm. Fix the file's header.")
    values = _class_table(classes)
    structure = _structure(seg.ndim, connectivity)
    ax = axial_axis(geometry)
    spacing = geometry.array_spacing
    voxel_ml = float(np.prod(spacing)) / 1000.0
    found = ndimage.find_objects(np.isin(seg, [v for vals in values.values() for v in vals]).view(np.uint8))
    box = found[0] if found else (slice(0, 0),) * seg.ndim  # crop to the classes' bounding box
    crop, offset = seg[box], np.array([b.start for b in box])
    order = [ax] + [a for a in range(3) if a != ax] if ax is not None else [0, 1]
    plane_spacing = [spacing[a] for a in order[-2:]]
    out = CaseMeasurements(case_id=str(case_id), axial_axis=ax)
    for name, vals in values.items():
        mask = np.isin(crop, vals)
        count = int(np.count_nonzero(mask))
        out.volumes.append(ClassVolume(name, count, count * voxel_ml))
        if not count:
            continue
        lab, n = ndimage.label(mask, structure=structure)
        sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
        boxes = ndimage.find_objects(lab)
        for rank, idx in enumerate(np.argsort(-sizes, kind="stable").tolist(), start=1):
            b = boxes[idx]
            start = np.array([s.start for s in b])
            if sizes[idx] == 1:  # speckles are common in predictions: skip the array work
                centre, diameter, k = start + offset, 0.0, 0
            else:
                comp = lab[b] == idx + 1
                centre = np.array([c.mean() for c in np.nonzero(comp)]) + start + offset
                planes = comp.transpose(order) if ax is not None else comp[None]
                diameter, k = longest_axial_diameter(planes, plane_spacing)
            out.lesions.append(LesionMeasurement(
                class_name=name, lesion=rank, voxels=int(sizes[idx]), volume_ml=int(sizes[idx]) * voxel_ml,
                centroid_mm=_world(centre, geometry), longest_axial_diameter_mm=diameter,
                slice=None if ax is None else int(k + start[ax] + offset[ax])))
    return out


def _measure_file(item: tuple[str, str, dict[str, tuple[int, ...]] | None, int | None]) -> CaseMeasurements:
    """Worker: read one label file and measure it (every nonzero value as a class when none are given)."""
    case_id, path, classes, connectivity = item
    image = read_label(path)
    if classes is None:
        classes = {str(int(v)): (int(v),) for v in np.unique(image.array) if v != 0}
        if not classes:
            return CaseMeasurements(case_id=case_id, axial_axis=axial_axis(image.geometry))
    return measure_case(image.array, image.geometry, classes, case_id=case_id, connectivity=connectivity)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue()


def measure_folder(folder: str | os.PathLike[str], *, classes: Mapping[str, int | Sequence[int]] | None = None,
                   dataset_json: str | os.PathLike[str] | DatasetSpec | None = None,
                   output_dir: str | os.PathLike[str] | None = None, file_ending: str | None = None,
                   connectivity: int | None = None, jobs: int = 1, progress: bool = True) -> TablePaths:
    """Measure every segmentation in a folder and write ``volumes.csv`` and ``lesions.csv`` atomically.

    Classes: ``classes``, else dataset.json's labels (background and ignore skipped, lists as regions),
    else every nonzero value found (named by value; a value absent from a case gets a 0 volume there).
    Files: those ending in ``file_ending``, else dataset.json's ending, else the most common image ending
    in the folder; other files (.npz, .json, .csv, ...), hidden files and subfolders are skipped.

    Args:
        folder: folder of label maps (predictions or references), one file per case.
        classes: name -> label value or region.
        dataset_json: path of a dataset.json (or a parsed ``DatasetSpec``) giving labels and file ending.
        output_dir: where the tables go (default ``folder``).
        file_ending: e.g. ``".nii.gz"``.
        connectivity: as in :func:`measure_case` (None = full).
        jobs, progress: worker processes (1 = in this process); show a progress bar.

    Returns:
        The paths of ``volumes.csv`` and ``lesions.csv`` (rows by case, class, lesion; numbers rounded to
        6 decimals; 2D files leave ``centroid_z_mm`` and ``slice`` empty).

    Raises:
        EvaluationError: the folder is missing or holds no segmentation, or a class or option is invalid.
        DatasetError: dataset.json is missing or malformed.
        ImageReadError: a file cannot be read (named in the message).

    Example::

        measure_folder("predictions", classes={"whole": (1, 2, 3), "enh": 3}).lesions  # predictions/lesions.csv
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: segmentation folder not found. Check the path.")
    spec = dataset_json if isinstance(dataset_json, DatasetSpec) or dataset_json is None \
        else read_dataset_json(Path(dataset_json))
    ending = file_ending or (spec.file_ending if spec is not None else None) or detect_file_ending(folder)
    files = {p.name[: -len(ending)]: p for p in sorted(folder.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(ending.lower())
             and len(p.name) > len(ending)}
    if not files:
        raise EvaluationError(f"{folder}: no segmentation files ending in '{ending}'. Check the folder and the "
                              "file ending.")
    source = classes if classes is not None else classes_from_labels(spec.labels) if spec is not None else None
    cls = _class_table(source) if source is not None else None
    _structure(3, connectivity)  # fail before reading any file
    items = [(case, str(path), cls, connectivity) for case, path in files.items()]
    cases = list(imap_ordered(_measure_file, items, jobs=jobs, desc="measuring", label=lambda it: it[1],
                              progress=progress))
    if cls is None:  # classes found in the files: every case gets a row for every value
        found = sorted({int(v.class_name) for c in cases for v in c.volumes})
        for c in cases:
            have = {v.class_name: v for v in c.volumes}
            c.volumes = [have.get(str(v), ClassVolume(str(v), 0, 0.0)) for v in found]
    out = Path(output_dir) if output_dir is not None else folder
    paths = TablePaths(out / "volumes.csv", out / "lesions.csv")
    write_text_atomic(paths.volumes, _csv_text(VOLUME_COLUMNS, [r for c in cases for r in c.volume_rows()]))
    write_text_atomic(paths.lesions, _csv_text(LESION_COLUMNS, [r for c in cases for r in c.lesion_rows()]))
    return paths
