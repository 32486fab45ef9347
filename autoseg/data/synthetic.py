"""Synthetic datasets in the nnU-Net v2 raw layout, for tests, demos and benchmarks.

Two kinds of phantom, both deterministic by seed (case ``i`` depends only on ``(seed, i)``, so asking for
more cases keeps the first ones unchanged):

- ``"brats"``: four MRI-like channels (FLAIR, T1, T1ce, T2). A textured ellipsoidal "brain" on a zero
  background holds a tumour of nested regions, edema (1) ⊃ non-enhancing core (2) ⊃ enhancing (3). Each
  label has its own contrast per channel, as in BraTS: FLAIR and T2 show the edema, T1ce shows the
  enhancing rim bright and the core dark, T1 shows the core dark. Telling the labels apart needs several
  channels.
- ``"binary"``: one channel with one to three bright blob lesions (label 1), as in lesion-detection tasks.

Objects are drawn in physical millimetres, so an anisotropic spacing gives thick slices of the same anatomy.
``ndim=2`` writes 2D PNG slices (uint8 images and labels), nnU-Net's 2D convention.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io.atomic import write_json_atomic
from autoseg.io.image import Geometry, write_image, write_label

KINDS = ("brats", "binary")
BRATS_CHANNELS = ("FLAIR", "T1", "T1ce", "T2")
# Intensity of each tissue relative to normal brain (1.0), per channel: (edema, core, enhancing).
_BRATS_CONTRAST = {
    "FLAIR": (1.8, 1.35, 1.5),
    "T1": (0.85, 0.55, 0.8),
    "T1ce": (1.0, 0.5, 2.1),
    "T2": (1.7, 1.95, 1.35),
}
_LESION_CONTRAST = 1.7
_ANISO_SPACING_FACTOR = (3.0, 0.8, 0.8)  # z, y, x: thick slices, finer in-plane


@dataclass(frozen=True)
class _Case:
    channels: np.ndarray  # (C, *spatial) float32
    label: np.ndarray  # spatial uint8
    geometry: Geometry


def make_synthetic_dataset(root: str | os.PathLike[str], *, n_cases: int = 8,
                           shape: tuple[int, ...] = (48, 48, 48), spacing: tuple[float, ...] = (1.0, 1.0, 1.0),
                           n_channels: int | None = None, kind: str = "brats", ndim: int = 3, n_test: int = 0,
                           seed: int = 0, file_ending: str | None = None, anisotropic: bool = False,
                           regions: bool = False, shape_jitter: float = 0.1) -> Path:
    """Write a synthetic dataset (dataset.json, imagesTr/, labelsTr/, imagesTs/ + labelsTs/).

    Args:
        root: the dataset folder to write (created if needed), e.g. ``.../Dataset001_Synthetic``.
        n_cases: number of training cases (``case_000`` ...).
        shape: image size in numpy axis order ``(z, y, x)``; for ``ndim=2`` the last two entries are used.
            Each case's size varies by up to ``shape_jitter`` (±10 % by default).
        spacing: voxel size in mm, numpy axis order; for ``ndim=2`` the last two entries (PNG stores none).
        n_channels: channels per case; default 4 for ``"brats"`` (FLAIR, T1, T1ce, T2; fewer takes the
            first ones, more repeats them) and 1 for ``"binary"``.
        kind: ``"brats"`` (nested tumour labels 1/2/3) or ``"binary"`` (lesions, label 1).
        ndim: 3 for volumes, 2 for 2D slices.
        n_test: number of extra cases written to imagesTs/ (``test_000`` ...), with their labels in
            labelsTs/ (nnU-Net ignores that folder; it lets demos score predictions).
        seed: the seed; the same seed gives the same files byte for byte.
        file_ending: ``".nii.gz"`` for 3D and ``".png"`` for 2D by default; any ending autoseg writes.
        anisotropic: thick slices: spacing multiplied by (3.0, 0.8, 0.8) and a third of the slices.
        regions: declare BraTS regions (whole_tumor [1,2,3], tumor_core [2,3], enhancing_tumor 3, with
            ``regions_class_order``) instead of the plain labels edema/core/enhancing. ``"brats"`` only.
        shape_jitter: relative per-case size variation (0 gives every case exactly ``shape``).

    Returns:
        ``root`` as a Path.

    Raises:
        AutosegError: an argument is out of range (the message names it and the allowed values).

    Example:
        >>> from autoseg.io.dataset import load_dataset
        >>> root = make_synthetic_dataset(tmp / "Dataset001_Toy", n_cases=2, shape=(24, 24, 24))  # doctest: +SKIP
        >>> len(load_dataset(root).cases)  # doctest: +SKIP
        2
    """
    root = Path(root)
    n_ch = _check_args(kind, ndim, n_cases, n_test, shape, spacing, n_channels, regions)
    ending = file_ending or (".png" if ndim == 2 else ".nii.gz")
    base_shape = tuple(int(s) for s in shape[-ndim:])
    base_spacing = tuple(float(s) for s in spacing[-ndim:])
    if anisotropic:
        factors = _ANISO_SPACING_FACTOR[-ndim:]
        base_spacing = tuple(s * f for s, f in zip(base_spacing, factors, strict=True))
        base_shape = tuple(max(8, round(n / f)) if f > 1 else n for n, f in zip(base_shape, factors, strict=True))
    names = _channel_names(kind, n_ch)
    for folder, prefix, count, offset in (("Tr", "case", n_cases, 0), ("Ts", "test", n_test, 1_000_000)):
        for i in range(count):
            rng = np.random.default_rng([seed, offset + i])
            case = _make_case(rng, kind, names, base_shape, base_spacing, shape_jitter)
            _write_case(root, folder, f"{prefix}_{i:03d}", case, ending)
    write_json_atomic(root / "dataset.json", _dataset_json(kind, names, n_cases, ending, regions, seed))
    return root


def _check_args(kind: str, ndim: int, n_cases: int, n_test: int, shape: tuple[int, ...],
                spacing: tuple[float, ...], n_channels: int | None, regions: bool) -> int:
    if kind not in KINDS:
        raise AutosegError(f"make_synthetic_dataset: kind={kind!r} is unknown; use one of {', '.join(KINDS)}.")
    if ndim not in (2, 3):
        raise AutosegError(f"make_synthetic_dataset: ndim={ndim!r}; use 2 or 3.")
    if n_cases < 1 or n_test < 0:
        raise AutosegError(f"make_synthetic_dataset: n_cases={n_cases}, n_test={n_test}; need n_cases >= 1 "
                           "and n_test >= 0.")
    if len(shape) < ndim or min(shape[-ndim:]) < 8:
        raise AutosegError(f"make_synthetic_dataset: shape={shape} needs {ndim} sizes of at least 8 voxels.")
    if len(spacing) < ndim or min(spacing[-ndim:]) <= 0:
        raise AutosegError(f"make_synthetic_dataset: spacing={spacing} needs {ndim} positive values (mm).")
    if regions and kind != "brats":
        raise AutosegError("make_synthetic_dataset: regions=True needs kind='brats' (nested tumour labels).")
    n_ch = n_channels if n_channels is not None else (4 if kind == "brats" else 1)
    if n_ch < 1:
        raise AutosegError(f"make_synthetic_dataset: n_channels={n_ch}; need at least 1.")
    return n_ch


def _channel_names(kind: str, n_channels: int) -> tuple[str, ...]:
    if kind == "binary":
        return ("MR",) if n_channels == 1 else tuple(f"MR{i}" for i in range(n_channels))
    names = [BRATS_CHANNELS[i % 4] + ("" if i < 4 else f"_{i // 4}") for i in range(n_channels)]
    return tuple(names)


def _grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Open grid of physical coordinates (mm) centred on the image centre, numpy axis order."""
    return [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]


