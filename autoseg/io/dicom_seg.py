"""Write a label map as a DICOM Segmentation object (DICOM-SEG) that references its source series.

The label map must be on the source series' grid (what prediction writes for a DICOM input): its first array
axis follows the series' slices in position order (:func:`autoseg.io.dicom.series_files`). Each class or region
becomes one binary segment labelled with its dataset.json name and marked as produced automatically by the
named algorithm (name, version and the model's hash). Built with highdicom, an optional extra
(``pip install 'autoseg[dicom]'``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.errors import ImageWriteError, MissingDependencyError
from autoseg.io.atomic import atomic_path
from autoseg.io.dicom import series_files

MISSING_HIGHDICOM = ("DICOM-SEG output needs highdicom, which is not installed: pip install 'autoseg[dicom]' "
                     "(or pip install highdicom).")


@dataclass(frozen=True)
class Algorithm:
    """What produced a segmentation, as DICOM-SEG records it."""

    name: str
    version: str
    model_hash: str


def require_highdicom() -> Any:
    try:
        import highdicom
    except ImportError as err:
        raise MissingDependencyError(MISSING_HIGHDICOM) from err
    return highdicom


def segments_from_labels(labels: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """``(name, label values)`` per segment from dataset.json ``labels``: each class or region except background
    and ``ignore``, in dataset.json order."""
    out = []
    for name, value in labels.items():
        values = tuple(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
        if name != "ignore" and values != (0,):
            out.append((name, values))
    return out


def write_dicom_seg(path: str | os.PathLike[str], seg: np.ndarray, source: str | os.PathLike[str],
                    segments: Sequence[tuple[str, tuple[int, ...]]], algorithm: Algorithm) -> Path:
    """Write ``seg`` (``(z, y, x)`` on the source series' grid) as a binary DICOM-SEG file, atomically.

    Args:
        path: the file to write (``.dcm``).
        seg: the label map.
        source: the DICOM series folder the segmentation was made from.
        segments: ``(label name, label values)`` per segment (:func:`segments_from_labels`).
        algorithm: name, version and model hash recorded in every segment.

    Raises:
        MissingDependencyError: highdicom is not installed.
        ImageWriteError: the label map does not fit the series, or the file cannot be written.
    """
    hd = require_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path)
    sources = [pydicom.dcmread(f) for f in series_files(source)]
    grid = (len(sources), int(sources[0].Rows), int(sources[0].Columns))
    if tuple(seg.shape) != grid:
        raise ImageWriteError(f"{path}: the label map's shape {tuple(seg.shape)} is not the grid of the series "
                              f"{source} {grid}; DICOM-SEG needs the prediction on its source series' grid.")
    ident = hd.AlgorithmIdentificationSequence(name=algorithm.name, version=algorithm.version,
                                               family=codes.cid7162.ArtificialIntelligence,
                                               parameters={"model_sha256": algorithm.model_hash})
    descriptions = [hd.seg.SegmentDescription(
        segment_number=i, segment_label=name[:64], segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=ident) for i, (name, _) in enumerate(segments, start=1)]
    masks = np.stack([np.isin(seg, values) for _, values in segments], axis=-1).astype(np.uint8)
    obj = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="autoseg",
        manufacturer_model_name=algorithm.name[:64], software_versions=algorithm.version,
        device_serial_number=algorithm.model_hash[:16], content_label="AUTOSEG",
        content_description=f"{algorithm.name} {algorithm.version}"[:64], omit_empty_frames=False)
    try:
        with atomic_path(path) as tmp:
            obj.save_as(tmp)
    except OSError as err:
        raise ImageWriteError(f"{path}: cannot be written ({err}). Check the folder is writable and has "
                              "free space.") from err
    return path
