"""DICOM series folders as images: one folder holds the slices of one series (one channel of a case).

The slices are found with GDCM (through SimpleITK), grouped by SeriesInstanceUID and sorted by their position
along the slice normal, then read as one volume with SimpleITK's series reader, so the volume gets the same
spacing, origin and direction conventions as every other format. Before any voxel is read, the slice headers
are checked: a series that is not one regular grid (gantry tilt, missing or unevenly spaced slices, slices in
different orientations, two slices at one position) is refused with one line naming the folder, the slices
and the fix, instead of being read onto a grid that misplaces its voxels.

A folder holding several series is read only when the series is chosen by its SeriesInstanceUID: as the path
``FOLDER/<SeriesInstanceUID>`` (a path that does not exist on disk, inside the folder) or with ``series_uid``;
otherwise it is refused with the series it holds listed.
"""

from __future__ import annotations

import functools
import locale
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from autoseg.errors import DicomSeriesError

#: slices whose orientation cosines differ by more than this are in different orientations
ORIENTATION_TOL = 1e-4
#: a slice step may differ from the series' median step by this fraction (and at least ``STEP_ATOL`` mm)
STEP_RTOL = 0.01
STEP_ATOL = 1e-3
#: slice positions drifting sideways by more than this angle (degrees) are a gantry tilt
TILT_TOL_DEG = 0.01
#: slices named in one message at most
MAX_NAMED = 3
RESAMPLE_FIX = ("resample the series to a regular grid and give that file instead (e.g. dcm2niix -z y, or a "
                "scanner re-export)")


#: a DICOM UID: digits in dot-separated groups
UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)+$")



F = TypeVar("F", bound=Callable[..., Any])


