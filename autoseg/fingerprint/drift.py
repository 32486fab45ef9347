"""Is a case to predict like the training data? Compare it with the training fingerprint.

A :class:`DriftReference` holds, per quantity, the training range and the range allowed before a warning:

* spacing per axis: more than :data:`SPACING_WARN_FACTOR` (2x) finer than the finest or coarser than the
  coarsest training spacing. The input is resampled to the plan's spacing either way, but details finer
  than the training data are lost and coarse data is interpolated into shapes the model never saw.
* physical size per axis (shape x spacing, mm): more than :data:`SIZE_WARN_FACTOR` (2x) smaller than the
  smallest or larger than the largest training image. Field of view varies a lot in practice, so only a
  different anatomy or a cut-out is flagged. An axis whose spacing already warns gets no size finding: a
  wrong spacing header, the usual cause, changes both, and one warning per cause is easier to act on.
* intensity percentiles (:data:`~autoseg.fingerprint.model.DRIFT_PERCENTILES`) per channel over the nonzero
  region (the region preprocessing keeps; labels are unknown at prediction time): a value is tolerated when
  a *shift* or a *scaling* of the training range explains it, i.e. inside the training ``[min, max]`` of
  that percentile either widened by ``m = max(0.5 x its training spread, 0.25 x the median dynamic range
  (p99.5 - p0.5) of a training case)`` or scaled by any factor in ``[1/2, 2]`` (:data:`INTENSITY_FACTOR`).
  Every training case passes (it is inside ``[min, max]``). Unseen cases pass when they differ from the
  training extremes by less than 2x in scale (un-normalised MR varies this much between cases of one
  scanner) or by less than ``m`` in offset; with few training cases ``[min, max]`` is narrow, which is why a
  multiplicative tolerance is needed. Scaling by x10 or x0.1, or an offset of a quarter of the dynamic range
  beyond the training range, fires (CT stored with +1024: the air peak at p0.5 moves from -1000 to ~0 HU,
  while the tolerance ends near -500).
  For z-score normalised channels (MR) a global scaling is harmless to the network; the warning still
  tells the user that the data differs from the training data (another scanner or export).
* channel names, when the input names them: a different list (case-insensitive).

Intensity findings are merged to one per channel (the one furthest outside, naming the others).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.fingerprint.model import DRIFT_PERCENTILES, DatasetFingerprint

SPACING_WARN_FACTOR = 2.0
SIZE_WARN_FACTOR = 2.0
INTENSITY_FACTOR = 2.0
#: shift tolerated for a percentile, as fractions of its training spread and of a typical case's dynamic range
INTENSITY_SPREAD_MARGIN = 0.5
INTENSITY_RANGE_MARGIN = 0.25
#: voxels sampled per case for the percentiles (fixed seed: the same image always gives the same values)
MAX_INTENSITY_SAMPLES = 100_000
_SAMPLE_SEED = 0
_REL_TOL = 1e-6  # float32/float64 round-off: a training case must always pass its own reference


def intensity_percentiles(images: np.ndarray) -> tuple[tuple[float, float, float], ...]:
    """Per channel, the :data:`~autoseg.fingerprint.model.DRIFT_PERCENTILES` of the nonzero region.

    The region is where any channel is nonzero (the whole image when there is none), as preprocessing
    crops; at most :data:`MAX_INTENSITY_SAMPLES` voxels are drawn with a fixed seed, so a large volume costs
    a few milliseconds and the fingerprint and the drift check give identical values for the same image.

    Args:
        images: ``(C, *spatial)``.

    Returns:
        One ``(p0.5, p50, p99.5)`` per channel (NaN for a channel without finite values).
    """
    n_ch = images.shape[0]
    flat = images.reshape(n_ch, -1)
    rng = np.random.default_rng(_SAMPLE_SEED)
    values = None
    if flat.shape[1] > MAX_INTENSITY_SAMPLES:  # try a uniform sample first: no full-size mask needed
        picked = flat[:, np.sort(rng.integers(0, flat.shape[1], MAX_INTENSITY_SAMPLES))]
        inside = np.any(picked != 0, axis=0)
        if inside.sum() >= MAX_INTENSITY_SAMPLES // 10:
            values = picked[:, inside]
    if values is None:  # small image or a small nonzero region: index the region itself
        idx = np.flatnonzero(np.any(flat != 0, axis=0))
        if idx.size == 0:
            idx = np.arange(flat.shape[1])
        if idx.size > MAX_INTENSITY_SAMPLES:
            idx = idx[np.sort(rng.integers(0, idx.size, MAX_INTENSITY_SAMPLES))]
        values = flat[:, idx]
    values = values.astype(np.float64)
    out = []
    for v in values:
        v = v[np.isfinite(v)]
        p = np.percentile(v, DRIFT_PERCENTILES) if v.size else np.full(len(DRIFT_PERCENTILES), np.nan)
        out.append((float(p[0]), float(p[1]), float(p[2])))
    return tuple(out)


@dataclass(frozen=True)
class TrainingRange:
    """What the training cases covered (``low``-``high``) and what passes without a warning."""

    low: float
    high: float
    allowed_low: float
    allowed_high: float

    def excess(self, value: float) -> float:
        """How far ``value`` lies outside the allowed range, in units of the tolerance (> 0: outside)."""
        if value > self.allowed_high:
            return (value - self.allowed_high) / max(self.allowed_high - self.high, 1e-12)
        if value < self.allowed_low:
            return (self.allowed_low - value) / max(self.low - self.allowed_low, 1e-12)
        return 0.0


def _factor_range(values: np.ndarray, factor: float) -> TrainingRange:
    values = values[np.isfinite(values)]
    if not values.size:  # nothing to compare with: NaN bounds never flag
        return TrainingRange(math.nan, math.nan, math.nan, math.nan)
    lo, hi = float(values.min()), float(values.max())
    return TrainingRange(lo, hi, lo / factor, hi * factor)


def _intensity_range(values: np.ndarray, typical_range: float) -> TrainingRange:
    """Training range of one percentile; tolerated: shifted by the margin or scaled by 1/2..2 (docstring)."""
    values = values[np.isfinite(values)]
    if not values.size:
        return TrainingRange(math.nan, math.nan, math.nan, math.nan)
    lo, hi = float(values.min()), float(values.max())
    margin = max(INTENSITY_SPREAD_MARGIN * (hi - lo), INTENSITY_RANGE_MARGIN * typical_range,
                 _REL_TOL * max(1.0, abs(lo), abs(hi)))
    f = INTENSITY_FACTOR
    return TrainingRange(lo, hi, min(lo - margin, lo / f, lo * f), max(hi + margin, hi / f, hi * f))


@dataclass(frozen=True)
class DriftFinding:
    """One quantity of a case outside the training data.

    ``value`` is the case's value (the names for ``"channel names"``), ``low``-``high`` the training range
    (None for channel names), ``message`` the warning shown to users.
    """

    case_id: str
    quantity: str
    value: float | str
    low: float | None
    high: float | None
    message: str


@dataclass(frozen=True)
class DriftReference:
    """Training ranges to compare inputs with; build it with :meth:`from_fingerprint`.

    Axes are the fingerprint's (numpy order; 2D data has the dummy leading axis). ``intensity`` is per
    channel and percentile (empty for fingerprints without percentiles: the intensity check is skipped).
    """

    channel_names: tuple[str, ...] = ()
    spacing: tuple[TrainingRange, ...] = ()
    size_mm: tuple[TrainingRange, ...] = ()
    intensity: tuple[tuple[TrainingRange, ...], ...] = ()

    @classmethod
    def from_spacings(cls, spacings: np.ndarray) -> DriftReference:
        """A spacing-only reference from ``(n_cases, ndim)`` training spacings (numpy order)."""
        spacings = np.asarray(spacings, dtype=float)
        if spacings.ndim != 2 or not spacings.shape[0]:
            return cls()
        return cls(spacing=tuple(_factor_range(spacings[:, a], SPACING_WARN_FACTOR)
                                 for a in range(spacings.shape[1])))

    @classmethod
    def from_fingerprint(cls, fp: DatasetFingerprint) -> DriftReference:
        """Training ranges of spacing, physical size and intensity percentiles (rules: module docstring).

        Example:
            >>> ref = DriftReference.from_fingerprint(load_fingerprint("work/fingerprint.json"))  # doctest: +SKIP
        """
        if not fp.cases:
            return cls(channel_names=tuple(fp.channel_names))
        spacings = fp.spacings
        sizes = np.array([c.shape for c in fp.cases], dtype=float) * spacings
        n_ch = len(fp.channel_names)
        pct = [c.intensity_percentiles for c in fp.cases if len(c.intensity_percentiles) == n_ch and n_ch]
        intensity: list[tuple[TrainingRange, ...]] = []
        if pct:
            p = np.array(pct, dtype=float)  # (cases, channels, percentiles)
            for c in range(n_ch):
                dyn = p[:, c, -1] - p[:, c, 0]
                typical = float(np.median(dyn[np.isfinite(dyn)])) if np.isfinite(dyn).any() else 0.0
                intensity.append(tuple(_intensity_range(p[:, c, q], typical) for q in range(p.shape[2])))
        return cls(channel_names=tuple(fp.channel_names),
                   spacing=cls.from_spacings(spacings).spacing,
                   size_mm=tuple(_factor_range(sizes[:, a], SIZE_WARN_FACTOR) for a in range(sizes.shape[1])),
                   intensity=tuple(intensity))


def load_drift_reference(workdir: str | os.PathLike[str]) -> DriftReference | None:
    """The reference of ``<workdir>/fingerprint.json``, or None when it is missing or unreadable (the drift
    check is optional: a bad cache must not stop a prediction)."""
    path = Path(workdir) / "fingerprint.json"
    if not path.is_file():
        return None
    try:
        return DriftReference.from_fingerprint(DatasetFingerprint.load(path))
    except (AutosegError, OSError, ValueError):
        return None


def _axis_names(n: int) -> tuple[str, ...]:
    return ("z", "y", "x")[-n:] if n <= 3 else tuple(f"axis {i}" for i in range(n))


def check_header(ref: DriftReference, shape: Sequence[int], spacing: Sequence[float], case_id: str
                 ) -> list[DriftFinding]:
    """Spacing and physical size of a case against the training ranges (header information only).

    Args:
        ref: the training reference.
        shape: spatial shape, numpy order (a 2D file: 2 entries; the reference's dummy axis is dropped).
        spacing: spacing in mm, numpy order.
        case_id: named in the findings.

    Returns:
        Findings, spacing first; none when the dimensionality does not match the training data.
    """
    n = len(spacing)
    spacing_r, size_r = ref.spacing, ref.size_mm
    if len(spacing_r) == n + 1:  # 2D files: the fingerprint's leading axis is the dummy one
        spacing_r, size_r = spacing_r[1:], size_r[1:]
    out: list[DriftFinding] = []
    flagged = set()
    if len(spacing_r) == n:
        for ax, s, r in zip(_axis_names(n), spacing, spacing_r, strict=True):
            factor = max(r.low / s, s / r.high) if s > 0 else math.inf
            if factor > SPACING_WARN_FACTOR:
                flagged.add(ax)
                side = "finer than the finest" if s < r.low else "coarser than the coarsest"
                out.append(DriftFinding(case_id, f"spacing {ax}", float(s), r.low, r.high, (
                    f"case {case_id}: spacing {s:.4g} mm along {ax} is {factor:.1f}x {side} training spacing "
                    f"(training range {r.low:.4g}-{r.high:.4g} mm); it is resampled, but expect lower accuracy.")))
    if len(size_r) == n == len(shape):
        for ax, k, s, r in zip(_axis_names(n), shape, spacing, size_r, strict=True):
            mm = float(k) * float(s)
            if ax in flagged or r.allowed_low <= mm <= r.allowed_high:
                continue
            larger = mm > r.high
            factor = mm / r.high if larger else (r.low / mm if mm > 0 else math.inf)
            what = ("larger than the largest training image; the model never saw anatomy this far out, expect "
                    "false positives there" if larger else "smaller than the smallest training image; structures "
                    "may be cut off, expect lower accuracy")
            out.append(DriftFinding(case_id, f"size {ax} (mm)", mm, r.low, r.high, (
                f"case {case_id}: size {mm:.4g} mm along {ax} is {factor:.1f}x {what} (training range "
                f"{r.low:.4g}-{r.high:.4g} mm).")))
    return out


def _intensity_findings(ref: DriftReference, percentiles: dict[int, Sequence[float]], case_id: str
                        ) -> list[DriftFinding]:
    out = []
    names = ref.channel_names
    for c, values in sorted(percentiles.items()):
        per_q = ref.intensity[c]
        channel = f"channel '{names[c]}' ({c:04d})" if c < len(names) else f"channel {c:04d}"
        found = [(r.excess(v), f"p{q:g}", v, r) for q, v, r in zip(DRIFT_PERCENTILES, values, per_q, strict=True)]
        outside = sorted((x for x in found if x[0] > 0), key=lambda x: -x[0])  # furthest outside first
        if not outside:
            continue
        _, label, v, r = outside[0]
        quantity = f"intensity {label} of {channel}"
        also = f" (also outside: {', '.join(x[1] for x in outside[1:])})" if len(outside) > 1 else ""
        out.append(DriftFinding(case_id, quantity, float(v), r.low, r.high, (
            f"case {case_id}: {quantity} is {v:.4g}, outside the training range {r.low:.4g} to {r.high:.4g} "
            f"(tolerated {r.allowed_low:.4g} to {r.allowed_high:.4g}){also}; check the scanner/units/scaling of "
            "this image: the model never saw such values.")))
    return out


def check_case(ref: DriftReference, images: np.ndarray, spacing: Sequence[float], case_id: str,
               channel_names: Sequence[str] | None = None, *, geometry: bool = True,
               missing: Sequence[int] = ()) -> list[DriftFinding]:
    """Compare one case to predict with the training data.

    Args:
        ref: the training reference (:meth:`DriftReference.from_fingerprint`).
        images: ``(C, *spatial)`` in file layout, as :func:`autoseg.io.image.read_image` gives: every model
            channel, or only the present ones (in order) when ``missing`` names the others.
        spacing: spacing in mm, numpy order (``geometry.array_spacing``).
        case_id: named in the findings.
        channel_names: the input's channel names, when known (compared with the training ones).
        geometry: also check spacing and size (False when :func:`check_header` already did).
        missing: channels that were not acquired (absent or zero-filled in ``images``): not checked.

    Returns:
        Findings (empty when the case looks like the training data): channel names, spacing, size, then
        at most one intensity finding per channel.

    Example:
        >>> for f in check_case(ref, image.array, image.geometry.array_spacing, "case_7"):  # doctest: +SKIP
        ...     print(f.message)
    """
    out: list[DriftFinding] = []
    if channel_names is not None and ref.channel_names and (
            tuple(n.lower() for n in channel_names) != tuple(n.lower() for n in ref.channel_names)):
        given, trained = ", ".join(channel_names), ", ".join(ref.channel_names)
        out.append(DriftFinding(case_id, "channel names", given, None, None, (
            f"case {case_id}: the input channels are named {given}, but the model was trained on {trained}; "
            "make sure each file carries the channel the model expects in that position.")))
    if geometry:
        out += check_header(ref, images.shape[1:], spacing, case_id)
    present = [c for c in range(len(ref.intensity)) if c not in set(missing)]
    if ref.intensity and images.shape[0] in (len(ref.intensity), len(present)):
        pct = intensity_percentiles(images)  # zero-filled channels do not change the nonzero region
        by_channel = dict(zip(present, pct if len(pct) == len(present) else [pct[c] for c in present],
                              strict=True))
        out += _intensity_findings(ref, by_channel, case_id)
    return out
