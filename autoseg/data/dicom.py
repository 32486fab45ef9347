"""Write an image as a DICOM series (one file per slice), for tests, demos and trying the DICOM route.

The series carries what readers and DICOM-SEG writers need (patient, study, series and frame-of-reference
identifiers, slice position and orientation, pixel spacing) and nothing clinical. ``positions`` and
``orientations`` override the slice geometry, to build broken series (gantry tilt, gaps) on purpose.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.io.dicom import keeps_locale
from autoseg.io.image import Geometry

#: a private UID root for generated series (2.25: UUID-derived UIDs need no registration)
_UID_ROOT = "2.25."


def _uid(seed: int, part: int) -> str:
    rng = np.random.default_rng([seed, part])
    return _UID_ROOT + str(int.from_bytes(rng.bytes(15), "big"))


def slice_positions(geometry: Geometry, n_slices: int) -> np.ndarray:
    """``(n_slices, 3)`` ImagePositionPatient of each slice of a regular volume with ``geometry``."""
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    return np.asarray(geometry.origin) + np.outer(np.arange(n_slices) * geometry.spacing[2], d[:, 2])


@keeps_locale
def write_dicom_series(folder: str | os.PathLike[str], array: np.ndarray, geometry: Geometry, *, seed: int = 0,
                       modality: str = "CT", description: str = "autoseg synthetic",
                       positions: Sequence[Sequence[float]] | None = None,
                       orientations: Sequence[Sequence[float]] | None = None, prefix: str = "slice") -> list[Path]:
    """Write a ``(z, y, x)`` int16 array as one DICOM file per slice into ``folder``.

    Args:
        folder: created if needed; files are ``<prefix>_0000.dcm`` ...
        array: the voxels (cast to int16).
        geometry: spacing, origin and direction of the volume (ITK order).
        seed: chooses the study, series and frame-of-reference UIDs (the same seed gives one study).
        positions: per slice ImagePositionPatient (default: from ``geometry``).
        orientations: per slice ImageOrientationPatient (default: the first two direction columns).

    Returns:
        The files written, in slice order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = np.asarray(geometry.direction, np.float64).reshape(3, 3)
    iop = [*d[:, 0], *d[:, 1]]
    ipps = slice_positions(geometry, array.shape[0]) if positions is None else np.asarray(positions, np.float64)
    common = {"0010|0010": "Synthetic^Phantom", "0010|0020": f"SYN{seed:04d}", "0010|0030": "", "0010|0040": "O",
              "0008|0020": "20240101", "0008|0030": "120000", "0008|0050": f"ACC{seed:04d}",
              "0008|0090": "", "0020|0010": "1", "0008|0060": modality, "0008|103e": description,
              "0020|000d": _uid(seed, 1), "0020|000e": _uid(seed, 2 + zlib.crc32(description.encode())),
              "0020|0052": _uid(seed, 3), "0020|0011": "1", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
              "0018|0050": f"{geometry.spacing[2]:.6g}", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL"}
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for z in range(array.shape[0]):
        img = sitk.GetImageFromArray(np.asarray(array[z], np.int16)[None])
        img.SetSpacing((geometry.spacing[0], geometry.spacing[1], geometry.spacing[2]))
        for key, value in common.items():
            img.SetMetaData(key, value)
        orient = iop if orientations is None else list(orientations[z])
        img.SetMetaData("0020|0037", "\\".join(f"{v:.9g}" for v in orient))
        img.SetMetaData("0020|0032", "\\".join(f"{v:.9g}" for v in ipps[z]))
        img.SetMetaData("0020|0013", str(z + 1))
        img.SetMetaData("0008|0018", f"{common['0020|000e']}.{z + 1}")
        img.SetMetaData("0028|0030", f"{geometry.spacing[1]:.9g}\\{geometry.spacing[0]:.9g}")
        path = folder / f"{prefix}_{z:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(img)
        paths.append(path)
    return paths
