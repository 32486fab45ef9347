"""The dataset fingerprint: what the planner needs to know about a dataset, saved as ``fingerprint.json``.

Conventions (shared with the planner):

* spacings and shapes are in numpy axis order (``z, y, x``);
* a 2D dataset is stored as 3D with a leading axis of size 1 and spacing :data:`DUMMY_2D_SPACING` times
  the largest in-plane spacing, so one set of rules plans 2D and 3D data (the dummy axis always has the
  largest spacing);
* intensity statistics are over the foreground voxels (label > 0, ignore label excluded), every case
  weighted equally, as nnU-Net does;
* each case also records its intensity percentiles :data:`DRIFT_PERCENTILES` per channel over the nonzero
  region (any channel != 0; the whole image when it is all zero), because a case to predict has no labels:
  :mod:`autoseg.fingerprint.drift` compares new inputs with these. Fingerprints written before this field
  existed load with it empty (the intensity drift check is then skipped).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from autoseg.errors import FileFormatError
from autoseg.io.atomic import read_json, write_json_atomic

FINGERPRINT_VERSION = 1
DUMMY_2D_SPACING = 999.0
#: intensity percentiles (in %) each case records over its nonzero region, for the drift check
DRIFT_PERCENTILES = (0.5, 50.0, 99.5)


@dataclass(frozen=True)
class IntensityStats:
    """Foreground intensity statistics of one channel over the whole dataset."""

    mean: float
    std: float
    median: float
    min: float
    max: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class CaseFingerprint:
    """Statistics of one training case."""

    case_id: str
    spacing: tuple[float, ...]
    shape: tuple[int, ...]
    shape_after_crop: tuple[int, ...]
    class_voxels: dict[int, int]  # label value -> voxels (background and ignore included)
    component_sizes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # fg label -> sizes, largest first
    #: per channel, the :data:`DRIFT_PERCENTILES` of the nonzero region (empty in older fingerprints)
    intensity_percentiles: tuple[tuple[float, float, float], ...] = ()

    @property
    def relative_size_after_cropping(self) -> float:
        return float(np.prod(self.shape_after_crop) / max(np.prod(self.shape), 1))


@dataclass(frozen=True)
class DatasetFingerprint:
    """Per-case and aggregate statistics of a dataset. ``cases`` are sorted by id."""

    dataset_name: str
    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    num_training: int
    is_2d: bool
    cases: tuple[CaseFingerprint, ...]
    intensity: tuple[IntensityStats, ...]  # one per channel
    version: int = FINGERPRINT_VERSION
    dataset_signature: str = ""  # names and sizes of the files it was computed from (no times: reproducible)

    # ---- aggregates -------------------------------------------------------------------------------
    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def shapes_after_crop(self) -> np.ndarray:
        return np.array([c.shape_after_crop for c in self.cases], dtype=float)

    @property
    def median_spacing(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.percentile(self.spacings, 50, axis=0))

    @property
    def median_shape_after_crop(self) -> tuple[float, ...]:
        return tuple(float(v) for v in np.percentile(self.shapes_after_crop, 50, axis=0))

    @property
    def median_relative_size_after_cropping(self) -> float:
        return float(np.median([c.relative_size_after_cropping for c in self.cases]))

    def summary(self) -> dict[str, Any]:
        """Aggregates people look at: spacing and shape percentiles, class frequencies, lesion counts."""
        sp, sh = self.spacings, self.shapes_after_crop
        voxels: dict[int, int] = {}
        cases_with: dict[int, int] = {}
        lesions: dict[int, list[int]] = {}
        for c in self.cases:
            for lab, n in c.class_voxels.items():
                voxels[lab] = voxels.get(lab, 0) + n
                cases_with[lab] = cases_with.get(lab, 0) + (n > 0)
            for lab, sizes in c.component_sizes.items():
                lesions.setdefault(lab, []).append(len(sizes))
        total = max(sum(voxels.values()), 1)
        return {
            "num_cases": len(self.cases),
            "spacing_median": [float(v) for v in np.median(sp, 0)],
            "spacing_p10": [float(v) for v in np.percentile(sp, 10, 0)],
            "spacing_p90": [float(v) for v in np.percentile(sp, 90, 0)],
            "shape_after_crop_median": [float(v) for v in np.median(sh, 0)],
            "shape_after_crop_min": [int(v) for v in sh.min(0)],
            "shape_after_crop_max": [int(v) for v in sh.max(0)],
            "median_relative_size_after_cropping": self.median_relative_size_after_cropping,
            "class_fraction": {str(k): voxels[k] / total for k in sorted(voxels)},
            "cases_containing_class": {str(k): cases_with[k] for k in sorted(cases_with)},
            "components_per_case_median": {str(k): float(np.median(v)) for k, v in sorted(lesions.items())},
        }

    # ---- JSON -------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cases"] = [
            {**asdict(c), "class_voxels": {str(k): v for k, v in c.class_voxels.items()},
             "component_sizes": {str(k): list(v) for k, v in c.component_sizes.items()}}
            for c in self.cases
        ]
        d["summary"] = self.summary()
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetFingerprint:
        if d.get("version") != FINGERPRINT_VERSION:
            raise FileFormatError(f"fingerprint version {d.get('version')!r} is not supported (this autoseg "
                                  f"writes version {FINGERPRINT_VERSION}); rerun `autoseg plan` to recompute it.")
        try:
            cases = tuple(
                CaseFingerprint(
                    case_id=c["case_id"], spacing=tuple(map(float, c["spacing"])), shape=tuple(c["shape"]),
                    shape_after_crop=tuple(c["shape_after_crop"]),
                    class_voxels={int(k): int(v) for k, v in c["class_voxels"].items()},
                    component_sizes={int(k): tuple(v) for k, v in c.get("component_sizes", {}).items()},
                    intensity_percentiles=tuple(tuple(float(v) for v in p)
                                                for p in c.get("intensity_percentiles", ())),
                )
                for c in d["cases"]
            )
            return cls(dataset_name=d["dataset_name"], channel_names=tuple(d["channel_names"]),
                       labels=dict(d["labels"]), num_training=int(d["num_training"]), is_2d=bool(d["is_2d"]),
                       cases=cases, intensity=tuple(IntensityStats(**s) for s in d["intensity"]),
                       dataset_signature=str(d.get("dataset_signature", "")))
        except (KeyError, TypeError, ValueError) as err:
            raise FileFormatError(f"fingerprint JSON is missing or has a malformed field ({err}); rerun "
                                  "`autoseg plan` to recompute it.") from err

    def save(self, path: str | os.PathLike[str]) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DatasetFingerprint:
        data = read_json(path, FileFormatError, "Rerun `autoseg plan` to recreate it.")
        try:
            return cls.from_json(data)
        except FileFormatError as err:
            raise FileFormatError(f"{path}: {err}") from err


def load_fingerprint(path: str | os.PathLike[str]) -> DatasetFingerprint:
    """Load a saved ``fingerprint.json``.

    Raises:
        FileFormatError: the file is missing, not JSON, or of an unknown version.
    """
    return DatasetFingerprint.load(path)
