"""Federated fingerprints: what one site sends about its data, and the merge of several sites into one fingerprint.

A site sends :class:`SiteStatistics`: per case (without its id) the spacing, shapes, class voxel counts, lesion sizes
and nonzero-region percentiles; per case the foreground intensity moments (count, sum, sum of squares, min, max);
and per channel a quantile sketch of its foreground intensity sample (:data:`SKETCH_POINTS` quantiles). Never a
voxel, a case id or a file path.

:func:`merge_site_statistics` gives the fingerprint the planner would get from the pooled dataset: every field is
exact except the foreground median and 0.5/99.5 percentiles, which come from the sketches (each site's sample is
summarised by its quantiles, then the sites are mixed with one weight per case, as the pooled sample weights every
case equally). Their rank error is below ``1 / (SKETCH_POINTS - 1)`` of a site's sample on top of the sampling
error the pooled computation has anyway; only CT normalisation uses them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from autoseg.errors import DatasetError, FederationError
from autoseg.fingerprint.extract import analyze_cases
from autoseg.fingerprint.model import DUMMY_2D_SPACING, CaseFingerprint, DatasetFingerprint, IntensityStats
from autoseg.io.dataset import Dataset

SITE_STATISTICS_VERSION = 1
#: quantiles of a site's foreground intensity sample sent per channel (levels 0, 0.1, ..., 100 %)
SKETCH_POINTS = 1001


@dataclass(frozen=True)
class SiteStatistics:
    """What one site tells the coordinator about its training data (aggregates only, JSON-safe)."""

    channel_names: tuple[str, ...]
    labels: dict[str, Any]
    cases: tuple[CaseFingerprint, ...]  # case ids blanked
    moments: tuple[tuple[tuple[float, ...], ...], ...]  # per case, per channel: n, sum, sum of squares, min, max
    sketch: tuple[tuple[float, ...], ...]  # per channel: SKETCH_POINTS quantiles of the foreground sample
    version: int = SITE_STATISTICS_VERSION

    def to_json(self) -> dict[str, Any]:
        cases = [{**asdict(c), "class_voxels": {str(k): v for k, v in c.class_voxels.items()},
                  "component_sizes": {str(k): list(v) for k, v in c.component_sizes.items()}} for c in self.cases]
        return {"version": self.version, "channel_names": list(self.channel_names), "labels": self.labels,
                "cases": cases, "moments": [[list(m) for m in case] for case in self.moments],
                "sketch": [list(s) for s in self.sketch]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SiteStatistics:
        if d.get("version") != SITE_STATISTICS_VERSION:
            raise FederationError(f"site statistics version {d.get('version')!r} is not supported (this autoseg "
                                  f"reads {SITE_STATISTICS_VERSION}); run the same autoseg version at every site.")
        try:
            fp = DatasetFingerprint.from_json({"version": 1, "dataset_name": "", "channel_names": [], "labels": {},
                                               "num_training": 0, "is_2d": False, "intensity": [],
                                               "cases": [{**c, "case_id": ""} for c in d["cases"]]})
            return cls(channel_names=tuple(d["channel_names"]), labels=dict(d["labels"]), cases=fp.cases,
                       moments=tuple(tuple(tuple(float(v) for v in m) for m in case) for case in d["moments"]),
                       sketch=tuple(tuple(float(v) for v in s) for s in d["sketch"]))
        except (KeyError, TypeError, ValueError) as err:
            raise FederationError(f"site statistics are malformed ({err}); run the same autoseg version at every "
                                  "site.") from err


def site_statistics(dataset: Dataset, *, jobs: int = 1, progress: bool = True) -> SiteStatistics:
    """Check a site's dataset and summarise it for the coordinator (see the module docstring for what is sent).

    Raises:
        DatasetIntegrityError: the integrity check found errors.
        DatasetError: no case has a label.
    """
    report, results = analyze_cases(dataset, jobs=jobs, progress=progress)
    report.raise_for_errors()
    used = [r for r in results if r.fingerprint is not None]
    if not used:
        raise DatasetError(f"{dataset.root}: no labelled training case; a site needs labelled cases in labelsTr/.")
    n_ch = dataset.spec.n_channels
    levels = np.linspace(0.0, 100.0, SKETCH_POINTS)
    pooled = [np.concatenate([r.samples[c] for r in used if r.samples.shape[1]]) if any(r.samples.shape[1] for r in used)
              else np.zeros(0) for c in range(n_ch)]
    sketch = tuple(tuple(float(v) for v in np.percentile(p, levels)) if p.size else () for p in pooled)
    return SiteStatistics(
        channel_names=dataset.spec.channel_names, labels=dict(dataset.spec.raw["labels"]),
        cases=tuple(_anonymous(r.fingerprint) for r in used),
        moments=tuple(tuple(tuple(float(v) for v in m) for m in r.moments) for r in used), sketch=sketch)


def _anonymous(case: CaseFingerprint | None) -> CaseFingerprint:
    assert case is not None
    return CaseFingerprint(case_id="", spacing=case.spacing, shape=case.shape, shape_after_crop=case.shape_after_crop,
                           class_voxels=case.class_voxels, component_sizes=case.component_sizes,
                           intensity_percentiles=case.intensity_percentiles)


def sketch_percentiles(sketches: Sequence[Sequence[float]], weights: Sequence[float],
                       q: Sequence[float]) -> np.ndarray:
    """Percentiles ``q`` (in %) of a mixture of distributions, each given by equally spaced quantiles and a weight."""
    values, mass = [], []
    for sketch, w in zip(sketches, weights, strict=True):
        if len(sketch) and w > 0:
            values.append(np.asarray(sketch, float))
            mass.append(np.full(len(sketch), w / len(sketch)))
    v, m = np.concatenate(values), np.concatenate(mass)
    order = np.argsort(v, kind="stable")
    v, m = v[order], m[order]
    cdf = (np.cumsum(m) - m / 2) / m.sum()
    return np.interp(np.asarray(q, float) / 100.0, cdf, v)


def _merged_intensity(parts: Sequence[SiteStatistics], n_ch: int) -> tuple[IntensityStats, ...]:
    out = []
    for c in range(n_ch):
        m = np.array([case[c] for p in parts for case in p.moments if case[c][0] > 0]).reshape(-1, 5)
        if not len(m):
            out.append(IntensityStats(*(float("nan"),) * 7))
            continue
        means, second = m[:, 1] / m[:, 0], m[:, 2] / m[:, 0]
        mean = float(means.mean())
        weights = [sum(1 for case in p.moments if case[c][0] > 0) for p in parts]
        p005, med, p995 = sketch_percentiles([p.sketch[c] for p in parts], weights, [0.5, 50.0, 99.5])
        out.append(IntensityStats(mean=mean, std=float(np.sqrt(max(second.mean() - mean**2, 0.0))),
                                  median=float(med), min=float(m[:, 3].min()), max=float(m[:, 4].max()),
                                  percentile_00_5=float(p005), percentile_99_5=float(p995)))
    return tuple(out)


def merge_site_statistics(parts: Sequence[SiteStatistics], dataset_name: str) -> DatasetFingerprint:
    """One fingerprint of the union of the sites' data (exact but for the sketched percentiles; module docstring).

    Cases are named ``site<k>_<i>`` (site ``k`` in the order given, its ``i``-th case).

    Raises:
        FederationError: no sites, or sites whose channels or labels differ (the fix: one dataset.json for all).
    """
    if not parts:
        raise FederationError("no site sent statistics; start at least one `autoseg federated site`.")
    first = parts[0]
    for k, p in enumerate(parts[1:], start=1):
        if tuple(p.channel_names) != tuple(first.channel_names) or p.labels != first.labels:
            raise FederationError(
                f"site {k} has channels {list(p.channel_names)} and labels {p.labels}, site 0 has "
                f"{list(first.channel_names)} and {first.labels}; every site's dataset.json must declare the same "
                "channels (same order) and labels.")
    cases = tuple(CaseFingerprint(case_id=f"site{k}_{i:04d}", spacing=c.spacing, shape=c.shape,
                                  shape_after_crop=c.shape_after_crop, class_voxels=c.class_voxels,
                                  component_sizes=c.component_sizes, intensity_percentiles=c.intensity_percentiles)
                  for k, p in enumerate(parts) for i, c in enumerate(p.cases))
    return DatasetFingerprint(
        dataset_name=dataset_name, channel_names=tuple(first.channel_names), labels=dict(first.labels),
        num_training=len(cases), is_2d=all(c.shape[0] == 1 and c.spacing[0] >= DUMMY_2D_SPACING for c in cases),
        cases=cases, intensity=_merged_intensity(parts, len(first.channel_names)))
