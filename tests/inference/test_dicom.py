"""DICOM in and out: series folders predict exactly like the same voxels in NIfTI, broken series are refused with one
line, DICOM-SEG round-trips through highdicom, and probability images keep the input's geometry."""

from __future__ import annotations

import json
import tracemalloc

import numpy as np
import pytest

from autoseg.api import plan
from autoseg.cli import main as cli
from autoseg.data.dicom import slice_positions, write_dicom_series
from autoseg.errors import DicomSeriesError
from autoseg.inference.export import LabelLayout, export_segmentation, write_probability_images
from autoseg.io.check import check_dataset
from autoseg.io.dataset import load_dataset
from autoseg.io.dicom import series_files
from autoseg.io.image import Geometry, read_header, read_image, read_label, write_image

ROTATED = (0.8, -0.6, 0.0, 0.6, 0.8, 0.0, 0.0, 0.0, 1.0)


def _predict(capsys, *args):
    code = cli(["-q", "predict", *map(str, args), "--device", "cpu", "--no-amp", "--no-drift-check", "--no-tta"])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _series_and_nifti(src, case_id, dcm_root, nii_root, seed):
    """The case's channels as int16 DICOM series ``dcm_root/<case>_000k/`` and the same voxels and geometry as
    ``nii_root/<case>_000k.nii.gz``."""
    for k, path in enumerate(sorted(src.glob(f"{case_id}_*.nii.gz"))):
        img = read_image(path)
        vox = np.round(img.array[0] * 100).astype(np.int16)
        write_dicom_series(dcm_root / f"{case_id}_{k:04d}", vox, img.geometry, seed=seed, description=f"ch{k}")
        write_image(nii_root / f"{case_id}_{k:04d}.nii.gz", vox, img.geometry)


def test_dicom_route_predicts_like_nifti_and_writes_a_dicom_seg_that_round_trips(trained, tmp_path, capsys):
    import highdicom as hd
    import pydicom

    ds, wd, plans = trained
    dcm, nii = tmp_path / "dcm", tmp_path / "nii"
    _series_and_nifti(ds.root / "imagesTs", "test_000", dcm, nii, seed=0)
    _predict(capsys, "-i", nii, "-o", tmp_path / "from_nii", "--workdir", wd, "--save-probabilities", "npz", "nifti")
    out = _predict(capsys, "-i", dcm, "-o", tmp_path / "from_dcm", "--workdir", wd, "--output-format", "dicom-seg")
    assert "1 case(s) predicted" in out
    a, b = read_label(tmp_path / "from_nii" / "test_000.nii.gz"), read_label(tmp_path / "from_dcm" / "test_000.nii.gz")
    assert np.array_equal(a.array, b.array) and a.geometry == b.geometry and (a.array > 0).any()
    pred = read_label(tmp_path / "from_dcm" / "test_000.nii.gz").array
    source = [pydicom.dcmread(f) for f in series_files(dcm / "test_000_0000")]
    seg = hd.seg.segread(tmp_path / "from_dcm" / "test_000.dcm")
    names = [n for n in plans.labels if n != "background"]
    assert [seg.get_segment_description(i + 1).SegmentLabel for i in range(len(names))] == names
    assert seg.get_segment_description(1).SegmentAlgorithmName.startswith("autoseg 3d_fullres")
    uids = [s.SOPInstanceUID for s in source]
    voxels = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids,
                                               segment_numbers=list(range(1, len(names) + 1)))
    for i, name in enumerate(names):
        values = plans.labels[name] if isinstance(plans.labels[name], list | tuple) else [plans.labels[name]]
        assert np.array_equal(voxels[..., i] > 0, np.isin(pred, values)), name
    position = {s.SOPInstanceUID: [float(v) for v in s.ImagePositionPatient] for s in source}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient], position[ref])
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(shared.PlaneOrientationSequence[0].ImageOrientationPatient, source[0].ImageOrientationPatient)
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, source[0].PixelSpacing)
    # probability images: one per region, the input's geometry, probabilities
    geometry = read_header(nii / "test_000_0000.nii.gz").geometry
    maps = sorted((tmp_path / "from_nii" / "probabilities").glob("test_000_*.nii.gz"))
    assert len(maps) == len(names) and (tmp_path / "from_nii" / "test_000.npz").is_file()
    for path in maps:
        img = read_image(path)
        assert img.geometry == geometry and img.array.shape[1:] == pred.shape
        assert img.array.min() >= 0 and img.array.max() <= 1


