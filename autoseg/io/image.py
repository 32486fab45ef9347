"""Image readers and writers that keep geometry exactly.

Arrays use numpy axis order: ``(z, y, x)`` for 3D and ``(y, x)`` for 2D, channels first. Geometry is kept
as the file states it, in ITK's physical order ``(x, y[, z])`` (the ``array_spacing`` property gives the
spacing in array-axis order). Reading and then writing a file gives back the same spacing, origin and
direction bit for bit.

Every format goes through SimpleITK (NIfTI, NRRD, MHA/MHD, PNG, TIFF, ...), so one code path handles the
geometry of all of them. A folder is a DICOM series (:mod:`autoseg.io.dicom`): every reader here takes one
wherever it takes an image file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from autoseg.errors import ImageReadError, ImageWriteError, describe_os_error
from autoseg.io.atomic import atomic_path
from autoseg.io.dicom import inspect_series, is_series_path, read_series, split_series_path
from autoseg.io.nifti_length import nifti_lengths

#: File endings autoseg reads and writes, longest first so that ``.nii.gz`` wins over ``.gz``.
SUPPORTED_ENDINGS: tuple[str, ...] = (
    ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff", ".bmp", ".gipl",
)
#: Endings of 2D natural-image formats (no physical spacing stored).
IMAGE_2D_ENDINGS: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Geometry:
    """Physical placement of an image, as stored in its file (ITK order ``x, y[, z]``)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major ndim x ndim matrix, flattened

    @property
    def ndim(self) -> int:
        return len(self.spacing)

    @property
    def array_spacing(self) -> tuple[float, ...]:
        """Spacing in numpy axis order (``z, y, x``)."""
        return tuple(reversed(self.spacing))

    @classmethod
    def identity(cls, ndim: int, spacing: tuple[float, ...] | None = None) -> Geometry:
        """Unit geometry; ``spacing`` is given in ITK order (``x, y[, z]``)."""
        sp = tuple(float(s) for s in (spacing or (1.0,) * ndim))
        eye = tuple(float(v) for v in np.eye(ndim).ravel())
        return cls(spacing=sp, origin=(0.0,) * ndim, direction=eye)

    @classmethod
    def from_array_spacing(cls, array_spacing: tuple[float, ...]) -> Geometry:
        """Unit origin and direction with spacing given in numpy axis order."""
        return cls.identity(len(array_spacing), tuple(reversed([float(s) for s in array_spacing])))

    def differences(self, other: Geometry, *, spacing_rtol: float = 1e-4,
                    origin_atol: float | None = None, direction_atol: float = 1e-4) -> list[str]:
        """Name each geometric property in which ``other`` differs from this geometry.

        The origin tolerance defaults to 1 % of the smallest spacing, which absorbs the rounding of
        text headers (NRRD, MHD) but not a shifted image.
        """
        if self.ndim != other.ndim:
            return [f"dimensionality {self.ndim}D vs {other.ndim}D"]
        out = []
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=1e-6):
            out.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        tol = origin_atol if origin_atol is not None else 0.01 * min(self.spacing)
        if not np.allclose(self.origin, other.origin, rtol=0, atol=tol):
            out.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=direction_atol):
            out.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return out

    def to_json(self) -> dict[str, list[float]]:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Geometry:
        return cls(tuple(map(float, d["spacing"])), tuple(map(float, d["origin"])),
                   tuple(map(float, d["direction"])))


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without loading the voxels."""

    path: Path
    geometry: Geometry
    shape: tuple[int, ...]  # spatial shape in numpy order
    n_components: int  # values per voxel (3 for RGB, n for vector images)
    pixel_type: str


@dataclass
class Image:
    """Voxels plus geometry. ``array`` is ``(C, *spatial)`` for images, ``spatial`` for label maps."""

    array: np.ndarray
    geometry: Geometry


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def file_ending(path: str | os.PathLike[str]) -> str:
    """The file's ending among :data:`SUPPORTED_ENDINGS` (lower case), or its last suffix."""
    name = Path(path).name.lower()
    for ending in SUPPORTED_ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