def keeps_locale(fn: F) -> F:
    """GDCM (SimpleITK's DICOM reader and writer) sets the process's C locale to "C", after which Python decodes
    subprocess output and text files as ASCII; the decorated function restores the locale it found."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        saved = locale.setlocale(locale.LC_ALL)
        try:
            return fn(*args, **kwargs)
        finally:
            locale.setlocale(locale.LC_ALL, saved)

    return wrapper  # type: ignore[return-value]

def split_series_path(path: str | os.PathLike[str]) -> tuple[Path, str | None] | None:
    """``(folder, None)`` for a folder, ``(folder, uid)`` for ``FOLDER/<SeriesInstanceUID>`` (not on disk, inside an
    existing folder), else None (not a series path)."""
    path = Path(path)
    if path.is_dir():
        return path, None
    if UID_RE.match(path.name) and not path.exists() and path.parent.is_dir():
        return path.parent, path.name
    return None


def is_series_path(path: str | os.PathLike[str]) -> bool:
    """True for a DICOM series folder, or ``FOLDER/<SeriesInstanceUID>`` choosing one series of a folder."""
    return split_series_path(path) is not None


@keeps_locale
def series_uids(folder: str | os.PathLike[str]) -> tuple[str, ...]:
    """The SeriesInstanceUIDs of the DICOM files directly in ``folder`` (GDCM's order)."""
    return _series_uids(Path(folder))


@dataclass(frozen=True)
class SeriesInfo:
    """A checked series: its slice files in position order and the geometry they make (ITK order ``x, y, z``)."""

    folder: Path
    uid: str
    files: tuple[str, ...]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    n_components: int
    pixel_id: int


def _series_uids(folder: Path) -> tuple[str, ...]:
    try:
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except RuntimeError as err:
        raise DicomSeriesError(f"{folder}: the DICOM files cannot be listed ({str(err).strip()[-200:]}). "
                               "Check the folder holds readable DICOM files.") from err


def _describe(folder: Path, uid: str) -> str:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    reader = _slice_reader(files[0]) if files else None
    text = reader.GetMetaData("0008|103e").strip() if reader is not None and reader.HasMetaDataKey("0008|103e") else ""
    return f"{uid} ({len(files)} file(s){', ' + text if text else ''})"


@keeps_locale
def choose_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> str:
    """The SeriesInstanceUID to read from ``folder``: the only one, or ``series_uid``.

    Raises:
        DicomSeriesError: no DICOM series in the folder, several and none chosen, or the chosen one absent.
    """
    folder = Path(folder)
    uids = _series_uids(folder)
    if not uids:
        raise DicomSeriesError(f"{folder}: no DICOM series found in this folder. Put the slice files of one series "
                               "here (or give an image file such as .nii.gz).")
    if series_uid is not None:
        if series_uid not in uids:
            raise DicomSeriesError(f"{folder}: no series with SeriesInstanceUID {series_uid}; the folder holds "
                                   f"{', '.join(uids)}.")
        return series_uid
    if len(uids) > 1:
        listed = "; ".join(_describe(folder, u) for u in uids)
        raise DicomSeriesError(f"{folder}: {len(uids)} DICOM series in one folder ({listed}). Choose one as "
                               f"{folder}/<SeriesInstanceUID>, or move each series into its own folder (one series per "
                               "channel: CASE_0000/, CASE_0001/, ...).")
    return uids[0]


def _slice_reader(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DicomSeriesError(f"{path}: this DICOM slice cannot be read ({str(err).strip()[-200:]}). Re-export or "
                               "remove the file.") from err
    return reader


def _floats(reader: sitk.ImageFileReader, key: str, n: int, path: str) -> np.ndarray:
    text = reader.GetMetaData(key) if reader.HasMetaDataKey(key) else ""
    try:
        values = np.array([float(v) for v in text.replace("\\", " ").split()], np.float64)
    except ValueError:
        values = np.zeros(0)
    if values.size != n:
        what = "ImagePositionPatient (0020,0032)" if key == "0020|0032" else "ImageOrientationPatient (0020,0037)"
        raise DicomSeriesError(f"{path}: the slice has no valid {what} ({text.strip()!r}), so it cannot be placed in "
                               "the volume. Re-export the series with its position tags.")
    return values


def _names(files: list[str] | tuple[str, ...], index: list[int] | np.ndarray) -> str:
    shown = [Path(files[int(i)]).name for i in list(index)[:MAX_NAMED]]
    more = f" and {len(index) - MAX_NAMED} more" if len(index) > MAX_NAMED else ""
    return ", ".join(shown) + more


def _check_orientation(folder: Path, files: tuple[str, ...], iops: np.ndarray) -> None:
    odd = np.flatnonzero(np.abs(iops - iops[0]).max(axis=1) > ORIENTATION_TOL)
    if odd.size:
        raise DicomSeriesError(f"{folder}: slices in different orientations: {_names(files, odd)} differ from "
                               f"{Path(files[0]).name} (ImageOrientationPatient {_fmt(iops[odd[0]])} vs "
                               f"{_fmt(iops[0])}); a volume needs one orientation. Fix: split the series by "
                               f"orientation (one folder each), or {RESAMPLE_FIX}.")


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _check_tilt(folder: Path, files: tuple[str, ...], ipps: np.ndarray, normal: np.ndarray) -> None:
    travel = ipps[-1] - ipps[0]
    along = float(travel @ normal)
    sideways = float(np.linalg.norm(travel - along * normal))
    angle = math.degrees(math.atan2(sideways, abs(along))) if along or sideways else 0.0
    if angle > TILT_TOL_DEG:
        raise DicomSeriesError(f"{folder}: gantry tilt of {angle:.2f} degrees (slice positions drift {sideways:.2f} mm "
                               f"sideways from {Path(files[0]).name} to {Path(files[-1]).name}); autoseg reads "
                               f"orthogonal grids only. Fix: {RESAMPLE_FIX.replace('-z y', '-z y, which corrects tilt')}.")


def _check_steps(folder: Path, files: tuple[str, ...], positions: np.ndarray) -> float:
    """The regular slice step; refuses repeated positions, gaps and uneven steps."""
    steps = np.diff(positions)
    same = np.flatnonzero(steps < STEP_ATOL)
    if same.size:
        raise DicomSeriesError(f"{folder}: {same.size} slice(s) at the position of another ({_names(files, same + 1)} "
                               f"repeat the position of {_names(files, same)}); a series holds each position once. "
                               "Fix: remove the duplicate slices (or split the series: one acquisition per folder).")
    step = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - step) > max(STEP_ATOL, STEP_RTOL * step))
    if not off.size:
        return float((positions[-1] - positions[0]) / (len(positions) - 1))
    pairs = ", ".join(f"{Path(files[i]).name} -> {Path(files[i + 1]).name} ({steps[i]:.3g} mm)" for i in off[:MAX_NAMED])
    more = f" and {off.size - MAX_NAMED} more" if off.size > MAX_NAMED else ""
    ratios = steps[off] / step
    if np.all(np.abs(ratios - np.round(ratios)) < 0.05) and np.all(ratios > 1.5):
        lost = int(np.round(ratios - 1).sum())
        raise DicomSeriesError(f"{folder}: about {lost} slice(s) missing: gaps at {pairs}{more}, {step:.4g} mm between "
                               "the other slices. Fix: copy the missing slice files into the folder, or "
                               f"{RESAMPLE_FIX}.")
    raise DicomSeriesError(f"{folder}: unevenly spaced slices: {pairs}{more}, {step:.4g} mm between the other slices. "
                           f"Fix: {RESAMPLE_FIX}.")


