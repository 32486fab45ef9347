"""find-best, ensembling, predict with the chosen pipeline, and submission bundles, on a tiny trained dataset."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from autoseg.api import predict, train
from autoseg.cli import main
from autoseg.ensemble.bundle import export_bundle, verify_bundle
from autoseg.ensemble.choice import load_best
from autoseg.ensemble.ensembling import EnsembleError, ensemble_folders
from autoseg.ensemble.selection import find_best
from autoseg.errors import BundleError
from autoseg.evaluation.quality_rule import QualityRule
from autoseg.inference.export import load_probabilities_npz, probabilities_to_labels
from autoseg.io.image import read_label

FAST = {"iters_per_epoch": 4, "val_iters": 1, "workers": 0, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def cv(tmp_path_factory, planned_factory):
    """3d_fullres folds 0-1 trained with probabilities, 2d folds 0-1 without (find-best must add them)."""
    ds, wd, plans = planned_factory(tmp_path_factory.mktemp("cv"), n_cases=6, n_test=2)
    train(ds.root, "3d_fullres", "0,1", workdir=wd, epochs=2, save_probabilities=True, **FAST)
    train(ds.root, "2d", "0,1", workdir=wd, epochs=2, **FAST)
    selection = find_best(wd, jobs=1, progress=False)
    return ds, wd, selection


def test_find_best_ranks_configurations_and_ensembles_and_writes_the_choice(cv):
    ds, wd, sel = cv
    names = {c.name for c in sel.candidates}
    assert names in ({"3d_fullres", "2d", "ensemble__3d_fullres__2d"}, {"3d_fullres", "2d", "ensemble__2d__3d_fullres"})
    singles = [c.score for c in sel.candidates if len(c.members) == 1]
    assert sel.best.score >= max(singles)  # the chosen pipeline is never worse than its best member on CV
    assert all(c.score == c.score for c in sel.candidates)  # every candidate was scored
    best = load_best(wd)
    assert best.name == sel.best.name and best.score == pytest.approx(sel.best.score)
    assert best.score_after_postprocessing >= best.score - 1e-12  # rules are kept only if they help
    n_cv = len(sel.best.predictions)
    assert n_cv == len(json.loads((wd / "selection" / "cv_summary.json").read_text())["cases"])
    # 2d was trained without probabilities: find-best recomputed its validation with them
    assert list((wd / "models" / "2d" / "fold_0" / "val").glob("*.npz"))
    table = sel.format_table()
    assert "<- best" in table and "postprocessing" in table
    assert "--postprocessing" in best.predict_command and str(wd) in best.predict_command
    # the quality flag was learnt on the same CV cases, with each score's Spearman against the real errors
    rule = QualityRule.load(wd / "selection" / "quality.json")
    assert rule.n_cases == n_cv and rule.candidate == sel.best.name and set(rule.spearman) >= {"combined"}
    assert "Spearman" in table and "flag when" in table


def test_cv_ensemble_is_the_average_of_the_members_probabilities(cv):
    ds, wd, sel = cv
    ens = next(c for c in sel.candidates if len(c.members) == 2)
    cid = sorted(ens.predictions)[0]
    probs = []
    for m in ens.members:
        fold = next(f for f in m.folds if (wd / "models" / m.configuration / f"fold_{f}" / "val" /
                                           f"{cid}.npz").is_file())
        p, layout = load_probabilities_npz(wd / "models" / m.configuration / f"fold_{fold}" / "val" / f"{cid}.npz")
        probs.append(p.astype(np.float32))
    expected = probabilities_to_labels((probs[0] + probs[1]) / 2, layout)
    assert np.array_equal(read_label(ens.predictions[cid]).array, expected)


def test_predict_follows_the_choice_and_its_postprocessing(cv, tmp_path):
    ds, wd, sel = cv
    images = ds.root / "imagesTs"
    summary = predict(images, tmp_path / "auto", workdir=wd, device="cpu", progress=False)
    record = json.loads((tmp_path / "auto" / "prediction.json").read_text())["runs"][-1]
    assert record["configurations"] == [m.configuration for m in sel.best.members]
    assert record["selection"] == sel.best.name
    # the same pipeline named explicitly, postprocessing applied by hand, gives the same files
    explicit = predict(images, tmp_path / "explicit", workdir=wd, device="cpu", progress=False,
                       configuration=[m.configuration for m in sel.best.members], postprocessing="none")
    for cid, path in summary.outputs.items():
        got = read_label(path)
        raw = read_label(explicit.outputs[cid]).array
        want = sel.rules.apply(raw, got.geometry.array_spacing) if sel.rules is not None else raw
        assert np.array_equal(got.array, want)


def test_ensemble_command_averages_prediction_folders(cv, tmp_path):
    ds, wd, _ = cv
    images = ds.root / "imagesTs"
    for c in ("3d_fullres", "2d"):
        predict(images, tmp_path / c, workdir=wd, configuration=c, device="cpu", progress=False,
                save_probabilities=True, postprocessing="none")
    ensemble_folders([tmp_path / "3d_fullres", tmp_path / "2d"], tmp_path / "ens", progress=False)
    direct = predict(images, tmp_path / "direct", workdir=wd, configuration=["3d_fullres", "2d"], device="cpu",
                     progress=False, postprocessing="none")
    for cid, path in direct.outputs.items():
        assert np.array_equal(read_label(tmp_path / "ens" / path.name).array, read_label(path).array)
    predict(images, tmp_path / "plain", workdir=wd, configuration="2d", device="cpu", progress=False)
    with pytest.raises(EnsembleError, match="no probabilities"):
        ensemble_folders([tmp_path / "3d_fullres", tmp_path / "plain"], tmp_path / "ens2", progress=False)


def test_bundle_predicts_identically_after_copying_and_verifies(cv, tmp_path):
    ds, wd, sel = cv
    bundle = export_bundle(wd, tmp_path / "bundle", progress=False)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["software"]["torch"] and manifest["seed"] == json.loads((wd / "plans.json").read_text())["seed"]
    assert manifest["dataset"]["files"]["dataset.json"] and manifest["sample"]["labels_sha256"]
    assert manifest["cross_validation"]["name"] == sel.best.name
    assert "optimizer" not in __import__("torch").load(
        next(bundle.glob("models/*/fold_*/checkpoint_final.pt")), weights_only=True)
    moved = shutil.copytree(bundle, tmp_path / "elsewhere" / "bundle")
    shutil.rmtree(bundle)
    images = ds.root / "imagesTs"
    a = predict(images, tmp_path / "from_workdir", workdir=wd, device="cpu", deterministic=True, progress=False)
    b = predict(images, tmp_path / "from_bundle", workdir=moved, device="cpu", deterministic=True, progress=False)
    for cid in a.outputs:
        assert np.array_equal(read_label(a.outputs[cid]).array, read_label(b.outputs[cid]).array)
    report = verify_bundle(moved, progress=False)
    assert report.ok and report.identical, report.format()


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # would create the marker file if unpickled


def test_tampered_bundle_is_refused_without_running_code(cv, tmp_path):
    ds, wd, _ = cv
    bundle = export_bundle(wd, tmp_path / "bundle", progress=False, hash_dataset=False)
    weights = next(bundle.glob("models/*/fold_*/checkpoint_final.pt"))
    marker = tmp_path / "pwned"
    weights.write_bytes(pickle.dumps({"network": _Payload(marker)}))
    with pytest.raises(BundleError, match="modified after export"):
        predict(ds.root / "imagesTs", tmp_path / "out", workdir=bundle, device="cpu", progress=False)
    assert not marker.exists()
    # even with the manifest forged to match, the weights are loaded without unpickling code
    manifest = json.loads((bundle / "manifest.json").read_text())
    from autoseg.io.model_folder import sha256

    manifest["files"][weights.relative_to(bundle).as_posix()] = sha256(weights)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    from autoseg.errors import FileFormatError

    with pytest.raises(FileFormatError, match="safe checkpoint"):
        predict(ds.root / "imagesTs", tmp_path / "out", workdir=bundle, device="cpu", progress=False)
    assert not marker.exists()
    manifest["files"]["../outside.txt"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        verify_bundle(bundle, progress=False)


def test_label_map_writes_the_benchmark_convention(cv, tmp_path):
    ds, wd, _ = cv
    bundle = export_bundle(wd, tmp_path / "bundle", progress=False, hash_dataset=False, label_map="3:4")
    images = ds.root / "imagesTs"
    plain = predict(images, tmp_path / "plain", workdir=wd, device="cpu", progress=False)
    mapped = predict(images, tmp_path / "mapped", workdir=bundle, device="cpu", progress=False)
    for cid, path in plain.outputs.items():
        a, b = read_label(path).array, read_label(mapped.outputs[cid]).array
        assert np.array_equal(np.where(a == 3, 4, a), b)
        assert mapped.outputs[cid].name == path.name  # named by case id


def test_cli_find_best_export_verify(cv, tmp_path, capsys):
    ds, wd, _ = cv
    assert main(["-q", "find-best", "--workdir", str(wd), "--no-ensembles", "-c", "3d_fullres"]) == 0
    out = capsys.readouterr().out
    assert "cross-validation" in out and "autoseg predict" in out
    assert main(["-q", "export", "--workdir", str(wd), "-o", str(tmp_path / "b"), "--no-hash-data"]) == 0
    assert main(["-q", "verify-bundle", str(tmp_path / "b")]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["-q", "predict", "-i", str(ds.root / "imagesTs"), "-o", str(tmp_path / "p"), "--bundle",
                 str(tmp_path / "b"), "--device", "cpu"]) == 0
    assert main(["-q", "evaluate", str(tmp_path / "p"), str(ds.root / "labelsTs"), "--dataset-json",
                 str(ds.root / "dataset.json")]) == 0
    assert (tmp_path / "p" / "summary.json").is_file() and (tmp_path / "p" / "cases.csv").is_file()
    find_best(wd, progress=False)  # restore the full choice for other tests in this module