def image_stamp(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(bytes, latest modification ns)`` of an image file or of a DICOM series folder's files; None when absent
    (for telling whether an input changed)."""
    path = Path(path)
    if is_series_path(path):
        folder = (split_series_path(path) or (path, None))[0]
        stats = [p.stat() for p in folder.iterdir() if p.is_file()]
        return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=-1)
    if not path.exists():
        return None
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _check_readable(path: Path) -> None:
    if is_series_path(path):
        return
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found. Check the path and the dataset's file_ending.")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: the file is empty (0 bytes). Re-export or re-copy it.")
    if file_ending(path) not in SUPPORTED_ENDINGS:
        raise ImageReadError(
            f"{path}: unsupported file type '{file_ending(path)}'. Supported: {', '.join(SUPPORTED_ENDINGS)}."
        )


def _sitk_read(path: Path) -> sitk.Image:
    if is_series_path(path):
        return read_series(path)
    _check_readable(path)
    if file_ending(path) in (".nii", ".nii.gz"):
        sizes = nifti_lengths(path)
        if sizes is not None and sizes[1] < sizes[0]:
            raise ImageReadError(
                f"{path}: the file is truncated (its header needs {sizes[0]} bytes of data, it holds "
                f"{sizes[1]}). Re-download, re-export or re-copy it."
            )
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unknown error"
        raise ImageReadError(
            f"{path}: cannot be read as an image ({first}). The file may be truncated or not an image; "
            "re-export or re-copy it."
        ) from err


def _geometry_of(img: sitk.Image) -> Geometry:
    return Geometry(tuple(float(s) for s in img.GetSpacing()), tuple(float(o) for o in img.GetOrigin()),
                    tuple(float(d) for d in img.GetDirection()))


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read geometry, shape and pixel type without loading the voxels (of a DICOM series: the slice headers).

    Raises:
        ImageReadError: the file is missing, empty, of an unsupported type or unreadable.
    """
    path = Path(path)
    if is_series_path(path):
        info = inspect_series(path)
        return ImageHeader(path=path, geometry=Geometry(info.spacing, info.origin, info.direction),
                           shape=tuple(int(s) for s in reversed(info.size)), n_components=info.n_components,
                           pixel_type=sitk.GetPixelIDValueAsString(info.pixel_id))
    _check_readable(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise ImageReadError(f"{path}: header cannot be read ({str(err).strip().splitlines()[-1]}). "
                             "The file may be truncated or not an image; re-export or re-copy it.") from err
    size = reader.GetSize()
    geometry = Geometry(tuple(map(float, reader.GetSpacing())), tuple(map(float, reader.GetOrigin())),
                        tuple(map(float, reader.GetDirection())))
    return ImageHeader(path=path, geometry=geometry, shape=tuple(int(s) for s in reversed(size)),
                       n_components=int(reader.GetNumberOfComponents()),
                       pixel_type=sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def read_image(path: str | os.PathLike[str], *, dtype: Any = np.float32) -> Image:
    """Read an image file as ``(C, *spatial)`` plus geometry.

    A scalar file gives one channel; RGB or vector pixels give one channel per component. A 4D file
    (time or channel as the 4th axis, as in the Medical Segmentation Decathlon) gives one channel per
    3D volume, with the geometry of the first three axes.

    Args:
        path: the image file (.nii/.nii.gz/.nrrd/.mha/.mhd/.png/.tif/...), or a folder holding one DICOM series.
        dtype: numpy dtype of the returned array (float32 by default; ``None`` keeps the file's type;
            ``"compact"`` keeps it when it is compact, see :func:`compact_dtype`, e.g. int16 CT stays int16).

    Returns:
        The image; ``image.geometry`` holds spacing, origin and direction as stored in the file.

    Raises:
        ImageReadError: missing, empty, unsupported or unreadable file.

    Example:
        >>> img = read_image("imagesTr/case_0000.nii.gz")  # doctest: +SKIP
        >>> img.array.shape, img.geometry.array_spacing  # doctest: +SKIP
    """
    img = _sitk_read(Path(path))
    view = sitk.GetArrayViewFromImage(img)  # ITK's buffer: copied once below, straight into the wanted type
    geometry = _geometry_of(img)
    if img.GetNumberOfComponentsPerPixel() > 1:
        view = np.moveaxis(view, -1, 0)
    elif img.GetDimension() == 4:
        geometry = Geometry(geometry.spacing[:3], geometry.origin[:3],
                            tuple(float(d) for d in np.asarray(geometry.direction).reshape(4, 4)[:3, :3].ravel()))
    else:
        view = view[None]
    if dtype is None:
        target = view.dtype
    elif isinstance(dtype, str) and dtype == "compact":
        target = compact_dtype(view.dtype)
    else:
        target = np.dtype(dtype)
    arr = np.array(view, dtype=target, order="C")
    del view, img
    return Image(array=arr, geometry=geometry)


#: value types images keep when read for preprocessing (at most 2 bytes per voxel, or float32)
COMPACT_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.float32))


def compact_dtype(*dtypes: Any) -> np.dtype:
    """The common type of arrays of these types if it is compact (8/16-bit integers, float32), else float32.

    Preprocessing reads images in such a type and normalises them into float32 itself: an int16 CT volume
    is then held as 2 bytes per voxel until normalisation, not 4 (the values are the same either way).

    Example:
        >>> compact_dtype(np.int16), compact_dtype(np.int16, np.uint16), compact_dtype(np.float64)
        (dtype('int16'), dtype('float32'), dtype('float32'))
    """
    common = np.result_type(*dtypes)
    return common if common in COMPACT_DTYPES else np.dtype(np.float32)


def read_label(path: str | os.PathLike[str]) -> Image:
    """Read a label map as a spatial array (no channel axis), keeping the file's value type.

    Raises:
        ImageReadError: missing, unreadable, or a file with more than one value per voxel.
    """
    path = Path(path)
    img = _sitk_read(path)
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise ImageReadError(
            f"{path}: a label map must have one value per voxel, found {img.GetNumberOfComponentsPerPixel()} "
            "(an RGB or vector image). Save the labels as a single-channel integer image."
        )
    return Image(array=sitk.GetArrayFromImage(img), geometry=_geometry_of(img))


def _to_sitk(array: np.ndarray, geometry: Geometry, path: Path) -> sitk.Image:
    ndim = geometry.ndim
    if array.ndim == ndim + 1 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == ndim + 1:  # several channels: a vector image
        img = sitk.GetImageFromArray(np.moveaxis(array, 0, -1), isVector=True)
    elif array.ndim == ndim:
        img = sitk.GetImageFromArray(array)
    else:
        raise ImageWriteError(
            f"{path}: array of shape {array.shape} does not fit a {ndim}D geometry; pass (C, *spatial) "
            "or spatial arrays."
        )
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(geometry.direction)
    return img


def write_image(path: str | os.PathLike[str], array: np.ndarray, geometry: Geometry, *,
                compress: bool = True) -> None:
    """Write ``array`` (``(C, *spatial)`` or spatial) with ``geometry`` atomically.

    The format follows the file ending. The file appears only once it is complete.

    Raises:
        ImageWriteError: shape and geometry disagree, or the file cannot be written.
    """
    path = Path(path)
    img = _to_sitk(np.asarray(array), geometry, path)
    try:
        with atomic_path(path) as tmp:
            sitk.WriteImage(img, str(tmp), useCompression=compress and file_ending(path) != ".png")
            if shortfall := _write_shortfall(tmp, img):  # never renamed to ``path``: a rerun redoes it
                raise ImageWriteError(f"{path}: written incompletely ({shortfall}): the disk is probably full, or a "
                                      "quota or file-size limit was reached. Free space and rerun.")
    except ImageWriteError:
        raise
    except (RuntimeError, OSError) as err:
        reason = describe_os_error(err) if isinstance(err, OSError) else None
        detail = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__  # ITK: last line
        raise ImageWriteError(reason or f"{path}: cannot be written ({detail}). Check the folder exists, is "
                              "writable and has free space.") from err


def _write_shortfall(path: Path, img: sitk.Image) -> str | None:
    """What is missing from a file just written, or None. ITK's NIfTI, GIPL and BMP writers ignore failed
    writes (a full disk leaves a truncated file and no error), so their files are measured."""
    ending = file_ending(path)
    if ending in (".nii", ".nii.gz"):
        sizes = nifti_lengths(path)
        if sizes is None:  # nibabel cannot measure it: ITK must at least read its header back
            try:
                read_header(path)
            except ImageReadError:
                return "its header cannot be read back"
            return None
        needed, present = sizes
    elif ending in (".gipl", ".bmp"):
        needed, present = sitk.GetArrayViewFromImage(img).nbytes, path.stat().st_size
    else:  # the other writers raise on a failed write
        return None
    return None if present >= needed else f"{present} of {needed} data bytes"


def is_complete_image(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a whole image file: not empty, its header reads and, for NIfTI, every voxel byte
    is there (a ``.nii.gz`` is checked from its gzip trailer, without decompressing it when that agrees).

    For skipping finished outputs: a file cut short (a crash without sync, a full disk) is not taken for one.
    """
    path = Path(path)
    try:
        if file_ending(path) in (".nii", ".nii.gz"):
            _check_readable(path)
            sizes = nifti_lengths(path)
            return sizes is not None and sizes[1] >= sizes[0]
        read_header(path)
    except ImageReadError:
        return False
    return True


def label_dtype(max_label: int) -> type[np.integer]:
    """Smallest unsigned type that holds ``max_label``: uint8, else uint16."""
    if max_label < 0:
        raise ImageWriteError(f"negative label {max_label} cannot be written; labels start at 0.")
    return np.uint8 if max_label < 256 else np.uint16


def write_label(path: str | os.PathLike[str], seg: np.ndarray, geometry: Geometry) -> None:
    """Write a label map as uint8 (uint16 when a label is >= 256) with ``geometry`` atomically."""
    seg = np.asarray(seg)
    top = int(seg.max()) if seg.size else 0
    low = int(seg.min()) if seg.size else 0
    write_image(path, seg.astype(label_dtype(max(top, 0) if low >= 0 else low), copy=False), geometry)


def is_2d_image_file(path: str | os.PathLike[str]) -> bool:
    """True for natural-image endings (PNG, BMP, TIFF), which store no physical spacing."""
    return file_ending(path) in IMAGE_2D_ENDINGS


def spacing_is_valid(spacing: tuple[float, ...]) -> bool:
    """True when every spacing value is finite and positive."""
    return all(math.isfinite(s) and s > 0 for s in spacing)
