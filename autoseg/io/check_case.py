"""One case of the dataset integrity check: its files read once and checked (:func:`check_case`).

Every problem of the case is collected: missing or unreadable files, geometry that differs between the case's
channels and its label, undeclared label values, NaN/inf voxels, wrong dimensionality and empty labels. The
problems across cases (duplicates, mixed dimensionality, absent classes) are :mod:`autoseg.io.check`'s.

Speed: every file is opened once for its header (cheap; it reveals 4D files, RGB pixels and bad spacing
before any voxel is decoded) and once for its voxels. Images are checked in their stored type (only float
images can hold NaN); duplicates are found from a SHA-1 of the (compressed) file bytes; labels are counted
with a chunked ``np.bincount`` (binary masks need only their min and max).

SimpleITK (ITK 5) reads NaN/inf in float NIfTI files as 0, so they never reach training and the loaded voxels
cannot show them; the check scans such files' bytes a second time (only float NIfTI files holding zeros, where
one can hide) and warns, since training then sees 0 there. NaN/inf that reach the voxels (NRRD, MHA) are errors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import DicomSeriesError
from autoseg.io.check_report import Problem, error, problem_text, warning
from autoseg.io.check_values import check_label_values, nifti_nonfinite
from autoseg.io.dataset import CaseFiles, DatasetSpec
from autoseg.io.dicom import is_series_path
from autoseg.io.geometry_policy import geometry_problem, voxel_displacement
from autoseg.io.image import (
    Geometry,
    ImageHeader,
    compact_dtype,
    file_ending,
    read_header,
    read_image,
    read_label,
    spacing_is_valid,
)

_REEXPORT = "re-export or re-copy the file"


@dataclass
class CaseData:
    """The arrays of a case that was read without errors (handed on to the fingerprint)."""

    images: np.ndarray  # (C, *spatial) in the files' type when compact (e.g. int16 CT), else float32
    label: np.ndarray | None  # integer spatial array (int16, or wider when a label needs it)
    geometry: Geometry  # of the first channel file


@dataclass
class CaseCheck:
    """The result of checking one case."""

    case_id: str
    problems: list[Problem]
    image_hash: str | None  # hash of all channels' voxels (duplicate detection); None when a channel is unreadable
    data: CaseData | None = None  # only with keep_arrays=True and no error in the case
    labels_present: tuple[int, ...] | None = None  # label values in the label file; None when not read
    ndim: int | None = None  # spatial dimensions of the label (else of the first channel)


@dataclass
class _Loaded:
    path: Path
    array: np.ndarray  # (C, *spatial) for channels, spatial for labels, in the file's stored type
    geometry: Geometry


def _unreadable(case_id: str, path: Path, exc: Exception) -> Problem:
    """The problem of a file that cannot be read; a refused DICOM series carries its own fix."""
    text = problem_text(exc, path)
    if isinstance(exc, DicomSeriesError):
        what, _, fix = text.partition(" Fix: ")
        return error("dicom_series", case_id, path, what, fix or "see the message")
    return error("unreadable", case_id, path, text, _REEXPORT)


def _header(case_id: str, path: Path, probs: list[Problem]) -> ImageHeader | None:
    try:
        hdr = read_header(path)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure to parse a file makes it unreadable
        probs.append(_unreadable(case_id, path, exc))
        return None
    if not spacing_is_valid(hdr.geometry.spacing):
        probs.append(error("spacing", case_id, path, f"invalid voxel spacing {hdr.geometry.spacing} in the header; "
                           "every spacing must be a positive number", "write the true voxel size into the header "
                           "(e.g. SimpleITK SetSpacing) and save the file again"))
        return None
    if len(hdr.shape) not in (2, 3):
        probs.append(error("dimensionality", case_id, path, f"the file is {len(hdr.shape)}D (shape {hdr.shape}); "
                           "a 2D or 3D image is expected", "save one 2D/3D volume per file (one file per channel); "
                           "for a Decathlon 4D image run `autoseg convert-msd`"))
        return None
    return hdr


def _voxels(case_id: str, path: Path, probs: list[Problem], *, label: bool) -> _Loaded | None:
    try:
        img = read_label(path) if label else read_image(path, dtype=None)
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt files fail in many ways
        probs.append(_unreadable(case_id, path, exc))
        return None
    return _Loaded(path, img.array, img.geometry)


def _read_channels(case: CaseFiles, spec: DatasetSpec, probs: list[Problem]) -> tuple[list[_Loaded], bool]:
    """Read the channel files. Returns the loaded files and whether every channel was read.

    An RGB/vector ``_0000`` file may hold all channels when the other channel files are absent (nnU-Net's
    convention for RGB PNGs).
    """
    cid, n = case.case_id, spec.n_channels
    exists = [p.exists() or is_series_path(p) for p in case.images]  # a file, or a DICOM series (folder/UID)
    loaded: list[_Loaded] = []
    packed = False
    for i, (p, present) in enumerate(zip(case.images, exists, strict=True)):
        if not present:
            continue
        hdr = _header(cid, p, probs)
        if hdr is None:
            continue
        k = hdr.n_components
        if k > 1:
            if i == 0 and k == n and not any(exists[1:]):
                packed = True
            else:
                fix = (f"save it as a single-channel (grayscale) image, or declare {k} channels in channel_names "
                       f"and keep only the _0000 file" if i == 0 and not any(exists[1:]) else
                       "save one single-channel file per channel (CASE_0000, CASE_0001, ...)")
                probs.append(error("channels", cid, p, f"the file holds {k} values per voxel (RGB or vector pixels) "
                                   f"but dataset.json declares {n} channel(s), one file each", fix))
                continue
        item = _voxels(cid, p, probs, label=False)
        if item is not None:
            loaded.append(item)
    if not packed:
        missing = [p for p, present in zip(case.images, exists, strict=True) if not present]
        for p in missing:
            probs.append(error("missing_channel", cid, p, f"channel file {p.name} is missing ({n - len(missing)} of "
                               f"{n} channel files present)",
                               f"add {p.name}, or correct channel_names in dataset.json"))
    return loaded, len(loaded) == (1 if packed else n)


def _read_label_file(case: CaseFiles, probs: list[Problem]) -> _Loaded | None:
    cid, path = case.case_id, case.label
    if path is None or not path.is_file():
        name = path.name if path is not None else f"{cid}<file_ending>"
        probs.append(error("missing_label", cid, path, f"label file {name} is missing",
                           "add the label map to labelsTr/ (the case id without channel suffix), or remove the "
                           "case's images"))
        return None
    hdr = _header(cid, path, probs)
    if hdr is None:
        return None
    if hdr.n_components > 1:
        probs.append(error("label_components", cid, path, f"the label map holds {hdr.n_components} values per voxel "
                           "(an RGB or vector image)", "save labels as a single-channel integer image"))
        return None
    return _voxels(cid, path, probs, label=True)


def _hash_files(paths: Sequence[Path]) -> str:
    """SHA-1 of the channel files' bytes: a copied case has identical bytes, and hashing the (usually
    compressed) file is about 3x faster than hashing the decoded voxels (measured on float32 NIfTI)."""
    h = hashlib.sha1()
    for path in paths:
        for file in sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]:  # DICOM: every slice
            with file.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def _check_finite(case_id: str, item: _Loaded, probs: list[Problem], scan_nifti: bool) -> bool:
    """Report NaN/inf voxels of a float file; True when there are none."""
    arr = item.array
    if arr.dtype.kind not in "fc":
        return True  # integer images cannot hold NaN or inf
    finite = np.isfinite(arr)
    n_nan = n_inf = 0
    if not finite.all():
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = int(finite.size - np.count_nonzero(finite)) - n_nan
    elif scan_nifti and file_ending(item.path) in (".nii", ".nii.gz") and not arr.all():
        n_nan, n_inf = nifti_nonfinite(item.path)  # SimpleITK reads them as 0: only a zero can hide one
        if n_nan + n_inf:
            probs.append(warning("nan_inf", case_id, item.path, f"{n_nan} NaN and {n_inf} inf voxels (of "
                                 f"{finite.size}) stored in the file; they are read as 0",
                                 "fine if 0 suits those voxels (e.g. outside the body); otherwise replace them, "
                                 "e.g. np.nan_to_num(image, nan=VALUE), and save again"))
        return True
    if n_nan + n_inf == 0:
        return True
    probs.append(error("nan_inf", case_id, item.path, f"{n_nan} NaN and {n_inf} inf voxels (of {finite.size})",
                       "replace them before training, e.g. np.nan_to_num(image, nan=0.0), and save again"))
    return False


def _check_geometry(case_id: str, item: _Loaded, ref: _Loaded, ref_name: str, policy: tuple[bool, bool],
                    probs: list[Problem]) -> None:
    """Shape and spacing differences are errors; origin/direction ones follow the geometry policy
    (``policy`` = ``(strict, allow_mismatch)``, :mod:`autoseg.io.geometry_policy`)."""
    shape, ref_shape = item.array.shape[-item.geometry.ndim:], ref.array.shape[-ref.geometry.ndim:]
    if item.geometry.ndim != ref.geometry.ndim:
        probs.append(error("dimensionality", case_id, item.path, f"{item.geometry.ndim}D image (shape {shape}) but "
                           f"{ref_name} is {ref.geometry.ndim}D (shape {ref_shape})",
                           "save every channel and the label with the same number of dimensions"))
        return
    if shape != ref_shape:
        probs.append(error("shape", case_id, item.path, f"shape {shape} differs from {ref_name}'s shape {ref_shape}",
                           "resample or crop so that every channel and the label share one voxel grid"))
    diffs = item.geometry.differences(ref.geometry)
    for diff in diffs:
        if diff.startswith("spacing"):
            probs.append(error("geometry", case_id, item.path, f"{diff} (this file vs {ref_name})",
                               "resample the file onto the label's grid, or correct the spacing in its header"))
    if any(d.startswith("spacing") for d in diffs) or shape != ref_shape:
        diffs = [d for d in diffs if not d.startswith("spacing")]
        shift = None  # the grids differ: how far a voxel moves is not defined
    else:
        shift = voxel_displacement(item.geometry, ref.geometry, ref_shape)
    for diff in diffs:
        if shift is None:
            probs.append(warning("geometry", case_id, item.path, f"{diff} (this file vs {ref_name})",
                                 "fix the grid first (see the error above)"))
        else:
            probs.append(geometry_problem(case_id, item.path, diff, ref_name, shift, strict=policy[0],
                                          allow_mismatch=policy[1]))


def check_case(case: CaseFiles, spec: DatasetSpec, *, keep_arrays: bool = False,
               strict_geometry: bool = False, allow_geometry_mismatch: bool = False,
               scan_nifti_nan: bool = True) -> CaseCheck:
    """Read one case and check it.

    Checks: files present and readable; 2D/3D files with positive spacing; channels and label share shape,
    spacing (errors), origin and direction (errors when they move a voxel by more than half its size, see
    :mod:`autoseg.io.geometry_policy`, else warnings); no NaN/inf; label values
    whole, non-negative and declared in dataset.json; a label with foreground (warning otherwise).

    Args:
        case: the case's files.
        spec: the parsed dataset.json.
        keep_arrays: keep the loaded arrays in ``CaseCheck.data`` (only when the case has no error).
        strict_geometry: every origin/direction mismatch is an error, even one under half a voxel.
        allow_geometry_mismatch: origin/direction mismatches beyond half a voxel are warnings, not errors.
        scan_nifti_nan: find NaN/inf in float NIfTI files, which SimpleITK reads as 0 (a warning); this
            decompresses float files holding zeros a second time (about 1.4x their read time).

    Returns:
        The case's problems, a hash of its voxels (for duplicate detection) and optionally its arrays.

    Example:
        >>> ds = load_dataset("Dataset001_X")  # doctest: +SKIP
        >>> check_case(ds.cases[0], ds.spec).problems  # doctest: +SKIP
    """
    cid = case.case_id
    probs: list[Problem] = []
    if not any(p.exists() or is_series_path(p) for p in case.images) and (case.label is None or not case.label.is_file()):
        names = ", ".join(p.name for p in case.images + ((case.label,) if case.label else ()))
        probs.append(error("missing_case", cid, case.images[0] if case.images else case.label,
                           f"none of the case's files exists ({names})",
                           "add the files, or remove the case from dataset.json"))
        return CaseCheck(cid, probs, None)
    if len(case.images) != spec.n_channels:
        probs.append(error("channels", cid, case.images[0] if case.images else None, f"the case lists "
                           f"{len(case.images)} image files but dataset.json declares {spec.n_channels} channel(s)",
                           "list one image file per channel in dataset.json's 'dataset' entry"))
    channels, all_channels = _read_channels(case, spec, probs)
    label = _read_label_file(case, probs)
    ref, ref_name = (label, "the label") if label is not None else (
        (channels[0], channels[0].path.name) if channels else (None, ""))
    for item in channels:
        _check_finite(cid, item, probs, scan_nifti_nan)
        if ref is not None and item is not ref:
            _check_geometry(cid, item, ref, ref_name, (strict_geometry, allow_geometry_mismatch), probs)
    seg, present = None, None
    if label is not None:
        if _check_finite(cid, label, probs, scan_nifti_nan):
            seg, present, label_probs = check_label_values(cid, label.path, label.array, spec, keep=keep_arrays)
            probs.extend(label_probs)
    data = None
    if keep_arrays and all_channels and not any(p.is_error for p in probs):
        images = np.concatenate([c.array for c in channels]) if len(channels) > 1 else channels[0].array
        data = CaseData(images.astype(compact_dtype(images.dtype), copy=False), seg, channels[0].geometry)
    return CaseCheck(cid, probs, _hash_files([c.path for c in channels]) if all_channels else None, data, present,
                     ref.geometry.ndim if ref is not None else None)
