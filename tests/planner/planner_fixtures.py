"""Hand-made fingerprints shaped like the datasets of nnU-Net's worked examples (reference §3.9)."""

from __future__ import annotations

from collections.abc import Sequence

from autoseg.fingerprint.model import CaseFingerprint, DatasetFingerprint, IntensityStats

STATS = IntensityStats(mean=100.0, std=50.0, median=95.0, min=-1000.0, max=3000.0,
                       percentile_00_5=-900.0, percentile_99_5=1500.0)


def make_fingerprint(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *,
                     channels: Sequence[str] = ("MRI",), n_labels: int = 3, crop_ratio: float = 1.0,
                     is_2d: bool = False, name: str = "Test") -> DatasetFingerprint:
    """One case per (spacing, shape) pair; ``crop_ratio`` = cropped / original voxels of every case."""
    cases = []
    for i, (sp, sh) in enumerate(zip(spacings, shapes, strict=True)):
        before = (round(sh[0] / crop_ratio), *sh[1:])
        cases.append(CaseFingerprint(case_id=f"case_{i:04d}", spacing=tuple(map(float, sp)), shape=tuple(before),
                                     shape_after_crop=tuple(sh), class_voxels={0: 1}))
    labels = {"background": 0, **{f"class{k}": k for k in range(1, n_labels)}}
    return DatasetFingerprint(dataset_name=name, channel_names=tuple(channels), labels=labels,
                              num_training=len(cases), is_2d=is_2d, cases=tuple(cases),
                              intensity=tuple(STATS for _ in channels))


def ct_like() -> DatasetFingerprint:
    zs = [0.7, 1.0, 1.5, 2.5, 5.0]
    sp = [(zs[i % 5], 0.78, 0.78) for i in range(100)]
    return make_fingerprint(sp, [(200, 512, 512)] * 100, channels=("CT",), name="CTLike")


def acdc_like() -> DatasetFingerprint:
    zs = [5.0] * 20 + [6.5] * 20 + [10.0] * 160
    return make_fingerprint([(z, 1.5625, 1.5625) for z in zs], [(9, 237, 256)] * 200, channels=("cineMRI",),
                            n_labels=4, name="ACDCLike")


def brats_like() -> DatasetFingerprint:
    return make_fingerprint([(1.0, 1.0, 1.0)] * 484, [(138, 169, 138)] * 484, channels=("T1", "T1ce", "T2", "FLAIR"),
                            n_labels=4, crop_ratio=0.5, name="BraTSLike")


def hippocampus_like() -> DatasetFingerprint:
    return make_fingerprint([(1.0, 1.0, 1.0)] * 260, [(36, 50, 35)] * 260, n_labels=3, name="HippocampusLike")


def rgb_2d() -> DatasetFingerprint:
    return make_fingerprint([(999.0, 1.0, 1.0)] * 300, [(1, 400, 600)] * 300, channels=("R", "G", "B"), n_labels=2,
                            is_2d=True, name="RGB2D")
