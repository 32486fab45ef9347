"""`autoseg predict` and the notebook Predictor on a tiny trained model: outputs in the input's geometry,
validation reproduced, TTA/step behaviour, input errors, skip/overwrite, cascade, export memory path."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.api import predict
from autoseg.cli import main as cli
from autoseg.errors import ModelNotFoundError
from autoseg.evaluation.dice import dice_scores
from autoseg.inference.export import LabelLayout, export_segmentation, logits_to_labels, probabilities
from autoseg.inference.inputs import PredictionInputError
from autoseg.inference.predictor import Predictor
from autoseg.inference.sliding_window import InferenceError, window_starts
from autoseg.io.image import read_header, read_image, read_label
from autoseg.networks.checkpoint import FINAL
from autoseg.preprocessing.preprocess import read_case
from autoseg.preprocessing.resample import resample_data

FP32 = {"amp": False, "progress": False}


def _run(args, capsys):
    code = cli(["-q", "predict", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_folder_prediction_writes_every_case_then_skips_finished_ones(trained, tmp_path, capsys):
    ds, wd, _ = trained
    out = tmp_path / "pred"
    code, stdout, _ = _run(["-i", ds.root / "imagesTs", "-o", out, "--workdir", wd, "--device", "cpu"], capsys)
    assert code == 0 and "2 case(s) predicted" in stdout
    for cid in ("test_000", "test_001"):
        seg = read_label(out / f"{cid}.nii.gz")
        ref = read_label(ds.root / "labelsTs" / f"{cid}.nii.gz")
        assert seg.array.shape == ref.array.shape and seg.geometry == ref.geometry
        assert set(np.unique(seg.array)) <= {0, 1, 2, 3}
    record = json.loads((out / "prediction.json").read_text())
    assert record["runs"][0]["configuration"] == "3d_fullres" and set(record["cases"]) == {"test_000", "test_001"}
    before = (out / "test_000.nii.gz").stat().st_mtime_ns
    code, stdout, _ = _run(["-i", ds.root / "imagesTs", "-o", out, "--workdir", wd], capsys)
    assert code == 0 and "2 case(s) already predicted, skipped" in stdout
    assert (out / "test_000.nii.gz").stat().st_mtime_ns == before
    code, stdout, _ = _run(["-i", ds.root / "imagesTs" / "test_000_0000.nii.gz", ds.root / "imagesTs" /
                            "test_000_0001.nii.gz", "-o", out, "--workdir", wd, "--overwrite", "--fast"], capsys)
    assert code == 0 and "1 case(s) predicted" in stdout
    assert (out / "test_000.nii.gz").stat().st_mtime_ns != before
    assert json.loads((out / "prediction.json").read_text())["runs"][1]["tta"] is False


def _oblique(angle: float) -> tuple[float, ...]:
    c, s = math.cos(angle), math.sin(angle)
    return (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("ending", [".nii.gz", ".nrrd", ".mha"])
def test_geometry_round_trip_is_exact_for_oblique_images(trained, tmp_path, ending):
    ds, wd, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    for ch in (0, 1):
        img = sitk.ReadImage(str(ds.root / "imagesTs" / f"test_001_{ch:04d}.nii.gz"))
        img.SetSpacing((0.9, 1.1, 1.3))
        img.SetOrigin((-12.5, 40.25, 7.125))
        img.SetDirection(_oblique(0.3))
        sitk.WriteImage(img, str(src / f"obl_{ch:04d}{ending}"))
    summary = predict(src, tmp_path / "out", workdir=wd, device="cpu", **FP32)
    out = summary.outputs["obl"]
    assert out.name == f"obl{ending}" and summary.written == ["obl"]
    want, got = read_header(src / f"obl_0000{ending}"), read_header(out)
    assert got.shape == want.shape
    if ending == ".nrrd":  # NRRD stores spacing x direction as one vector: ITK's split of it rounds in the last bit
        for a, b in zip(got.geometry.to_json().values(), want.geometry.to_json().values(), strict=True):
            assert np.allclose(a, b, rtol=0, atol=1e-12)
    else:
        assert got.geometry == want.geometry  # bit for bit
    assert got.pixel_type.startswith("8-bit unsigned")


def test_prediction_reproduces_the_validation_output_and_dice(trained, tmp_path):
    ds, wd, _ = trained
    fold = wd / "models" / "3d_fullres" / "fold_0"
    val = json.loads((fold / "val" / "summary.json").read_text())
    cases = {c.case_id: c for c in ds.cases}
    files = [p for cid in val["cases"] for p in cases[cid].images]
    summary = predict(files, tmp_path / "out", workdir=wd, folds=[0], device="cpu", **FP32)
    assert sorted(summary.written) == sorted(val["cases"])
    for cid, scores in val["cases"].items():
        seg = read_label(summary.outputs[cid]).array
        assert np.array_equal(seg, read_label(fold / "val" / f"{cid}.nii.gz").array)
        ref = read_label(cases[cid].label).array
        dice = dice_scores(seg, ref, [(1, 2, 3), (2, 3), (3,)])
        for name, d in zip(val["classes"], dice, strict=True):
            assert (scores[name] is None and math.isnan(d)) or scores[name] == pytest.approx(d, abs=1e-9)


def test_notebook_predictor_takes_an_array_and_a_spacing(trained):
    ds, wd, _ = trained
    predictor = Predictor.from_workdir(wd, "3d_fullres", folds=[0], device="cpu", amp=False)
    images, _, geometry = read_case(ds.test_cases()[0])
    seg = predictor.predict(images, geometry.array_spacing)
    assert seg.shape == images.shape[1:] and seg.dtype == np.int16
    assert np.array_equal(seg, predictor.predict(images, geometry))  # origin/direction do not matter
    with pytest.raises(InferenceError, match="takes 2 channel"):
        predictor.predict(images[:1], geometry)
    with pytest.raises(ModelNotFoundError, match="trained folds: 0"):
        Predictor.from_workdir(wd, "3d_fullres", folds=[4, 9], device="cpu")


class _Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x):
        self.calls += x.shape[0]
        return self.net(x)


def test_tta_and_step_set_the_number_of_network_passes(trained):
    ds, wd, _ = trained
    images, _, geometry = read_case(ds.test_cases()[0])
    passes, segs = {}, {}
    for tta, step in ((True, 0.5), (False, 0.5), (False, 0.1)):
        p = Predictor.from_workdir(wd, "3d_fullres", folds=[0], device="cpu", tta=tta, step_size=step, amp=False)
        p.networks = [_Counting(n) for n in p.networks]
        segs[tta, step] = p.predict(images, geometry)
        passes[tta, step] = p.networks[0].calls
        grid = p.preprocess(images, geometry).data.shape[1:]
        assert p.networks[0].calls == (8 if tta else 1) * math.prod(
            len(s) for s in window_starts(grid, p.config.patch_size, step))
    assert passes[True, 0.5] == 8 * passes[False, 0.5]  # every flip of 3 axes
    assert passes[False, 0.1] > passes[False, 0.5]  # a smaller step: more, more overlapping windows
    for seg in segs.values():
        assert seg.shape == images.shape[1:] and set(np.unique(seg)) <= {0, 1, 2, 3}


def test_bad_inputs_are_refused_before_anything_is_written(trained, tmp_path):
    ds, wd, _ = trained
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PredictionInputError, match="no image files"):
        predict(empty, out, workdir=wd, progress=False)
    src = tmp_path / "in"
    shutil.copytree(ds.root / "imagesTs", src)
    (src / "test_001_0001.nii.gz").unlink()
    (src / "test_000_0002.nii.gz").write_bytes((src / "test_000_0001.nii.gz").read_bytes())
    with pytest.raises(PredictionInputError) as err:
        predict(src, out, workdir=wd, progress=False)
    msg = str(err.value)
    assert "test_001_0001.nii.gz" in msg and "missing channel" in msg
    assert "test_000_0002.nii.gz" in msg and "takes 2 channel(s)" in msg
    (src / "test_000_0002.nii.gz").unlink()
    shutil.copy(ds.root / "imagesTs" / "test_001_0001.nii.gz", src)
    (src / "test_001_0000.nii.gz").write_bytes(b"not an image at all" * 10)
    with pytest.raises(PredictionInputError, match="test_001_0000.nii.gz"):
        predict(src, out, workdir=wd, progress=False)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(PredictionInputError, match="output folder is the input folder"):
        predict(ds.root / "imagesTs", ds.root / "imagesTs", workdir=wd, progress=False)
    with pytest.raises(ModelNotFoundError, match="no trained model"):
        predict(ds.root / "imagesTs", out, workdir=tmp_path, progress=False)


def test_channel_names_and_spacing_far_from_training_are_checked(trained, tmp_path):
    ds, wd, _ = trained
    src = tmp_path / "Dataset_other" / "imagesTs"
    shutil.copytree(ds.root / "imagesTs", src)
    spec = json.loads((ds.root / "dataset.json").read_text())
    names = spec["channel_names"]
    spec["channel_names"] = {"0": names["1"], "1": names["0"]}
    (src.parent / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(PredictionInputError, match="trained on"):
        predict(src, tmp_path / "out", workdir=wd, progress=False)
    (src.parent / "dataset.json").unlink()
    for p in src.glob("test_000_*"):
        img = sitk.ReadImage(str(p))
        img.SetSpacing((3.0, 1.0, 1.0))
        sitk.WriteImage(img, str(p))
    for p in src.glob("test_001_*"):
        p.unlink()
    seen = []
    predict(src, tmp_path / "out", workdir=wd, progress=False, fast=True, on_warning=seen.append)
    assert len(seen) == 1 and "along x is 3.0x coarser" in seen[0] and "test_000" in seen[0]


def test_single_file_output_and_one_channel_files_without_suffix(tmp_path, planned_factory):
    ds, wd, _ = planned_factory(tmp_path, kind="binary", regions=False, n_channels=1, n_cases=3, n_test=1)
    from autoseg.api import train

    # fold 'all' (one model on every case) needs no 5-fold split, so 3 cases are enough
    train(ds.root, "3d_fullres", "all", workdir=wd, epochs=1, iters_per_epoch=2, val_iters=1, workers=0,
          device="cpu", progress=False, validate=False)
    plain = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(ds.root / "imagesTs" / "test_000_0000.nii.gz")), str(plain))
    summary = predict([plain], tmp_path / "result.mha", workdir=wd, progress=False, **{"amp": False})
    assert summary.outputs == {"scan": tmp_path / "result.mha"}
    assert read_header(tmp_path / "result.mha").shape == read_header(plain).shape


def test_streaming_export_matches_full_resampling_and_probabilities_sum_to_one(rng=np.random.default_rng(3)):
    from autoseg.io.image import Geometry
    from autoseg.preprocessing.properties import CaseProperties

    props = CaseProperties(case_id="x", geometry=Geometry.from_array_spacing((2.0, 0.7, 0.7)), file_ndim=3,
                           spacing_t=(2.0, 0.7, 0.7), shape_before_crop_t=(14, 40, 36),
                           bbox_t=((1, 13), (2, 38), (0, 36)), shape_after_crop_t=(12, 36, 36),
                           target_spacing_t=(2.0, 1.4, 1.4), shape_after_resampling_t=(12, 18, 18),
                           separate_axis=None, labels_present=())

    class _Cfg:
        class resampling:  # noqa: N801 - a stand-in record
            order_probabilities, order_z, separate_z_threshold, force_separate_z = 1, 0, 3.0, None

    class _Plans:
        transpose_backward = (0, 1, 2)

    logits = rng.normal(size=(4, 12, 18, 18)).astype(np.float32)
    layout = LabelLayout(4)
    seg, probs = export_segmentation(logits, props, _Plans, _Cfg, layout, return_probabilities=True)
    full = resample_data(logits, (12, 36, 36), order=1)
    ref = np.zeros((14, 40, 36), np.int16)
    ref[1:13, 2:38, :] = logits_to_labels(full, layout)
    assert np.mean(seg == ref) > 0.999
    assert probs.dtype == np.float16 and np.allclose(probs.astype(np.float32).sum(0), 1, atol=4e-3)
    assert np.allclose(probs[:, 1:13, 2:38], probabilities(full, layout), atol=2e-3)
    assert (probs[0, 0] == 1).all()  # outside the crop: background
    regions = LabelLayout(3, ((1, 2, 3), (2, 3), (3,)), (1, 2, 3))
    seg_r, _ = export_segmentation(logits[:3], props, _Plans, _Cfg, regions)
    assert np.mean(seg_r[1:13, 2:38] == logits_to_labels(full[:3], regions)) > 0.999
    shuffled = LabelLayout(3, ((2, 3), (3,), (1, 2, 3)), (2, 3, 1))  # outputs listed out of painting order
    assert (logits_to_labels(np.ones((3, 2, 2, 2), np.float32), shuffled) == 3).all()  # highest label painted last


def test_cascade_runs_its_first_stage_and_feeds_it_as_channels(trained, tmp_path):
    import dataclasses

    from autoseg.api import train

    ds, wd, plans = trained
    full = plans.configuration("3d_fullres")
    low = dataclasses.replace(full, name="3d_lowres", next_stage="3d_cascade_fullres")
    casc = dataclasses.replace(full, name="3d_cascade_fullres", previous_stage="3d_lowres")
    work = tmp_path / "work"
    work.mkdir()
    dataclasses.replace(plans, configurations={**plans.configurations, "3d_lowres": low,
                                               "3d_cascade_fullres": casc}).save(work / "plans.json")
    kw = {"epochs": 1, "iters_per_epoch": 2, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}
    train(ds.root, "3d_lowres", 0, workdir=work, validate=False, **kw)
    val = work / "models" / "3d_lowres" / "fold_0" / "val"
    val.mkdir(parents=True)
    for c in ds.cases:  # stand-in CV predictions of the first stage
        shutil.copy(c.label, val / c.label.name)
    train(ds.root, "3d_cascade_fullres", 0, workdir=work, validate=False, **kw)
    summary = predict(ds.root / "imagesTs", tmp_path / "out", workdir=work, configuration="3d_cascade_fullres",
                      device="cpu", **FP32)
    assert sorted(summary.written) == ["test_000", "test_001"]
    record = json.loads((tmp_path / "out" / "prediction.json").read_text())["runs"][0]
    assert record["previous_stage"] == {"configuration": "3d_lowres", "folds": ["0"]}
    p = Predictor.from_workdir(work, "3d_cascade_fullres", device="cpu", amp=False)
    images, _, geometry = read_case(ds.test_cases()[0])
    pre = p.preprocess(images, geometry)
    assert pre.data.shape[0] == 2 + 3 and set(np.unique(pre.data[2:])) <= {0.0, 1.0}
    assert (work / "models" / "3d_cascade_fullres" / "fold_0" / FINAL).is_file()
    with pytest.raises(ModelNotFoundError, match="several configurations"):
        predict(ds.root / "imagesTs", tmp_path / "out2", workdir=work, progress=False)


@pytest.mark.slow
def test_a_killed_prediction_leaves_only_complete_files_and_a_rerun_finishes(trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    ds, wd, _ = trained
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):  # six cases: copies of the test cases under new names
        for ch in (0, 1):
            shutil.copy(ds.root / "imagesTs" / f"test_00{i % 2}_{ch:04d}.nii.gz", src / f"c{i}_{ch:04d}.nii.gz")
    args = ["-i", str(src), "--workdir", str(wd), "--device", "cpu", "--no-amp"]
    ref = tmp_path / "ref"
    assert cli(["-q", "predict", *args, "-o", str(ref)]) == 0
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "autoseg", "-q", "predict", *args, "-o", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("c*.nii.gz")):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(out.glob("c*.nii.gz"))
    assert 1 <= len(done) < 6
    for p in done:  # whatever is there under its final name is complete and right
        assert np.array_equal(read_image(p).array, read_image(ref / p.name).array)
    assert cli(["-q", "predict", *args, "-o", str(out)]) == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no stale temporaries
    for p in sorted(ref.glob("c*.nii.gz")):
        assert np.array_equal(read_image(out / p.name).array, read_image(p).array)


def test_png_slices_are_predicted_by_the_2d_model_and_written_as_png(tmp_path, planned_factory):
    from autoseg.api import train

    ds, wd, _ = planned_factory(tmp_path, kind="binary", regions=False, shape=(1, 40, 36), ndim=2, n_channels=1,
                                n_cases=3, n_test=2)
    train(ds.root, "2d", "all", workdir=wd, epochs=1, iters_per_epoch=2, val_iters=1, workers=0, device="cpu",
          progress=False, validate=False)
    summary = predict(ds.root / "imagesTs", tmp_path / "out", workdir=wd, progress=False)
    assert sorted(summary.written) == ["test_000", "test_001"]
    for cid, path in summary.outputs.items():
        assert path.suffix == ".png"
        assert read_label(path).array.shape == read_image(ds.root / "imagesTs" / f"{cid}_0000.png").array.shape[1:]


def test_probabilities_sit_next_to_the_segmentation_even_with_dots_in_the_case_id(tmp_path):
    from autoseg.inference.export import probabilities_path

    assert probabilities_path(tmp_path / "BraTS.001.nii.gz") == tmp_path / "BraTS.001.npz"
    assert probabilities_path(tmp_path / "case_7.mha") == tmp_path / "case_7.npz"