@keeps_locale
def inspect_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> SeriesInfo:
    """Find, sort and check a series from its slice headers (no voxels are read). ``folder`` may be
    ``FOLDER/<SeriesInstanceUID>``.

    Raises:
        DicomSeriesError: no series, several and none chosen, gantry tilt, missing or unevenly spaced slices,
            repeated positions or mixed orientations (one line naming the folder, the slices and the fix).
    """
    folder, chosen = split_series_path(folder) or (Path(folder), None)
    uid = choose_series(folder, series_uid or chosen)
    files = tuple(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
    readers = [_slice_reader(f) for f in files]
    first = readers[0]
    if len(files) == 1:  # one slice, or one multi-frame file: its own header says it all
        return SeriesInfo(folder, uid, files, tuple(first.GetSize()), tuple(first.GetSpacing()),
                          tuple(first.GetOrigin()), tuple(first.GetDirection()),
                          int(first.GetNumberOfComponents()), int(first.GetPixelID()))
    iops = np.stack([_floats(r, "0020|0037", 6, f) for r, f in zip(readers, files, strict=True)])
    _check_orientation(folder, files, iops)
    normal = np.cross(iops[0, :3], iops[0, 3:])
    ipps = np.stack([_floats(r, "0020|0032", 3, f) for r, f in zip(readers, files, strict=True)])
    order = np.argsort(ipps @ normal, kind="stable")
    files, ipps = tuple(files[i] for i in order), ipps[order]
    _check_tilt(folder, files, ipps, normal)
    step = _check_steps(folder, files, ipps @ normal)
    first = readers[int(order[0])]
    size = tuple(first.GetSize())
    direction = np.column_stack([iops[0, :3], iops[0, 3:], normal])  # ITK: columns are the axes
    return SeriesInfo(folder, uid, files, (size[0], size[1], len(files)), (*first.GetSpacing()[:2], step),
                      tuple(float(v) for v in ipps[0]), tuple(float(v) for v in direction.ravel()),
                      int(first.GetNumberOfComponents()), int(first.GetPixelID()))


@keeps_locale
def read_series(folder: str | os.PathLike[str], series_uid: str | None = None) -> sitk.Image:
    """The series as one SimpleITK volume, after :func:`inspect_series` accepted it.

    Raises:
        DicomSeriesError: the series is refused by :func:`inspect_series`, or its slices cannot be decoded.
    """
    info = inspect_series(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(info.files))
    try:
        img = reader.Execute()
    except RuntimeError as err:
        raise DicomSeriesError(f"{info.folder}: the DICOM slices cannot be decoded ({str(err).strip()[-200:]}). "
                               "Re-export the series (uncompressed or a common transfer syntax).") from err
    if img.GetDimension() == 3 and len(info.files) > 1:  # the checked geometry, not the reader's estimate
        img.SetSpacing(info.spacing)
        img.SetOrigin(info.origin)
        img.SetDirection(info.direction)
    return img


@keeps_locale
def series_files(folder: str | os.PathLike[str]) -> tuple[str, ...]:
    """The slice files of the folder's series in the order of the volume's first array axis."""
    return inspect_series(folder).files
