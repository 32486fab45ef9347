"""Image I/O: geometry and voxels survive a round trip; broken files fail with the file's name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import autoseg.io.image as image_mod
from autoseg.errors import ImageReadError, ImageWriteError
from autoseg.io.image import Geometry, read_header, read_image, read_label, write_image, write_label

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "pyradiomics_cases"

# A flip + axis permutation: stored exactly by every format (values are exact in float32).
FLIP = Geometry(spacing=(0.5, 1.25, 3.0), origin=(-100.5, 20.25, 7.0),
                direction=(0.0, 0.0, 1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
_T = 0.3
ROTATED = Geometry(spacing=(0.7, 1.3, 2.9), origin=(-12.345678901, 3.3, 100.1),
                   direction=(np.cos(_T), -np.sin(_T), 0.0, np.sin(_T), np.cos(_T), 0.0, 0.0, 0.0, -1.0))
VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _volume(seed: int = 0, shape=(5, 6, 7)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 30, size=shape).astype(np.float32)


@pytest.mark.parametrize("ending", VOLUME_ENDINGS)
def test_volume_round_trip_keeps_values_and_flipped_geometry_bit_for_bit(tmp_path, ending):
    arr = _volume()
    write_image(tmp_path / f"img{ending}", arr, FLIP)
    back = read_image(tmp_path / f"img{ending}")
    assert back.array.shape == (1, *arr.shape) and back.array.dtype == np.float32
    assert np.array_equal(back.array[0], arr)
    assert back.geometry == FLIP
    assert read_header(tmp_path / f"img{ending}").shape == arr.shape


@pytest.mark.parametrize("ending", VOLUME_ENDINGS)
def test_rotated_geometry_survives_within_file_precision(tmp_path, ending):
    write_image(tmp_path / f"a{ending}", _volume(), ROTATED)
    first = read_image(tmp_path / f"a{ending}").geometry
    # NIfTI stores float32, NRRD stores spacing x direction as text: rounding, but no visible change.
    assert first.differences(ROTATED, spacing_rtol=1e-6, origin_atol=1e-5, direction_atol=1e-6) == []
    write_image(tmp_path / f"b{ending}", _volume(), first)
    second = read_image(tmp_path / f"b{ending}").geometry
    if ending == ".nrrd":  # spacing and direction are recomputed from their product: last-bit wobble
        for a, b in zip(second.to_json().values(), first.to_json().values(), strict=True):
            assert np.allclose(a, b, rtol=1e-14, atol=1e-15)
    else:  # what was read from a file is written back bit for bit
        assert second == first
    if ending in (".mha", ".mhd"):  # float64 text with full precision
        assert first == ROTATED


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_integer_types_are_kept_when_asked(tmp_path, ending):
    arr = np.random.default_rng(1).integers(-1000, 3000, size=(4, 5, 6)).astype(np.int16)
    write_image(tmp_path / f"ct{ending}", arr, FLIP)
    back = read_image(tmp_path / f"ct{ending}", dtype=None)
    assert back.array.dtype == np.int16 and np.array_equal(back.array[0], arr)


@pytest.mark.parametrize("ending", [".png", ".tif", ".tiff"])
def test_2d_grayscale_round_trip(tmp_path, ending):
    arr = np.random.default_rng(2).integers(0, 256, size=(9, 11)).astype(np.uint8)
    write_image(tmp_path / f"slice{ending}", arr, Geometry.identity(2))
    back = read_image(tmp_path / f"slice{ending}", dtype=None)
    assert back.array.shape == (1, 9, 11) and back.array.dtype == np.uint8
    assert np.array_equal(back.array[0], arr)
    assert back.geometry.ndim == 2


@pytest.mark.parametrize("ending", [".png", ".tif"])
def test_2d_labels_are_uint8(tmp_path, ending):
    seg = np.zeros((8, 8), dtype=np.int64)
    seg[2:5, 3:6] = 2
    write_label(tmp_path / f"seg{ending}", seg, Geometry.identity(2))
    back = read_label(tmp_path / f"seg{ending}")
    assert back.array.dtype == np.uint8 and back.array.shape == (8, 8) and np.array_equal(back.array, seg)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_vector_image_reads_channels_first(tmp_path, ending):
    arr = np.stack([_volume(s) for s in range(3)])
    write_image(tmp_path / f"vec{ending}", arr, FLIP)
    back = read_image(tmp_path / f"vec{ending}")
    assert back.array.shape == (3, 5, 6, 7) and np.array_equal(back.array, arr)
    assert back.geometry == FLIP
    assert read_header(tmp_path / f"vec{ending}").n_components == 3


def test_4d_nifti_gives_channels_with_3d_geometry(tmp_path):
    vols = [_volume(s) for s in range(4)]
    img4 = sitk.JoinSeries([sitk.GetImageFromArray(v) for v in vols])
    direction4 = np.eye(4)
    direction4[:3, :3] = np.reshape(FLIP.direction, (3, 3))
    img4.SetSpacing((*FLIP.spacing, 1.0))
    img4.SetOrigin((*FLIP.origin, 0.0))
    img4.SetDirection(tuple(direction4.ravel()))
    sitk.WriteImage(img4, str(tmp_path / "brats.nii.gz"))
    back = read_image(tmp_path / "brats.nii.gz")
    assert back.array.shape == (4, 5, 6, 7)
    assert np.array_equal(back.array, np.stack(vols))
    assert back.geometry == FLIP and all(type(d) is float for d in back.geometry.direction)


@pytest.mark.parametrize(("top", "dtype"), [(3, np.uint8), (255, np.uint8), (256, np.uint16), (1000, np.uint16)])
def test_label_type_follows_largest_label(tmp_path, top, dtype):
    seg = np.zeros((3, 4, 5), dtype=np.int64)
    seg[1, 2, 3] = top
    write_label(tmp_path / "seg.nii.gz", seg, FLIP)
    back = read_label(tmp_path / "seg.nii.gz")
    assert back.array.dtype == dtype and back.array.shape == seg.shape and int(back.array.max()) == top


def test_negative_labels_are_refused(tmp_path):
    with pytest.raises(ImageWriteError, match="negative label"):
        write_label(tmp_path / "seg.nii.gz", -np.ones((2, 2, 2), dtype=np.int16), FLIP)


def test_write_leaves_no_temporary_file(tmp_path):
    write_image(tmp_path / "a.nii.gz", _volume(), FLIP)
    write_label(tmp_path / "b.nrrd", np.ones((5, 6, 7), np.uint8), FLIP)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nrrd"]


def test_failed_write_leaves_neither_half_file_nor_temp_and_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "img.nii.gz"
    write_image(target, _volume(0), FLIP)
    before = target.read_bytes()

    def crash(image, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(image_mod.sitk, "WriteImage", crash)
    with pytest.raises(ImageWriteError, match="img.nii.gz"):
        write_image(target, _volume(1), FLIP)
    with pytest.raises(ImageWriteError):
        write_image(tmp_path / "new.nii.gz", _volume(1), FLIP)
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]
    assert target.read_bytes() == before


def test_shape_not_matching_geometry_is_refused(tmp_path):
    with pytest.raises(ImageWriteError, match="does not fit a 3D geometry"):
        write_image(tmp_path / "x.nii.gz", np.zeros((2, 2, 3, 4, 5), np.float32), FLIP)
    assert list(tmp_path.iterdir()) == []


def _truncated_gz(tmp_path: Path) -> Path:
    write_image(tmp_path / "good.nii.gz", _volume(shape=(20, 20, 20)), FLIP)
    data = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.nii.gz"


def _truncated_nii(tmp_path: Path) -> Path:
    write_image(tmp_path / "good.nii", _volume(shape=(20, 20, 20)), FLIP)
    data = (tmp_path / "good.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-100])
    return tmp_path / "cut.nii"


def _text_as_nifti(tmp_path: Path) -> Path:
    (tmp_path / "notes.nii.gz").write_text("patient notes, not an image\n")
    return tmp_path / "notes.nii.gz"


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty.nrrd").touch()
    return tmp_path / "empty.nrrd"


def _unsupported(tmp_path: Path) -> Path:
    (tmp_path / "scan.jpg").write_bytes(b"\xff\xd8\xff")
    return tmp_path / "scan.jpg"


@pytest.mark.parametrize(("make", "words"), [
    (lambda tmp: tmp / "missing.nii.gz", "not found"),
    (_empty, "empty"),
    (_truncated_gz, "truncated"),
    (_truncated_nii, "truncated"),
    (_text_as_nifti, "cannot be read"),
    (_unsupported, "unsupported file type"),
])
@pytest.mark.parametrize("reader", [read_image, read_label])
def test_unreadable_files_raise_read_error_naming_the_file(tmp_path, make, words, reader):
    path = make(tmp_path)
    with pytest.raises(ImageReadError) as err:
        reader(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_truncated_file_is_not_read_as_zeros(tmp_path):
    """ITK silently zero-fills a truncated NIfTI; autoseg must refuse it instead."""
    with pytest.raises(ImageReadError, match="re-copy"):
        read_image(_truncated_gz(tmp_path))


def test_multi_member_gzip_nifti_still_reads(tmp_path):
    import gzip

    arr = _volume(shape=(10, 10, 10))
    write_image(tmp_path / "plain.nii", arr, FLIP)
    raw = (tmp_path / "plain.nii").read_bytes()
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert np.array_equal(read_image(tmp_path / "multi.nii.gz").array[0], arr)


def test_header_errors_name_the_file(tmp_path):
    path = _text_as_nifti(tmp_path)
    with pytest.raises(ImageReadError, match="notes.nii.gz"):
        read_header(path)


def test_rgb_is_not_a_label_map(tmp_path):
    rgb = np.zeros((3, 6, 6), np.uint8)
    write_image(tmp_path / "rgb.png", rgb, Geometry.identity(2))
    with pytest.raises(ImageReadError, match="one value per voxel"):
        read_label(tmp_path / "rgb.png")


@pytest.mark.parametrize("case", ["brain1", "brain2", "breast1"])
def test_real_nrrd_cases_round_trip_exactly(tmp_path, case):
    image_file, label_file = REAL / f"{case}_image.nrrd", REAL / f"{case}_label.nrrd"
    if not image_file.is_file():
        pytest.skip("shared real cases absent")
    img = read_image(image_file, dtype=None)
    seg = read_label(label_file)
    write_image(tmp_path / "img.nrrd", img.array, img.geometry)
    write_label(tmp_path / "seg.nrrd", seg.array, seg.geometry)
    img2, seg2 = read_image(tmp_path / "img.nrrd", dtype=None), read_label(tmp_path / "seg.nrrd")
    assert img2.geometry == img.geometry and seg2.geometry == seg.geometry
    assert img2.array.dtype == img.array.dtype and np.array_equal(img2.array, img.array)
    assert seg2.array.dtype == np.uint8 and np.array_equal(seg2.array, seg.array)
    assert min(img.geometry.spacing) < max(img.geometry.spacing)  # real anisotropic slices