def test_dataset_with_series_folders_checks_and_dicom_seg_refuses_file_inputs(trained, tmp_path, capsys):
    ds, wd, _ = trained
    root = tmp_path / "Dataset009_Dcm"
    (root / "labelsTr").mkdir(parents=True)
    spec = json.loads((ds.root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**spec, "numTraining": 1}))
    case = ds.cases[0]
    for k, path in enumerate(case.images):
        img = read_image(path)
        write_dicom_series(root / "imagesTr" / f"{case.case_id}_{k:04d}", np.round(img.array[0]).astype(np.int16),
                           img.geometry, description=f"ch{k}")
    (root / "labelsTr" / case.label.name).write_bytes(case.label.read_bytes())
    loaded = load_dataset(root)
    assert [c.images for c in loaded.cases] == [tuple(root / "imagesTr" / f"{case.case_id}_{k:04d}" for k in (0, 1))]
    code = cli(["-q", "check", str(root)])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    plans = plan(root, workdir=tmp_path / "work", preset="cpu", progress=False)  # fingerprint and plans from DICOM
    assert plans.configurations["3d_fullres"].spacing == trained[2].configurations["3d_fullres"].spacing
    img = read_image(case.images[0])
    tilted = slice_positions(img.geometry, img.array.shape[1]) + np.outer(np.arange(img.array.shape[1]), [0.2, 0, 0])
    for k in (0, 1):
        write_dicom_series(root / "imagesTr" / f"tilted_{k:04d}", np.round(img.array[0]).astype(np.int16),
                           img.geometry, positions=tilted, seed=7, description=f"ch{k}")
    (root / "labelsTr" / "tilted.nii.gz").write_bytes(case.label.read_bytes())
    (root / "dataset.json").write_text(json.dumps({**spec, "numTraining": 2}))
    errors = check_dataset(root, progress=False).errors
    assert [(e.kind, e.case_id) for e in errors] == [("dicom_series", "tilted")] * 2
    assert "gantry tilt of" in errors[0].message and "dcm2niix" in errors[0].fix
    code = cli(["-q", "predict", "-i", str(ds.root / "imagesTs"), "-o", str(tmp_path / "o"), "--workdir", str(wd),
                "--output-format", "dicom-seg"])
    err = capsys.readouterr().err
    assert code == 2 and "dicom-seg needs DICOM series inputs" in err and len(err.strip().splitlines()) == 1


def _broken(tmp_path, kind):
    arr = np.arange(6 * 8 * 9, dtype=np.int16).reshape(6, 8, 9)
    geometry = Geometry((0.7, 0.8, 2.5), (10.0, -5.0, 3.0), ROTATED)
    pos = slice_positions(geometry, 6)
    normal = np.asarray(ROTATED).reshape(3, 3)[:, 2]
    folder = tmp_path / kind
    if kind == "tilted":
        write_dicom_series(folder, arr, geometry, positions=pos + np.outer(np.arange(6), [0.4, 0.0, 0.0]))
    elif kind == "gapped":
        keep = [0, 1, 2, 4, 5]
        write_dicom_series(folder, arr[keep], geometry, positions=pos[keep])
    elif kind == "uneven":
        pos[3] += 0.8 * normal
        write_dicom_series(folder, arr, geometry, positions=pos)
    elif kind == "mixed":
        iop = [0.8, 0.6, 0.0, -0.6, 0.8, 0.0]
        write_dicom_series(folder, arr, geometry, orientations=[iop] * 2 + [[1, 0, 0, 0, 1, 0]] + [iop] * 3)
    elif kind == "two_series":
        write_dicom_series(folder, arr, geometry, description="a", prefix="a")
        write_dicom_series(folder, arr, geometry, description="b", prefix="b")
    else:
        write_dicom_series(folder, arr, geometry)
    return folder, arr, geometry


@pytest.mark.parametrize(("kind", "words"), [
    ("tilted", ["gantry tilt of", "slice_0000.dcm", "slice_0005.dcm", "dcm2niix"]),
    ("gapped", ["slice(s) missing", "slice_0002.dcm -> slice_0003.dcm (5 mm)", "2.5 mm", "Fix:"]),
    ("uneven", ["unevenly spaced", "slice_0002.dcm -> slice_0003.dcm (3.3 mm)", "Fix:"]),
    ("mixed", ["different orientations", "slice_0002.dcm", "Fix:"]),
    ("two_series", ["2 DICOM series in one folder", "/<SeriesInstanceUID>", "its own folder"]),
])
def test_broken_series_are_refused_with_one_line(tmp_path, kind, words):
    folder, _, _ = _broken(tmp_path, kind)
    for read in (read_header, read_image):
        with pytest.raises(DicomSeriesError) as err:
            read(folder)
        text = str(err.value)
        assert text.startswith(str(folder)) and "\n" not in text
        assert all(w in text for w in words), text


def test_regular_series_reads_with_its_geometry_header_and_voxels_agreeing(tmp_path):
    folder, arr, geometry = _broken(tmp_path, "regular")
    img, hdr = read_image(folder, dtype=None), read_header(folder)
    assert np.array_equal(img.array[0], arr) and img.array.dtype == np.int16
    assert img.geometry == geometry == hdr.geometry and hdr.shape == arr.shape


