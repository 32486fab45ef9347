"""Clinical tables: volumes in ml, lesions sorted by size, world centroids, RANO axial diameters, CSVs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import pdist

from autoseg.errors import AutosegError, ImageReadError
from autoseg.evaluation.clinical import (
    LESION_COLUMNS,
    VOLUME_COLUMNS,
    axial_axis,
    longest_axial_diameter,
    measure_case,
    measure_folder,
)
from autoseg.evaluation.metrics import EvaluationError
from autoseg.io.image import Geometry, read_label, write_label

SPACING = (0.5, 1.0, 3.0)  # ITK order (x, y, z): array order (3.0, 1.0, 0.5); a voxel is 1.5 mm^3
ORIGIN = (10.0, -20.0, 30.0)
FLIP_XY = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # RAS-stored image read in LPS: x and y flipped
Z_FIRST = (0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0)  # ITK axis 0 runs along world z (array axis 2)


def geom(direction=None, spacing=SPACING, origin=ORIGIN) -> Geometry:
    return Geometry(spacing, origin, direction or tuple(np.eye(3).ravel().tolist()))


def roundtrip(tmp_path, seg, geometry, name="case.nii.gz"):
    """Write and read back, so the geometry is the one a file really stores."""
    write_label(tmp_path / name, seg, geometry)
    return read_label(tmp_path / name)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_volume_in_ml_uses_anisotropic_spacing():
    seg = np.zeros((4, 6, 8), np.uint8)
    seg[1, 1:3, 1:6] = 1  # 10 voxels x 1.5 mm^3
    m = measure_case(seg, geom(), {"tumour": 1}, case_id="c")
    assert m.volumes[0].voxels == 10
    assert m.volumes[0].volume_ml == pytest.approx(10 * 1.5 / 1000)


def test_lesions_are_numbered_by_size_largest_first():
    seg = np.zeros((6, 12, 12), np.uint8)
    seg[1, 0, 0] = 1  # smallest lesion first in raster order
    seg[2:5, 5:8, 5:8] = 1  # 27 voxels
    seg[5, 10:12, 10] = 1  # 2 voxels
    m = measure_case(seg, geom(), {"tumour": (1,)}, case_id="c")
    assert [(les.lesion, les.voxels) for les in m.lesions] == [(1, 27), (2, 2), (3, 1)]
    assert m.lesions[0].volume_ml == pytest.approx(27 * 1.5 / 1000)
    assert (m.lesions[1].longest_axial_diameter_mm, m.lesions[1].slice) == (pytest.approx(1.0), 5)
    single = m.lesions[2]
    assert (single.longest_axial_diameter_mm, single.slice) == (0.0, 1)
    assert single.centroid_mm == pytest.approx((10.0, -20.0, 33.0))


@pytest.mark.parametrize("direction", [None, FLIP_XY, Z_FIRST])
def test_centroid_is_in_world_mm_and_matches_itk(tmp_path, direction):
    seg = np.zeros((5, 6, 7), np.uint8)
    seg[2, 3, 4] = 1
    seg[2, 3, 5] = 1  # centroid at array index (2, 3, 4.5)
    img = roundtrip(tmp_path, seg, geom(direction))
    les = measure_case(img.array, img.geometry, {"t": 1}, case_id="c").lesions[0]
    itk = sitk.ReadImage(str(tmp_path / "case.nii.gz"))
    expected = itk.TransformContinuousIndexToPhysicalPoint((4.5, 3.0, 2.0))  # ITK index order (x, y, z)
    assert les.centroid_mm == pytest.approx(expected)
    if direction is None:  # by hand: origin + spacing * index
        assert les.centroid_mm == pytest.approx((10.0 + 4.5 * 0.5, -20.0 + 3.0, 30.0 + 2 * 3.0))
    if direction == FLIP_XY:
        assert les.centroid_mm == pytest.approx((10.0 - 4.5 * 0.5, -20.0 - 3.0, 30.0 + 2 * 3.0))


def test_axial_axis_follows_the_direction_matrix():
    assert axial_axis(geom()) == 0
    assert axial_axis(geom(FLIP_XY)) == 0
    assert axial_axis(geom(Z_FIRST)) == 2
    assert axial_axis(Geometry.identity(2)) is None


def test_diameter_of_a_line_is_length_minus_one_times_spacing_and_ignores_z():
    seg = np.zeros((10, 12, 30), np.uint8)
    seg[4, 6, 2:22] = 1  # 20 voxels along x (0.5 mm) in slice 4
    seg[0:10, 3, 3] = 2  # 10 voxels along z only: no in-plane extent
    m = measure_case(seg, geom(), {"x_line": 1, "z_line": 2}, case_id="c")
    x_line, z_line = m.lesions
    assert x_line.longest_axial_diameter_mm == pytest.approx(19 * 0.5)
    assert x_line.slice == 4
    assert z_line.longest_axial_diameter_mm == 0.0
    assert z_line.voxels == 10


def test_diameter_of_a_disc_is_two_radii_in_the_slice_where_it_is_widest():
    r = 10
    yy, xx = np.mgrid[-12:13, -12:13]
    seg = np.zeros((12, 25, 25), np.uint8)
    for z in range(1, 11):  # a cylinder 30 mm tall: the height never counts
        seg[z][yy**2 + xx**2 <= 4**2] = 1
    seg[7][yy**2 + xx**2 <= r**2] = 1
    geometry = geom(spacing=(0.8, 0.8, 3.0))
    les = measure_case(seg, geometry, {"t": 1}, case_id="c").lesions[0]
    assert les.longest_axial_diameter_mm == pytest.approx(2 * r * 0.8)
    assert les.slice == 7


def test_diameter_uses_the_axial_plane_of_a_permuted_image():
    seg = np.zeros((20, 8, 6), np.uint8)  # Z_FIRST: array axis 2 is world z, axes 0 and 1 are in-plane
    seg[2:17, 3, 4] = 1  # 15 voxels along array axis 0 (world x, 3.0 mm), one axial slice (index 4)
    m = measure_case(seg, geom(Z_FIRST), {"t": 1}, case_id="c")
    assert m.axial_axis == 2
    assert m.lesions[0].longest_axial_diameter_mm == pytest.approx(14 * 3.0)
    assert m.lesions[0].slice == 4


def test_diameter_matches_brute_force_on_random_blobs():
    rng = np.random.default_rng(0)
    for _ in range(30):
        mask = rng.random((4, 9, 11)) < rng.uniform(0.02, 0.6)
        spacing = rng.uniform(0.3, 2.0, size=2)
        per_slice = [pdist(np.argwhere(s) * spacing).max() if s.sum() > 1 else (0.0 if s.any() else -1.0)
                     for s in mask]
        got, k = longest_axial_diameter(mask, spacing)
        assert got == pytest.approx(max(per_slice))
        assert k == next(i for i, d in enumerate(per_slice) if d == pytest.approx(got))


def test_region_joins_its_labels_into_one_lesion():
    seg = np.zeros((3, 6, 10), np.uint8)
    seg[1, 2, 1:3] = 1
    seg[1, 2, 3:5] = 2
    seg[1, 2, 5:7] = 3
    m = measure_case(seg, geom(), {"whole": (1, 2, 3), "core": (2, 3), "enh": 3}, case_id="c")
    assert [v.voxels for v in m.volumes] == [6, 4, 2]
    whole = [les for les in m.lesions if les.class_name == "whole"]
    assert len(whole) == 1 and whole[0].longest_axial_diameter_mm == pytest.approx(5 * 0.5)


def test_connectivity_full_by_default_faces_on_request():
    seg = np.zeros((3, 3, 3), np.uint8)
    seg[0, 0, 0] = seg[1, 1, 1] = 1  # corner neighbours
    assert len(measure_case(seg, geom(), {"t": 1}, case_id="c").lesions) == 1
    assert len(measure_case(seg, geom(), {"t": 1}, case_id="c", connectivity=1).lesions) == 2
    with pytest.raises(EvaluationError, match="connectivity"):
        measure_case(seg, geom(), {"t": 1}, case_id="c", connectivity=4)


def test_empty_class_has_zero_volume_and_no_lesion():
    seg = np.zeros((3, 4, 4), np.uint8)
    seg[1, 1, 1] = 1
    m = measure_case(seg, geom(), {"a": 1, "b": 2}, case_id="c")
    assert [(v.class_name, v.voxels, v.volume_ml) for v in m.volumes] == [("a", 1, 0.0015), ("b", 0, 0.0)]
    assert [les.class_name for les in m.lesions] == ["a"]
    empty = measure_case(np.zeros((3, 4, 4), np.uint8), geom(), {"a": 1}, case_id="c")
    assert empty.volumes[0].voxels == 0 and empty.lesions == []


def test_2d_image_measures_the_whole_plane(tmp_path):
    seg = np.zeros((10, 12), np.uint8)
    seg[2, 1:9] = 1  # 8 pixels along x
    img = roundtrip(tmp_path, seg, Geometry((0.5, 2.0), (1.0, 2.0), (1.0, 0.0, 0.0, 1.0)), "case.nii.gz")
    m = measure_case(img.array, img.geometry, {"t": 1}, case_id="c")
    les = m.lesions[0]
    assert les.longest_axial_diameter_mm == pytest.approx(7 * 0.5) and les.slice is None
    assert les.centroid_mm == pytest.approx((1.0 + 4.5 * 0.5, 2.0 + 2 * 2.0))
    row = m.lesion_rows()[0]
    assert row[LESION_COLUMNS.index("centroid_z_mm")] == "" and row[-1] == ""


def make_folder(tmp_path):
    folder = tmp_path / "segs"
    folder.mkdir()
    a = np.zeros((6, 10, 10), np.uint8)
    a[1, 1:4, 1:4] = 1  # 9 voxels
    a[4, 6:8, 6:9] = 3  # 6 voxels
    b = np.zeros((6, 10, 10), np.uint8)
    write_label(folder / "case_a.nii.gz", a, geom())
    write_label(folder / "case_b.nii.gz", b, geom())
    np.savez(folder / "case_a.npz", probabilities=np.zeros(3))
    (folder / "case_a.json").write_text("{}")
    (folder / "old.csv").write_text("x\n")
    (folder / "sub").mkdir()
    write_label(folder / "sub" / "case_c.nii.gz", a, geom())
    return folder


def test_measure_folder_writes_volumes_and_lesions_csv(tmp_path):
    folder = make_folder(tmp_path)
    paths = measure_folder(folder, classes={"whole": (1, 2, 3), "enh": 3}, output_dir=tmp_path / "out",
                           progress=False)
    volumes, lesions = read_csv(paths.volumes), read_csv(paths.lesions)
    assert volumes == [list(VOLUME_COLUMNS),
                       ["case_a", "whole", "15", "0.0225"], ["case_a", "enh", "6", "0.009"],
                       ["case_b", "whole", "0", "0.0"], ["case_b", "enh", "0", "0.0"]]
    assert lesions[0] == list(LESION_COLUMNS)
    assert [r[:5] for r in lesions[1:]] == [["case_a", "whole", "1", "9", "0.0135"],
                                            ["case_a", "whole", "2", "6", "0.009"],
                                            ["case_a", "enh", "1", "6", "0.009"]]
    first = dict(zip(LESION_COLUMNS, lesions[1], strict=True))
    assert float(first["centroid_x_mm"]) == pytest.approx(10.0 + 2 * 0.5)
    assert float(first["centroid_y_mm"]) == pytest.approx(-20.0 + 2)
    assert float(first["centroid_z_mm"]) == pytest.approx(30.0 + 3.0)
    assert float(first["longest_axial_diameter_mm"]) == pytest.approx(np.hypot(1.0, 2.0))
    assert first["slice"] == "1"


def test_measure_folder_classes_from_dataset_json_or_from_the_files(tmp_path):
    folder = make_folder(tmp_path)
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "whole": [1, 2, 3],
                              "enh": 3}, "numTraining": 2, "file_ending": ".nii.gz"}))
    from_json = read_csv(measure_folder(folder, dataset_json=ds, progress=False).volumes)
    assert [r[1] for r in from_json[1:3]] == ["whole", "enh"]
    found = read_csv(measure_folder(folder, progress=False).volumes)  # every value present, 0 where absent
    assert found[1:] == [["case_a", "1", "9", "0.0135"], ["case_a", "3", "6", "0.009"],
                         ["case_b", "1", "0", "0.0"], ["case_b", "3", "0", "0.0"]]


def test_measure_folder_in_worker_processes_gives_the_same_tables(tmp_path):
    folder = make_folder(tmp_path)
    one = measure_folder(folder, classes={"t": 1}, output_dir=tmp_path / "one", progress=False)
    two = measure_folder(folder, classes={"t": 1}, output_dir=tmp_path / "two", jobs=2, progress=False)
    assert one.lesions.read_text() == two.lesions.read_text()


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text("{}")
    with pytest.raises(EvaluationError, match="empty: no image files"):
        measure_folder(tmp_path / "empty", classes={"t": 1}, progress=False)
    with pytest.raises(EvaluationError, match="not found"):
        measure_folder(tmp_path / "missing", classes={"t": 1}, progress=False)


def test_unreadable_file_is_an_error_naming_it(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "broken.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(ImageReadError, match="broken.nii.gz") as info:
        measure_folder(folder, classes={"t": 1}, progress=False)
    assert isinstance(info.value, AutosegError)
    assert not (folder / "lesions.csv").exists()
