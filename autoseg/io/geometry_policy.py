"""The geometry policy of the integrity check: how far a header mismatch moves the voxels decides its severity.

A channel and its label hold the same voxel grid (same shape and spacing) but their headers may place it
differently in space (origin, direction). What matters is how far that moves a voxel: the mapping from voxel
index to millimetres is affine, so the largest move is found at one of the grid's corners. A move of more than
half a voxel along any axis means the label no longer covers the voxels it was drawn on (a label shifted by
10 mm, or flipped on one axis): that is an error, since training would learn from misaligned labels. A smaller
move is header rounding (a warning). ``allow_mismatch`` turns the errors back into warnings (``autoseg plan
--allow-geometry-mismatch``, recorded in the plans); ``strict`` makes every mismatch an error.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.io.check_report import Problem, error, warning
from autoseg.io.image import Geometry

#: a header mismatch that moves some voxel by more than this fraction of its size (along any axis) is an error
MAX_VOXEL_SHIFT = 0.5

_FLAG = "--allow-geometry-mismatch"


@dataclass(frozen=True)
class Displacement:
    """The largest move of a voxel between two placements of one grid."""

    mm: float  # Euclidean length of the largest move, in millimetres
    voxels: float  # largest move along one axis of the reference grid, in voxels


def voxel_displacement(moved: Geometry, ref: Geometry, shape: tuple[int, ...]) -> Displacement:
    """How far the voxels of a grid move when placed by ``moved``'s header instead of ``ref``'s.

    Args:
        moved: geometry of one file.
        ref: geometry of the reference file (the label); same dimensionality and spacing.
        shape: the grid's spatial shape in numpy order (``z, y, x``).

    Returns:
        The largest move over the grid (found at a corner) in mm and in reference voxels.

    Example:
        >>> a = Geometry.identity(3, (2.0, 2.0, 2.0))
        >>> b = Geometry((2.0, 2.0, 2.0), (10.0, 0.0, 0.0), a.direction)
        >>> voxel_displacement(b, a, (4, 4, 4))
        Displacement(mm=10.0, voxels=5.0)
    """
    n = ref.ndim
    d_ref = np.asarray(ref.direction, dtype=float).reshape(n, n) * np.asarray(ref.spacing, dtype=float)
    d_mov = np.asarray(moved.direction, dtype=float).reshape(n, n) * np.asarray(moved.spacing, dtype=float)
    extent = [max(s - 1, 0) for s in reversed(shape[-n:])]  # ITK index order (x, y, z)
    corners = np.array(list(itertools.product(*[(0, e) for e in extent])), dtype=float).T  # (n, 2**n)
    delta = (np.asarray(moved.origin) - np.asarray(ref.origin))[:, None] + (d_mov - d_ref) @ corners
    in_voxels = np.linalg.solve(d_ref, delta)  # the move in the reference grid's index units
    return Displacement(mm=float(np.linalg.norm(delta, axis=0).max()), voxels=float(np.abs(in_voxels).max()))


def geometry_problem(case_id: str, path: Path, diff: str, ref_name: str, displacement: Displacement, *,
                     strict: bool, allow_mismatch: bool) -> Problem:
    """The problem for an origin/direction difference between a file and the case's reference file.

    Args:
        case_id: the case.
        path: the file whose header differs.
        diff: the difference with both values (from :meth:`Geometry.differences`).
        ref_name: what the file is compared with (``the label``).
        displacement: how far the difference moves the voxels.
        strict: every difference is an error.
        allow_mismatch: differences beyond half a voxel are warnings (the user chose to proceed).

    Returns:
        An error when the voxels move by more than half their size (unless allowed) or with ``strict``,
        else a warning.
    """
    large = displacement.voxels > MAX_VOXEL_SHIFT
    moved = f"moves voxels by up to {displacement.mm:.3g} mm ({displacement.voxels:.3g} voxels)"
    message = f"{diff} (this file vs {ref_name}): {moved}"
    if large and not allow_mismatch:
        return error("geometry", case_id, path, f"{message}, more than half a voxel, so the label does not lie on "
                     "the voxels it was drawn on",
                     "if image and label are truly aligned, copy the label's origin/direction into the image "
                     "header (SimpleITK CopyInformation); otherwise re-export or resample the label onto the "
                     f"image's grid; or pass {_FLAG} to train on them as they are (recorded in the plans)")
    fix = ("proceeding as asked; fix the headers (or resample the label onto the image's grid) to train on aligned "
           "data" if large else "header rounding: copy the label's origin/direction into the image header if "
           "they should be equal")
    return (error if strict else warning)("geometry", case_id, path, message, fix)