def _props(geometry):
    from autoseg.preprocessing.properties import CaseProperties

    return CaseProperties(case_id="x", geometry=geometry, file_ndim=3, spacing_t=(2.0, 0.7, 0.7),
                          shape_before_crop_t=(10, 24, 20), bbox_t=((1, 9), (2, 22), (0, 20)),
                          shape_after_crop_t=(8, 20, 20), target_spacing_t=(2.0, 1.4, 1.4),
                          shape_after_resampling_t=(8, 10, 10), separate_axis=None, labels_present=())


class _Cfg:
    class resampling:  # noqa: N801 - a stand-in record
        order_probabilities, order_z, separate_z_threshold, force_separate_z = 1, 0, 3.0, None


class _Plans:
    transpose_backward = (0, 1, 2)


def test_softmax_probability_images_keep_the_geometry_and_sum_to_one(tmp_path, rng=np.random.default_rng(4)):
    geometry = Geometry((0.7, 0.7, 2.0), (3.0, -2.0, 7.5), ROTATED)
    logits = rng.normal(size=(3, 8, 10, 10)).astype(np.float32)
    seg, probs = export_segmentation(logits, _props(geometry), _Plans, _Cfg, LabelLayout(3), return_probabilities=True)
    paths = write_probability_images(tmp_path, tmp_path / "x.nii.gz", probs, ["background", "liver", "a/b"], geometry)
    assert [p.name for p in paths] == ["x_background.nii.gz", "x_liver.nii.gz", "x_a_b.nii.gz"]
    maps = [read_image(p) for p in paths]
    assert all(not geometry.differences(m.geometry) and m.array.shape == (1, *seg.shape) for m in maps)
    assert np.allclose(sum(m.array[0] for m in maps), 1, atol=4e-3)
    assert np.mean(np.argmax(np.stack([m.array[0] for m in maps]), 0) == seg) > 0.99  # float16 ties aside


@pytest.mark.parametrize("n_outputs", [2, 8])
def test_probability_images_hold_one_float32_volume_at_a_time(tmp_path, n_outputs):
    """Peak numpy memory while writing = one output's float32 volume (4 bytes x voxels), whatever the number of
    outputs (ITK's own copy, outside numpy, is one more such volume: 8 bytes x voxels in all)."""
    shape = (16, 64, 64)
    probs = np.full((n_outputs, *shape), 1.0 / n_outputs, np.float16)
    geometry = Geometry.identity(3)
    tracemalloc.start()
    try:
        write_probability_images(tmp_path, tmp_path / "c.nii.gz", probs, [f"k{i}" for i in range(n_outputs)],
                                 geometry)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_volume = 4 * int(np.prod(shape))
    assert one_volume <= peak < 1.5 * one_volume


def test_predict_inputs_name_series_folders_as_cases_or_channels(tmp_path):
    from autoseg.inference.inputs import collect_cases

    arr, geometry = np.zeros((3, 4, 5), np.int16), Geometry.identity(3)
    for name in ("scanA_0000", "scanA_0001", "scanB_0000", "scanB_0001"):
        write_dicom_series(tmp_path / "study" / name, arr, geometry, description=name)
    write_image(tmp_path / "study" / "old_predictions" / "scanA.nii.gz", arr, geometry)  # not a series: ignored
    cases = collect_cases([tmp_path / "study"], ["T1", "T2"])
    assert [(c.case_id, c.ending, [p.name for p in c.images]) for c in cases] == [
        ("scanA", ".nii.gz", ["scanA_0000", "scanA_0001"]), ("scanB", ".nii.gz", ["scanB_0000", "scanB_0001"])]
    for name in ("t2", "t1"):
        write_dicom_series(tmp_path / name, arr, geometry, description=name)
    pair = collect_cases([tmp_path / "t1", tmp_path / "t2"], ["T1", "T2"])  # unsuffixed: channels in order given
    assert [(c.case_id, c.images) for c in pair] == [("t1", (tmp_path / "t1", tmp_path / "t2"))]
    one = collect_cases([tmp_path / "study" / "scanA_0000"], ["CT"])
    assert [(c.case_id, c.images) for c in one] == [("scanA", (tmp_path / "study" / "scanA_0000",))]


def test_a_series_of_a_folder_holding_several_is_chosen_by_its_uid(tmp_path):
    from autoseg.inference.inputs import collect_cases
    from autoseg.io.dicom import series_uids

    folder, arr, geometry = _broken(tmp_path, "two_series")
    uids = series_uids(folder)
    assert len(uids) == 2
    for uid in uids:
        img = read_image(folder / uid, dtype=None)
        assert np.array_equal(img.array[0], arr) and img.geometry == geometry == read_header(folder / uid).geometry
    cases = collect_cases([folder], ["CT"])  # one case per series, named by its UID
    assert sorted((c.case_id, c.images) for c in cases) == sorted((u, (folder / u,)) for u in uids)
    with pytest.raises(DicomSeriesError, match="no series with SeriesInstanceUID 1.2.3"):
        read_header(folder / "1.2.3")
