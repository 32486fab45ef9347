"""Window placement and weights: the summed window weights factor into per-axis sums."""

from __future__ import annotations

import torch

from autoseg.inference.windows import (
    axis_window_sums,
    divide_by_window_sums,
    gaussian_importance_map,
    window_profiles,
    window_starts,
    window_sums_at,
    window_tiles,
)


def test_per_axis_sums_equal_the_accumulated_weights_over_every_window():
    spatial, patch = (3, 21, 30, 17), (8, 12, 9)  # the first axis sliced one index at a time
    tiles = window_tiles(spatial, patch, 0.5, 1, rules="autoseg")
    gauss = gaussian_importance_map(patch)
    full = torch.zeros(spatial)
    for t in tiles:
        full[t] += gauss
    profiles = window_profiles(patch, True)
    starts = window_starts(spatial[1:], patch, 0.5)
    sums = axis_window_sums(profiles, starts, spatial[1:])
    for t in tiles[::7]:
        torch.testing.assert_close(window_sums_at(sums, t[1:]), full[t], rtol=1e-5, atol=0)
    ones = torch.ones((1, *spatial))
    divide_by_window_sums(ones, profiles, starts, 1)
    torch.testing.assert_close(ones[0], 1 / full, rtol=1e-5, atol=0)
