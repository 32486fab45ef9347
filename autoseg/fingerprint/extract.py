"""Compute the dataset fingerprint in one pass that also runs the integrity check.

Each case is read once, in a spawn-safe worker: the integrity check runs on the loaded arrays, then the
statistics are taken from the same arrays. Only small results cross process boundaries (a fixed number of
intensity samples per case), so memory is bounded by ``jobs`` cases, not by the dataset.

Intensity statistics follow nnU-Net (foreground voxels, every case weighted equally), but mean, std,
min and max are exact (from per-case moments) instead of estimated from 10^8 samples; the median and the
0.5/99.5 percentiles come from an equal-size random sample of every case's foreground. Each case also
records its own intensity percentiles over the nonzero region, which the drift check compares new inputs with.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.fingerprint.drift import intensity_percentiles
from autoseg.fingerprint.model import (
    DUMMY_2D_SPACING,
    CaseFingerprint,
    DatasetFingerprint,
    IntensityStats,
)
from autoseg.io.check import CheckReport, assemble_report
from autoseg.io.check_case import CaseCheck, check_case
from autoseg.io.dataset import CaseFiles, Dataset, DatasetSpec
from autoseg.io.image import image_stamp
from autoseg.parallel import imap_ordered

#: Foreground intensity samples kept over the whole dataset, per channel (bounds memory).
TOTAL_SAMPLES = 10_000_000
MAX_SAMPLES_PER_CASE = 200_000
MIN_SAMPLES_PER_CASE = 2_000
#: Largest number of connected-component sizes stored per class and case.
MAX_COMPONENTS_STORED = 10_000
#: voxels handled per step where a full-size temporary would otherwise be made (masks, counts, indices)
SLAB_VOXELS = 1 << 20


@dataclass
class CaseStats:
    """What one worker returns: the check, the case fingerprint and its intensity summaries."""

    check: CaseCheck
    fingerprint: CaseFingerprint | None
    samples: np.ndarray | None  # (C, n) float32 foreground samples, n equal for every case
    moments: np.ndarray | None  # (C, 5): n, sum, sum of squares, min, max of foreground voxels


def samples_per_case(n_cases: int) -> int:
    """Equal per-case sample count so that the pooled sample weights every case the same."""
    return int(min(MAX_SAMPLES_PER_CASE, max(MIN_SAMPLES_PER_CASE, TOTAL_SAMPLES // max(n_cases, 1))))


def _slab_rows(shape: tuple[int, ...]) -> int:
    """Rows of the first axis per slab of about :data:`SLAB_VOXELS` voxels."""
    return max(1, SLAB_VOXELS // max(1, int(np.prod(shape[1:], dtype=np.int64))))


def nonzero_bbox(images: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the voxels where any channel is non-zero (the whole image if there are none).

    Hole filling, which preprocessing applies to the mask, never changes a bounding box, so it is skipped.
    The mask is made a slab of the first axis at a time (its projections are all that is kept).
    """
    spatial = images.shape[1:]
    projections = [np.zeros(n, bool) for n in spatial]
    step = _slab_rows(spatial)
    for a in range(0, spatial[0], step):
        mask = images[0, a:a + step] != 0
        for c in range(1, images.shape[0]):
            mask |= images[c, a:a + step] != 0
        for ax, proj in enumerate(projections):
            part = np.any(mask, axis=tuple(i for i in range(mask.ndim) if i != ax))
            if ax == 0:
                proj[a:a + step] = part
            else:
                proj |= part
    out = []
    for ax, proj in enumerate(projections):
        idx = np.flatnonzero(proj)
        out.append(slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, spatial[ax]))
    return tuple(out)


def bincount_chunked(values: np.ndarray, minlength: int = 0) -> np.ndarray:
    """``np.bincount`` of a non-negative integer array of any shape, :data:`SLAB_VOXELS` values at a time
    (``np.bincount`` itself converts the whole array to int64 first: 8 bytes per voxel)."""
    flat = values.reshape(-1)
    top = int(flat.max()) + 1 if flat.size else 0
    counts = np.zeros(max(top, minlength), np.int64)
    for a in range(0, flat.size, SLAB_VOXELS):
        counts += np.bincount(flat[a:a + SLAB_VOXELS].astype(np.intp, copy=False), minlength=counts.size)
    return counts


def component_sizes(label: np.ndarray, labels: tuple[int, ...]) -> dict[int, tuple[int, ...]]:
    """Sizes (voxels, largest first) of the connected components of each label, full connectivity."""
    out: dict[int, tuple[int, ...]] = {}
    small_ints = label.dtype.kind in "iu" and label.dtype.itemsize <= 4  # find_objects takes them as they are
    boxes = ndimage.find_objects(label if small_ints else label.astype(np.int32)) if label.max() > 0 else []
    structure = ndimage.generate_binary_structure(label.ndim, label.ndim)
    for lab in labels:
        box = boxes[lab - 1] if 0 < lab <= len(boxes) else None
        if box is None:
            out[lab] = ()
            continue
        comps, n = ndimage.label(label[box] == lab, structure=structure)
        sizes = np.sort(bincount_chunked(comps)[1:])[::-1]
        out[lab] = tuple(int(s) for s in sizes[:MAX_COMPONENTS_STORED])
    return out


