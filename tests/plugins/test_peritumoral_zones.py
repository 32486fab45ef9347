"""Peritumoral zones against analytic shell volumes, with isotropic and anisotropic voxels, and on files."""

from __future__ import annotations

import math

import numpy as np
import pytest

from autoseg.io.image import Geometry, read_label, write_image, write_label
from autoseg.plugins import PluginError, derive_labels, peritumoral_zones


def _sphere(shape, spacing, radius_mm, center_mm=None):
    """A ball of ``radius_mm`` (voxel centres inside it), and the voxel-centre coordinates in mm."""
    axes = [np.arange(n) * s for n, s in zip(shape, spacing, strict=True)]
    center = center_mm or [a[-1] / 2 for a in axes]
    grid = np.meshgrid(*axes, indexing="ij")
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, center, strict=True)))
    return (r <= radius_mm).astype(np.uint8), r


def _shell(r0, r1):
    return 4 / 3 * math.pi * (r1 ** 3 - r0 ** 3)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 0.5, 0.75)])
def test_zone_volumes_match_spherical_shells(spacing):
    radius = 8.0
    shape = tuple(int(math.ceil(52 / s)) for s in spacing)
    seg, r = _sphere(shape, spacing, radius)
    zones = peritumoral_zones(seg, spacing, widths_mm=(5, 10))
    voxel = float(np.prod(spacing))
    assert set(np.unique(zones)) == {0, 1, 2} and zones.dtype == np.uint8
    assert not zones[seg > 0].any()
    # distances run to the nearest tumour voxel centre, which lies up to a voxel inside the true sphere: the
    # measured shells are a few per cent smaller than the analytic ones (voxelisation error)
    for zone, (r0, r1) in ((1, (radius, radius + 5)), (2, (radius + 5, radius + 15))):
        measured = (zones == zone).sum() * voxel
        assert measured == pytest.approx(_shell(r0, r1), rel=0.07), zone
    # voxel by voxel: d(p) lies in [r - R, r - R + one voxel diagonal], which fixes the zone away from the edges
    diag = math.sqrt(sum(s * s for s in spacing))
    assert (zones[(r > radius) & (r <= radius + 5 - diag)] == 1).all()
    assert (zones[(r > radius + 5) & (r <= radius + 15 - diag)] == 2).all()
    assert (zones[r > radius + 15] == 0).all()


def test_anisotropic_spacing_counts_millimetres_not_voxels():
    seg = np.zeros((21, 21, 21), np.uint8)
    seg[10, 10, 10] = 1
    zones = peritumoral_zones(seg, (2.5, 1.0, 1.0), widths_mm=(5,))
    assert zones[10, 10, 10] == 0
    assert np.flatnonzero(zones[:, 10, 10]).tolist() == [8, 9, 11, 12]  # 5 mm = 2 slices of 2.5 mm
    assert np.flatnonzero(zones[10, 10, :]).tolist() == [5, 6, 7, 8, 9, 11, 12, 13, 14, 15]  # 5 voxels of 1 mm


def test_labels_choose_the_tumour_and_body_limits_the_zones():
    seg = np.zeros((1, 30, 30), np.uint8)
    seg[0, 5, 5], seg[0, 20, 20] = 1, 2
    only2 = peritumoral_zones(seg, (1.0, 1.0, 1.0), labels=[2], widths_mm=(3,))
    assert only2[0, 20, 22] == 1 and not only2[0, :10, :10].any()
    body = np.zeros(seg.shape, bool)
    body[0, :, :21] = True
    inside = peritumoral_zones(seg, (1.0, 1.0, 1.0), labels=[2], widths_mm=(3,), body=body)
    assert inside[0, 20, 19] == 1 and inside[0, 20, 22] == 0
    assert not peritumoral_zones(np.zeros((4, 4), np.uint8), (1.0, 1.0)).any()  # no tumour, no zones
    with pytest.raises(PluginError, match="does not fit a 2D label map"):
        peritumoral_zones(np.zeros((4, 4), np.uint8), (1.0, 1.0, 1.0))


def test_derive_labels_writes_zones_of_a_label_file_in_its_geometry(tmp_path):
    spacing_xyz = (1.0, 1.0, 2.0)  # ITK order; numpy order is (2, 1, 1)
    geometry = Geometry(spacing=spacing_xyz, origin=(3.0, -2.0, 7.0), direction=tuple(np.eye(3).ravel()))
    seg, _ = _sphere((20, 30, 30), (2.0, 1.0, 1.0), 6.0)
    write_label(tmp_path / "case.nii.gz", seg, geometry)
    image = np.ones((1, 20, 30, 30), np.float32)
    image[0, :, :, :15] = 0  # half of the image is "air"
    write_image(tmp_path / "case_0000.nii.gz", image[0], geometry)
    out = derive_labels(tmp_path / "case.nii.gz", tmp_path / "zones" / "case.nii.gz", params={"widths_mm": [4]})
    got = read_label(out)
    assert got.geometry == read_label(tmp_path / "case.nii.gz").geometry
    assert np.array_equal(got.array, peritumoral_zones(seg, (2.0, 1.0, 1.0), widths_mm=(4,)))
    body = derive_labels(tmp_path / "case.nii.gz", tmp_path / "body.nii.gz",
                         params={"widths_mm": [4], "within_body": True}, images=[tmp_path / "case_0000.nii.gz"])
    assert not read_label(body).array[:, :, :15].any() and read_label(body).array[:, :, 15:].any()
    with pytest.raises(PluginError, match="pass its files"):
        derive_labels(tmp_path / "case.nii.gz", tmp_path / "x.nii.gz", params={"within_body": True})
    with pytest.raises(PluginError, match="a channel plugin"):
        derive_labels(tmp_path / "case.nii.gz", tmp_path / "x.nii.gz", plugin="kle_residual")
