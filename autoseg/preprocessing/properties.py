"""What preprocessing did to a case, saved next to its arrays so export can undo it exactly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from autoseg.errors import FileFormatError
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.image import Geometry


@dataclass(frozen=True)
class CaseProperties:
    """Geometry bookkeeping of one preprocessed case.

    Spatial tuples named ``*_t`` are in the plans' transposed axis order; a 2D file gets a leading dummy
    axis first (so every case is handled as 3D internally).

    Attributes:
        case_id: the case.
        geometry: geometry of the input file (ITK order), reapplied at export.
        file_ndim: spatial dimensions of the input file (2 or 3).
        spacing_t: spacing before resampling.
        shape_before_crop_t: spatial shape before cropping.
        bbox_t: the crop, ``(start, stop)`` per axis.
        shape_after_crop_t: spatial shape after cropping (= before resampling).
        target_spacing_t: spacing after resampling.
        shape_after_resampling_t: spatial shape of the stored arrays.
        separate_axis: axis resampled separately (anisotropic data) or None.
        labels_present: label values in the stored label map (excluding -1); empty at inference.
        plan_hash: hash of the configuration and source files it was made from (reuse check).
    """

    case_id: str
    geometry: Geometry
    file_ndim: int
    spacing_t: tuple[float, ...]
    shape_before_crop_t: tuple[int, ...]
    bbox_t: tuple[tuple[int, int], ...]
    shape_after_crop_t: tuple[int, ...]
    target_spacing_t: tuple[float, ...]
    shape_after_resampling_t: tuple[int, ...]
    separate_axis: int | None = None
    labels_present: tuple[int, ...] = ()
    plan_hash: str = ""

    def to_json(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return {"case_id": self.case_id, "geometry": self.geometry.to_json(), "file_ndim": self.file_ndim,
                "spacing_t": list(self.spacing_t), "shape_before_crop_t": list(self.shape_before_crop_t),
                "bbox_t": [list(b) for b in self.bbox_t], "shape_after_crop_t": list(self.shape_after_crop_t),
                "target_spacing_t": list(self.target_spacing_t),
                "shape_after_resampling_t": list(self.shape_after_resampling_t),
                "separate_axis": self.separate_axis, "labels_present": list(self.labels_present),
                "plan_hash": self.plan_hash}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CaseProperties:
        """Inverse of :meth:`to_json`."""
        ints = lambda v: tuple(int(x) for x in v)  # noqa: E731
        floats = lambda v: tuple(float(x) for x in v)  # noqa: E731
        return cls(case_id=str(d["case_id"]), geometry=Geometry.from_json(d["geometry"]),
                   file_ndim=int(d["file_ndim"]), spacing_t=floats(d["spacing_t"]),
                   shape_before_crop_t=ints(d["shape_before_crop_t"]),
                   bbox_t=tuple((int(a), int(b)) for a, b in d["bbox_t"]),
                   shape_after_crop_t=ints(d["shape_after_crop_t"]), target_spacing_t=floats(d["target_spacing_t"]),
                   shape_after_resampling_t=ints(d["shape_after_resampling_t"]),
                   separate_axis=None if d.get("separate_axis") is None else int(d["separate_axis"]),
                   labels_present=ints(d.get("labels_present", ())), plan_hash=str(d.get("plan_hash", "")))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CaseProperties:
        """Read a saved properties file.

        Raises:
            FileFormatError: missing, unreadable or malformed (rerun preprocessing).
        """
        d = read_json(path, FileFormatError, "Delete it and rerun preprocessing (`autoseg preprocess`).")
        try:
            return cls.from_json(d)
        except (KeyError, TypeError, ValueError) as err:
            raise FileFormatError(f"{path}: malformed case properties ({err!r}); delete it and rerun "
                                  "preprocessing (`autoseg preprocess`).") from err
