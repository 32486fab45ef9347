"""Karhunen-Loève expansion (KLE) residual anomaly map: one extra input channel showing where a case departs
from what the training images have in common.

Each preprocessed case (normalised, so z-scores per channel) is resampled (linear) to a coarse ``grid^3``
(``2d`` configurations: each slice to ``grid^2``) and flattened over channels and voxels. On the training
cases a KL (principal component) basis is fitted: the mean and the ``n_components`` leading eigenvectors of
the centred samples' covariance, capped at ``samples - 1``. For a case the residual is what the basis does not
explain, ``r = x - mean - V^T V (x - mean)``; its root mean square over channels, per coarse voxel, is
resampled (linear) back to the case's grid and appended as a channel. Anything atypical of the training images
(a lesion, an artefact) is poorly reconstructed and shows up bright.

The basis used for new cases (saved with the model) sees every training case's images (no labels),
cross-validation validation cases included. The training cases' own channels are cross-fitted: the cases are
split into :data:`CROSS_FIT_FOLDS` groups and each group's residuals come from a basis fitted on the other groups.
A basis reconstructs the cases it was fitted on too well (with ``samples - 1`` components, exactly: their residual
would be zero), so without this the network would learn from a channel unlike what a new case gives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from autoseg.plugins.base import CHANNEL, ChannelPlugin, Param, PluginError, PluginInfo
from autoseg.preprocessing.resample import resample_data

GRID = 48
N_COMPONENTS = 32
#: a ``2d`` configuration fits on at most this many training slices (evenly spaced over all cases)
MAX_FIT_SLICES = 4096
#: training cases' channels come from bases fitted without them: cases split into this many groups (at most n)
CROSS_FIT_FOLDS = 5
#: eigenvalues below this fraction of the largest are treated as zero (no component is kept for them)
RELATIVE_EIGEN_FLOOR = 1e-10
#: columns per block when the Gram matrix and the components are computed (bounds the float64 temporaries)
_BLOCK = 1 << 16


def coarse_samples(data: np.ndarray, grid: int, ndim: int) -> np.ndarray:
    """A case on the coarse grid, flattened: ``(1, C * grid^3)`` in 3D, ``(slices, C * grid^2)`` in 2D.

    Args:
        data: preprocessed images ``(C, *spatial)`` (three spatial axes; 2D works on the slices of axis 0).
        grid: coarse grid size per axis.
        ndim: 3, or 2 for slice-wise.
    """
    if ndim == 3:
        return resample_data(data, (grid,) * 3, order=1).reshape(1, -1)
    small = resample_data(data, (data.shape[1], grid, grid), order=1)  # (C, Z, g, g); the slice axis is kept
    return np.ascontiguousarray(small.transpose(1, 0, 2, 3)).reshape(small.shape[1], -1)


def fit_basis(samples: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and leading KL components of ``samples`` ``(n, d)``.

    The eigenvectors of the ``n x n`` Gram matrix of the centred samples give the same components as their SVD
    without a second ``n x d`` array (``v_k = X^T w_k / sqrt(lambda_k)``); float64 accumulation in blocks.

    Returns:
        ``mean (d,)`` float32, ``components (k, d)`` float32 with orthonormal rows, ``eigenvalues (k,)`` float64
        (largest first); ``k <= min(n_components, n - 1)``, fewer when the samples span less.
    """
    n, d = samples.shape
    mean = samples.mean(axis=0, dtype=np.float64).astype(np.float32)
    centred = samples - mean
    gram = np.zeros((n, n))
    for a in range(0, d, _BLOCK):
        block = centred[:, a:a + _BLOCK].astype(np.float64)
        gram += block @ block.T
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:max(0, min(int(n_components), n - 1))]
    order = order[values[order] > RELATIVE_EIGEN_FLOOR * max(float(values.max(initial=0.0)), 1e-300)]
    weights = vectors[:, order] / np.sqrt(values[order])  # (n, k)
    components = np.empty((order.size, d), np.float32)
    for a in range(0, d, _BLOCK):
        components[:, a:a + _BLOCK] = weights.T @ centred[:, a:a + _BLOCK].astype(np.float64)
    return mean, components, values[order]


def residual_magnitude(samples: np.ndarray, mean: np.ndarray, components: np.ndarray, n_channels: int) -> np.ndarray:
    """Root mean square over channels of what the basis does not reconstruct: ``(n, d)`` -> ``(n, d / C)``."""
    centred = samples - mean
    residual = centred - (centred @ components.T) @ components
    return np.sqrt(np.mean(np.square(residual.reshape(samples.shape[0], n_channels, -1)), axis=1))


def _slice_choice(depths: Sequence[int], cap: int) -> list[np.ndarray]:
    """Per case, the slice indices used for fitting: all, or ``cap`` evenly spaced over every case's slices."""
    total = int(sum(depths))
    picks = np.unique(np.linspace(0, total - 1, cap).round().astype(np.int64)) if total > cap else np.arange(total)
    starts = np.cumsum([0, *depths])
    return [picks[(picks >= s) & (picks < e)] - s for s, e in zip(starts[:-1], starts[1:], strict=True)]