def foreground_intensities(images: np.ndarray, label: np.ndarray, ignore_label: int | None, n_samples: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(C, n_samples)`` float32 samples (drawn uniformly with replacement) and ``(C, 5)`` moments (n, sum, sum
    of squares, min, max) of the foreground voxels (label > 0, not the ignore label).

    Works through the volume a slab at a time: no full-size index or float64 copy of the foreground is made.
    """
    n_ch = images.shape[0]
    flat, lab = images.reshape(n_ch, -1), label.reshape(-1)
    starts = range(0, lab.size, SLAB_VOXELS)

    def foreground(a: int) -> np.ndarray:
        part = lab[a:a + SLAB_VOXELS]
        fg = part > 0
        if ignore_label is not None:
            fg &= part != ignore_label
        return fg

    total = sum(int(np.count_nonzero(foreground(a))) for a in starts)
    moments = np.zeros((n_ch, 5))
    if total == 0:
        return np.zeros((n_ch, 0), dtype=np.float32), moments
    ordinals = np.random.default_rng(seed).integers(0, total, n_samples)  # the k-th foreground voxels
    order = np.argsort(ordinals, kind="stable")
    wanted = ordinals[order]
    pick = np.empty(n_samples, np.int64)
    moments[:, 3], moments[:, 4], seen = np.inf, -np.inf, 0
    for a in starts:
        pos = np.flatnonzero(foreground(a))
        if not pos.size:
            continue
        lo, hi = np.searchsorted(wanted, [seen, seen + pos.size])
        pick[order[lo:hi]] = a + pos[wanted[lo:hi] - seen]
        seen += pos.size
        for c in range(n_ch):
            v = flat[c, a:a + SLAB_VOXELS][pos].astype(np.float64)
            moments[c] += (v.size, v.sum(), np.dot(v, v), 0.0, 0.0)
            moments[c, 3], moments[c, 4] = min(moments[c, 3], v.min()), max(moments[c, 4], v.max())
    return flat[:, pick].astype(np.float32), moments


def fingerprint_case(case_id: str, images: np.ndarray, label: np.ndarray, array_spacing: tuple[float, ...],
                     spec: DatasetSpec, n_samples: int, seed: int) -> tuple[CaseFingerprint, np.ndarray, np.ndarray]:
    """Statistics of one case from its arrays (``images`` (C, *spatial), ``label`` spatial).

    Returns:
        The case fingerprint (with the case's nonzero-region intensity percentiles), ``(C, n_samples)``
        foreground samples (empty when the case has no foreground) and ``(C, 5)`` foreground moments
        (n, sum, sum of squares, min, max).
    """
    spacing = tuple(float(s) for s in array_spacing)
    if images.ndim == 3:  # 2D case: a leading dummy axis with the largest spacing
        images, label = images[:, None], label[None]
        spacing = (DUMMY_2D_SPACING * max(spacing),) + spacing
    bbox = nonzero_bbox(images)
    counts = bincount_chunked(label)
    present = {int(v): int(n) for v, n in enumerate(counts) if n > 0}
    class_voxels = {v: present.get(v, 0) for v in sorted(set(present) | set(spec.label_values))}
    samples, moments = foreground_intensities(images, label, spec.ignore_label, n_samples, seed)
    fp = CaseFingerprint(
        case_id=case_id, spacing=spacing, shape=tuple(int(s) for s in label.shape),
        shape_after_crop=tuple(s.stop - s.start for s in bbox), class_voxels=class_voxels,
        component_sizes=component_sizes(label, spec.foreground_labels),
        intensity_percentiles=intensity_percentiles(images),
    )
    return fp, samples, moments


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha1(case_id.encode()).digest()[:4], "little")


def _worker(args: tuple[CaseFiles, DatasetSpec, int, bool, bool]) -> CaseStats:
    case, spec, n_samples, strict, allow = args
    check = check_case(case, spec, keep_arrays=True, strict_geometry=strict, allow_geometry_mismatch=allow)
    data, check.data = check.data, None
    if data is None or data.label is None:
        return CaseStats(check, None, None, None)
    fp, samples, moments = fingerprint_case(case.case_id, data.images, data.label, data.geometry.array_spacing,
                                            spec, n_samples, _case_seed(case.case_id))
    return CaseStats(check, fp, samples, moments)


def combine_intensities(samples: list[np.ndarray], moments: list[np.ndarray], n_channels: int) -> tuple[IntensityStats, ...]:
    """Dataset-level foreground statistics per channel, every case with foreground weighted equally."""
    used = [i for i, m in enumerate(moments) if m[0, 0] > 0]
    out = []
    for c in range(n_channels):
        if not used:
            out.append(IntensityStats(*(float("nan"),) * 7))
            continue
        m = np.array([moments[i][c] for i in used])
        means = m[:, 1] / m[:, 0]
        second = m[:, 2] / m[:, 0]
        mean = float(means.mean())
        std = float(np.sqrt(max(second.mean() - mean**2, 0.0)))
        pooled = np.concatenate([samples[i][c] for i in used])
        p005, med, p995 = np.percentile(pooled, [0.5, 50.0, 99.5])
        out.append(IntensityStats(mean=mean, std=std, median=float(med), min=float(m[:, 3].min()),
                                  max=float(m[:, 4].max()), percentile_00_5=float(p005),
                                  percentile_99_5=float(p995)))
    return tuple(out)


def analyze_cases(dataset: Dataset, *, jobs: int = 1, progress: bool = True, strict_geometry: bool = False,
                  allow_geometry_mismatch: bool = False) -> tuple[CheckReport, list[CaseStats]]:
    """Check every case and take its statistics (:class:`CaseStats`: fingerprint, intensity samples and moments).

    Returns:
        The integrity report and one :class:`CaseStats` per case, in the dataset's order.
    """
    n_samples = samples_per_case(len(dataset.cases))
    work = [(c, dataset.spec, n_samples, strict_geometry, allow_geometry_mismatch) for c in dataset.cases]
    results = list(imap_ordered(_worker, work, jobs=jobs, desc="check + fingerprint", progress=progress,
                                label=lambda w: f"case {w[0].case_id}"))
    return assemble_report(dataset, [r.check for r in results]), results


def analyze_dataset(dataset: Dataset, *, jobs: int = 1, progress: bool = True,
                    strict_geometry: bool = False,
                    allow_geometry_mismatch: bool = False) -> tuple[CheckReport, DatasetFingerprint | None]:
    """Check every case and compute the fingerprint, reading each case once.

    ``strict_geometry`` and ``allow_geometry_mismatch`` set the geometry policy (:func:`check_case`).

    Returns:
        The integrity report and the fingerprint (``None`` when the report has errors).
    """
    report, results = analyze_cases(dataset, jobs=jobs, progress=progress, strict_geometry=strict_geometry,
                                    allow_geometry_mismatch=allow_geometry_mismatch)
    if not report.ok or not results:
        return report, None
    spec = dataset.spec
    fps = [r.fingerprint for r in results if r.fingerprint is not None]
    fingerprint = DatasetFingerprint(
        dataset_name=dataset.name, channel_names=spec.channel_names, labels=dict(spec.raw["labels"]),
        num_training=spec.num_training, is_2d=all(f.shape[0] == 1 and f.spacing[0] >= DUMMY_2D_SPACING
                                                  for f in fps),
        cases=tuple(fps),
        intensity=combine_intensities([r.samples for r in results if r.fingerprint is not None],
                                      [r.moments for r in results if r.fingerprint is not None], spec.n_channels),
    )
    return report, fingerprint


def fingerprint_dataset(dataset: Dataset, *, jobs: int = 1, progress: bool = True,
                        strict_geometry: bool = False) -> DatasetFingerprint:
    """Compute the fingerprint of a dataset that passes the integrity check.

    Args:
        dataset: a loaded dataset (:func:`autoseg.io.dataset.load_dataset`).
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: treat origin/direction mismatches within a case as errors.

    Returns:
        The fingerprint.

    Raises:
        DatasetIntegrityError: the check found errors; the message holds the full table.

    Example:
        >>> fp = fingerprint_dataset(load_dataset("Dataset001_X"), jobs=2)  # doctest: +SKIP
        >>> fp.median_spacing  # doctest: +SKIP
    """
    report, fingerprint = analyze_dataset(dataset, jobs=jobs, progress=progress, strict_geometry=strict_geometry)
    report.raise_for_errors()
    assert fingerprint is not None  # the report had no errors
    return fingerprint


def dataset_signature(dataset: Dataset, *, times: bool = True) -> str:
    """A cheap hash of dataset.json and the case files' names and sizes, and with ``times`` their modification times.

    With times it is the local cache key telling whether a saved fingerprint still matches the files; without
    them it is the same for a copy of the dataset, so files that store it (fingerprint.json, plans.json) stay
    bit-for-bit reproducible.
    """
    h = hashlib.sha1()
    paths = [dataset.root / "dataset.json"]
    for c in dataset.cases:
        paths.extend(c.images)
        if c.label is not None:
            paths.append(c.label)
    for p in paths:
        size, mtime = image_stamp(p) or (-1, -1)  # a file, or a DICOM series folder's files
        stamp = f"|{mtime}" if times else ""
        h.update(f"{Path(p).name}|{size}{stamp}\n".encode())
    return h.hexdigest()