def _axes(grid: list[np.ndarray]) -> list[np.ndarray]:
    """Broadcastable views of the 1D coordinate vectors."""
    nd = len(grid)
    return [g.reshape([-1 if a == i else 1 for a in range(nd)]) for i, g in enumerate(grid)]


def _smooth_field(rng: np.random.Generator, coords: list[np.ndarray], wavelength: float,
                  n_waves: int = 3) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of plane waves of roughly ``wavelength`` mm."""
    field = np.zeros([1] * len(coords), dtype=np.float32)
    for _ in range(n_waves):
        direction = rng.normal(size=len(coords))
        direction /= np.linalg.norm(direction) + 1e-12
        k = np.float32(2 * np.pi / (wavelength * rng.uniform(0.7, 1.4)))
        phase = np.float32(rng.uniform(0, 2 * np.pi))
        arg = sum(np.float32(d) * c for d, c in zip(direction, coords, strict=True))
        field = field + np.cos(k * arg + phase)
    return field / np.float32(n_waves)


def _blob(rng: np.random.Generator, coords: list[np.ndarray], centre: np.ndarray, radii: np.ndarray,
          roughness: float) -> np.ndarray:
    """Boolean ellipsoid with a wobbly surface (radius modulated by a smooth field)."""
    d2 = sum(((c - np.float32(m)) / np.float32(r)) ** 2 for c, m, r in zip(coords, centre, radii, strict=True))
    wobble = 1 + roughness * _smooth_field(rng, coords, wavelength=float(np.mean(radii)) * 1.5)
    return d2 <= wobble**2


def _make_case(rng: np.random.Generator, kind: str, names: tuple[str, ...], base_shape: tuple[int, ...],
               spacing: tuple[float, ...], shape_jitter: float) -> _Case:
    shape = tuple(max(8, round(n * rng.uniform(1 - shape_jitter, 1 + shape_jitter))) for n in base_shape)
    coords = _axes(_grid(shape, spacing))
    extent = np.array(shape, dtype=float) * np.array(spacing)
    # The "brain" (or organ): an ellipsoid filling most of the field of view, slightly off-centre.
    brain_radii = extent * 0.42 * rng.uniform(0.88, 1.05, size=len(shape))
    brain_centre = extent * rng.uniform(-0.04, 0.04, size=len(shape))
    brain = _blob(rng, coords, brain_centre, brain_radii, roughness=0.05)
    min_mm = 2.5 * max(spacing)  # smallest object radius that stays visible at this spacing
    label = np.zeros(shape, dtype=np.uint8)
    if kind == "brats":
        scale = float(brain_radii.min())
        edema_r = np.maximum(scale * rng.uniform(0.42, 0.55, size=len(shape)), min_mm * 2.2)
        centre = brain_centre + (brain_radii - edema_r) * rng.uniform(-0.6, 0.6, size=len(shape))
        edema = _blob(rng, coords, centre, edema_r, roughness=0.2) & brain
        core_r = np.maximum(edema_r * rng.uniform(0.55, 0.7, size=len(shape)), min_mm * 1.5)
        core_c = centre + (edema_r - core_r) * rng.uniform(-0.3, 0.3, size=len(shape))
        core = _blob(rng, coords, core_c, core_r, roughness=0.15) & edema
        enh_r = np.maximum(core_r * rng.uniform(0.6, 0.75, size=len(shape)), min_mm)
        enh_c = core_c + (core_r - enh_r) * rng.uniform(-0.3, 0.3, size=len(shape))
        enhancing = _blob(rng, coords, enh_c, enh_r, roughness=0.15) & core
        label[edema] = 1
        label[core] = 2
        label[enhancing] = 3
        masks = (edema & ~core, core & ~enhancing, enhancing)
        contrasts = [_BRATS_CONTRAST[n.split("_")[0]] for n in names]
    else:
        for _ in range(int(rng.integers(1, 4))):
            r = np.maximum(float(brain_radii.min()) * rng.uniform(0.1, 0.22) * rng.uniform(0.8, 1.2, len(shape)),
                           min_mm)
            c = brain_centre + (brain_radii - r) * rng.uniform(-0.7, 0.7, size=len(shape))
            label[_blob(rng, coords, c, r, roughness=0.25) & brain] = 1
        masks = (label == 1,)
        contrasts = [(_LESION_CONTRAST,)] * len(names)
    channels = np.empty((len(names), *shape), dtype=np.float32)
    for ch, contrast in enumerate(contrasts):
        level = np.float32(rng.uniform(60.0, 110.0))  # per-case, per-channel intensity scale
        img = np.where(brain, np.float32(1.0), np.float32(0.0)).astype(np.float32)
        for mask, value in zip(masks, contrast, strict=True):
            img[mask] = np.float32(value * rng.uniform(0.92, 1.08))
        texture = 1 + 0.08 * _smooth_field(rng, coords, wavelength=float(extent.max()) / 3, n_waves=4)
        noise = rng.normal(0.0, 0.035, size=shape).astype(np.float32)
        img = (img * texture + noise) * level
        channels[ch] = np.where(brain, np.maximum(img, np.float32(0.5)), np.float32(0.0))
    origin = tuple(float(-e / 2 + o) for e, o in zip(reversed(extent), rng.integers(-20, 21, len(shape)),
                                                       strict=True))
    geometry = Geometry(spacing=tuple(float(s) for s in reversed(spacing)), origin=origin,
                        direction=Geometry.identity(len(shape)).direction)
    return _Case(channels, label, geometry)


def _write_case(root: Path, split: str, case_id: str, case: _Case, ending: str) -> None:
    channels = case.channels
    if ending in (".png", ".bmp"):  # 8-bit natural images: 0..255
        channels = np.clip(np.rint(channels), 0, 255).astype(np.uint8)
    for c, img in enumerate(channels):
        write_image(root / f"images{split}" / f"{case_id}_{c:04d}{ending}", img, case.geometry)
    write_label(root / f"labels{split}" / f"{case_id}{ending}", case.label, case.geometry)


def _dataset_json(kind: str, names: tuple[str, ...], n_cases: int, ending: str, regions: bool,
                  seed: int) -> dict[str, object]:
    d: dict[str, object] = {"name": f"Synthetic{kind.capitalize()}",
                            "description": f"autoseg synthetic '{kind}' phantom, seed {seed}",
                            "channel_names": {str(i): n for i, n in enumerate(names)}}
    if kind == "binary":
        d["labels"] = {"background": 0, "lesion": 1}
    elif regions:
        d["labels"] = {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": 3}
        d["regions_class_order"] = [1, 2, 3]
    else:
        d["labels"] = {"background": 0, "edema": 1, "non_enhancing_core": 2, "enhancing": 3}
    d["numTraining"] = n_cases
    d["file_ending"] = ending
    return d