class KLEResidual(ChannelPlugin):
    """The ``kle_residual`` channel (see the module docstring)."""

    n_channels = 1

    def __init__(self, *, grid: int = GRID, n_components: int = N_COMPONENTS) -> None:
        self.grid = int(grid)
        self.n_components = int(n_components)

    def decisions(self, n_training: int) -> list[str]:
        used = min(self.n_components, max(0, n_training - 1))
        cap = f"{self.n_components} component(s) capped at {used} ({n_training} training cases - 1)" \
            if used < self.n_components else f"{used} component(s)"
        return [f"3d configurations: basis of {cap} on a {self.grid}^3 grid, fitted on every training case's images "
                f"(no labels; cross-validation validation cases included); 2d configurations fit on up to "
                f"{MAX_FIT_SLICES} training slices ({self.grid}^2 each), capped at slices - 1.",
                f"the training cases' own channels are cross-fitted over {min(CROSS_FIT_FOLDS, n_training)} groups "
                "of cases (each from a basis fitted without it), as a new case sees the full basis."]

    def fit(self, cases: Sequence[np.ndarray], ndim: int) -> dict[str, np.ndarray]:
        if not cases:
            raise PluginError("kle_residual: no training case to fit the basis on.")
        n_channels = int(cases[0].shape[0])
        if ndim == 3:
            samples = np.concatenate([coarse_samples(c, self.grid, 3) for c in cases])
        else:
            picks = _slice_choice([int(c.shape[1]) for c in cases], MAX_FIT_SLICES)
            samples = np.concatenate([coarse_samples(np.asarray(c[:, p]), self.grid, 2)
                                      for c, p in zip(cases, picks, strict=True) if p.size])
        if samples.shape[0] < 2:
            raise PluginError(f"kle_residual needs at least 2 training {'cases' if ndim == 3 else 'slices'} to fit a "
                              f"basis; there is {samples.shape[0]}. Plan without this plugin or add cases.")
        mean, components, values = fit_basis(samples, self.n_components)
        return {"mean": mean, "components": components, "eigenvalues": values,
                "grid": np.array(self.grid), "n_channels": np.array(n_channels), "ndim": np.array(ndim),
                "n_samples": np.array(samples.shape[0]), "n_components_requested": np.array(self.n_components)}

    def training_channels(self, state: Mapping[str, np.ndarray], cases: Sequence[np.ndarray], ndim: int
                          ) -> Iterator[tuple[int, np.ndarray]]:
        """Cross-fitted channels: case ``i`` is in group ``i % k`` and gets the residual of a basis fitted on the other
        groups (``k = min(CROSS_FIT_FOLDS, cases)``); ``state`` (the basis of all cases) is not used."""
        k = min(CROSS_FIT_FOLDS, len(cases))
        if ndim == 3 and len(cases) < 3:
            raise PluginError(f"kle_residual needs at least 3 training cases (their channels come from bases fitted "
                              f"without them); there are {len(cases)}. Plan without this plugin or add cases.")
        group = np.arange(len(cases)) % k
        for g in range(k):
            basis = self.fit([c for c, h in zip(cases, group, strict=True) if h != g], ndim)
            for i in np.flatnonzero(group == g):
                yield int(i), self.compute(basis, cases[i], ndim)

    def compute(self, state: Mapping[str, np.ndarray], data: np.ndarray, ndim: int) -> np.ndarray:
        grid, n_channels = int(state["grid"]), int(state["n_channels"])
        if data.shape[0] != n_channels or int(state["ndim"]) != ndim:
            raise PluginError(f"kle_residual: the basis was fitted on {n_channels}-channel {int(state['ndim'])}D data; "
                              f"this case has {data.shape[0]} channel(s) in {ndim}D. Preprocess and train again.")
        samples = coarse_samples(data, grid, ndim)
        magnitude = residual_magnitude(samples, state["mean"], state["components"], n_channels)
        coarse = magnitude.reshape(1, grid, grid, grid) if ndim == 3 else magnitude.reshape(1, -1, grid, grid)
        return resample_data(coarse, data.shape[1:], order=1)


KLE_RESIDUAL = PluginInfo(
    name="kle_residual", kind=CHANNEL,
    doc="Karhunen-Loeve residual anomaly map: one extra input channel, the part of each case (on a coarse grid) "
        "that a basis fitted on the training images cannot reconstruct.\n\n" + (__doc__ or ""),
    params=(Param("grid", "int", GRID, "coarse grid size per axis (2d configurations: grid^2 per slice)", low=4,
                  high=256),
            Param("n_components", "int", N_COMPONENTS, "KL components kept (capped at training samples - 1)", low=1)),
    build=KLEResidual)
