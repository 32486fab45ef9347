"""Loading never runs code: checkpoints and bundle weights load with ``torch.load(weights_only=True)``, everything
else is JSON, and paths read from dataset.json or a bundle's manifest stay inside their folder.

Every planted file is a live payload: unpickling it calls ``open(marker, "w")``, so any loader that executes pickled
code creates the marker file. The tests show the payload is live, that autoseg refuses it with a one-line message
naming the file and the fix, and that the marker never appears.
"""

from __future__ import annotations

import ast
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import autoseg
from autoseg.io.dataset import load_dataset

FOLD = Path("models/3d_fullres/fold_0")


class Payload:
    """Unpickling this object creates ``marker`` (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint-shaped file, saved with plain ``torch.save``, whose unpickling runs code."""
    path.unlink(missing_ok=True)
    torch.save({"network": {"w": torch.zeros(1)}, "epoch": 1, "hook": Payload(marker)}, path)


def plant_pickle(path: Path, marker: Path) -> None:
    """A plain pickle where a JSON file is expected."""
    path.write_bytes(pickle.dumps({"version": 1, "hook": Payload(marker)}))


def one_line_error(status: int, err: str, *needles: str) -> None:
    """Exit 2, exactly one line on stderr, no traceback, every needle in it."""
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


def empty(folder: Path) -> bool:
    """Nothing was written there (the folder may have been made)."""
    return not folder.exists() or not any(folder.iterdir())


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "code_ran"


@pytest.fixture
def work(copy_of, clean_work) -> Path:
    return copy_of(clean_work)


def test_the_planted_payload_is_live(tmp_path, marker):
    plant_checkpoint(tmp_path / "ckpt.pt", marker)
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # an unsafe loader runs it
    assert marker.exists()
    marker.unlink()
    plant_pickle(tmp_path / "plans.json", marker)
    pickle.loads((tmp_path / "plans.json").read_bytes())
    assert marker.exists()


def test_predict_refuses_a_checkpoint_that_would_run_code(cli, work, marker, clean_dataset, tmp_path):
    plant_checkpoint(work / FOLD / "checkpoint_final.pt", marker)
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out", "--workdir", work,
                         "--device", "cpu")
    one_line_error(status, err, str(work / FOLD / "checkpoint_final.pt"), "would run code", "delete it")
    assert not marker.exists() and empty(tmp_path / "out")


@pytest.mark.parametrize("name", ["checkpoint_latest.pt", "checkpoint_final.pt"])
def test_resume_refuses_a_checkpoint_that_would_run_code(cli, work, marker, clean_dataset, name):
    plant_checkpoint(work / FOLD / name, marker)
    status, _, err = cli("train", clean_dataset, "3d_fullres", "0", "--workdir", work, "--resume", "--epochs", "2",
                         "--device", "cpu", "--workers", "0", "-j", "1")
    one_line_error(status, err, str(work / FOLD / name), "would run code")
    assert not marker.exists()


def test_export_refuses_a_checkpoint_that_would_run_code(cli, work, marker, tmp_path):
    plant_checkpoint(work / FOLD / "checkpoint_final.pt", marker)
    status, _, err = cli("export", "--workdir", work, "-o", tmp_path / "bundle", "--no-hash-data")
    one_line_error(status, err, "checkpoint_final.pt", "would run code")
    assert not marker.exists() and not (tmp_path / "bundle").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bundle")]  # no half-written bundle left


@pytest.fixture
def bundle(cli, work, tmp_path) -> Path:
    out = tmp_path / "bundle"
    assert cli("export", "--workdir", work, "-o", out, "--no-hash-data")[0] == 0
    return out


def _rehash(bundle: Path, rel: str) -> None:
    """Update the manifest's hash of ``rel``, as someone forging a bundle would."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel] = hashlib.sha256((bundle / rel).read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_bundle_weights_that_would_run_code_are_refused(cli, bundle, marker, clean_dataset, tmp_path):
    weights = bundle / FOLD / "checkpoint_final.pt"
    plant_checkpoint(weights, marker)
    predict = ("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out", "--bundle", bundle,
               "--device", "cpu")
    status, _, err = cli(*predict)  # the manifest's hash no longer matches: refused before loading anything
    assert status == 2 and "Traceback" not in err and "modified after export" in err and "Nothing was loaded" in err
    status, out, _ = cli("verify-bundle", bundle)
    assert status == 1 and f"{FOLD.as_posix()}/checkpoint_final.pt: modified after export" in out
    _rehash(bundle, f"{FOLD.as_posix()}/checkpoint_final.pt")  # a forged manifest: the loader itself must refuse
    one_line_error(*cli(*predict)[::2], str(weights), "would run code")
    one_line_error(*cli("verify-bundle", bundle)[::2], str(weights), "would run code")
    assert not marker.exists() and empty(tmp_path / "out")


@pytest.mark.parametrize("rel, command", [
    ("plans.json", "train"), ("splits.json", "train"), ("models/3d_fullres/plans.json", "predict"),
    ("selection/best.json", "predict"), ("manifest.json", "predict --bundle")])
def test_a_pickle_where_json_belongs_is_refused(cli, work, marker, clean_dataset, tmp_path, request, rel, command):
    if command == "predict --bundle":
        bundle = request.getfixturevalue("bundle")
        target, args = bundle / rel, ("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out",
                                      "--bundle", bundle, "--device", "cpu")
    else:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        args = (("train", clean_dataset, "3d_fullres", "0", "--workdir", work, "--resume", "--workers", "0",
                 "--device", "cpu") if command == "train" else
                ("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out", "--workdir", work,
                 "--device", "cpu"))
    plant_pickle(target, marker)
    status, _, err = cli(*args)
    one_line_error(status, err, str(target), "not valid JSON")
    assert not marker.exists()


def test_a_pickled_fingerprint_is_never_loaded_but_recomputed(cli, clean_dataset, work, marker):
    plant_pickle(work / "fingerprint.json", marker)
    assert cli("plan", clean_dataset, "--workdir", work, "--preset", "cpu", "--preprocess", "none", "-j", "1")[0] == 0
    assert json.loads((work / "fingerprint.json").read_text())["num_training"] == 3  # JSON again
    assert not marker.exists()


# ---- static guarantees -------------------------------------------------------------------------------------------

SOURCES = sorted(Path(autoseg.__file__).parent.rglob("*.py"))
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"import {n}") for n in names if n.split(".")[0] in UNSAFE_MODULES]
            if isinstance(node, ast.ImportFrom) and node.module == "torch":
                found += [(node.lineno, "from torch import load") for a in node.names if a.name == "load"]
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
        keywords = {k.arg: k.value for k in node.keywords}
        if isinstance(func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
            found.append((node.lineno, f"{name}("))
        if owner == "torch" and name == "load":
            safe = keywords.get("weights_only")
            if not (isinstance(safe, ast.Constant) and safe.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        if name == "load" and owner in ("yaml",) and "Loader" not in keywords:
            found.append((node.lineno, "yaml.load"))
        allow = keywords.get("allow_pickle")
        if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
            found.append((node.lineno, "allow_pickle not False"))
    return found


def test_the_sources_hold_no_loader_that_can_run_code():
    assert len(SOURCES) > 50  # the scan really sees the package
    problems = [f"{p.relative_to(p.parents[1])}:{line}: {what}"
                for p in SOURCES for line, what in _unsafe_calls(ast.parse(p.read_text(encoding="utf-8")))]
    assert problems == []


def test_the_static_scan_catches_what_it_looks_for():
    bad = ("import pickle\nfrom torch import load\ntorch.load(p)\ntorch.load(p, weights_only=False)\n"
           "np.load(p, allow_pickle=True)\neval('1')\nexec('x = 1')\nnetwork.eval()\n"
           "torch.load(p, weights_only=True)\nnp.load(p)\n")
    found = [what for _, what in _unsafe_calls(ast.parse(bad))]
    assert found == ["import pickle", "from torch import load", "torch.load without weights_only=True",
                     "torch.load without weights_only=True", "allow_pickle not False", "eval(", "exec("]


# ---- paths must stay inside their folder -------------------------------------------------------------------------

def _listing_dataset(copy_of, clean_dataset, images: list[str]) -> Path:
    ds = copy_of(clean_dataset)
    spec = json.loads((ds / "dataset.json").read_text())
    spec["dataset"] = {"case_000": {"images": images, "label": "labelsTr/case_000.nii.gz"}}
    spec["numTraining"] = 1
    (ds / "dataset.json").write_text(json.dumps(spec))
    return ds


@pytest.mark.parametrize("image", ["../outside_0000.nii.gz", "imagesTr/../../outside_0000.nii.gz",
                                   "{abs}", "$AUTOSEG_TEST_OUTSIDE", "imagesTr/\u0000.nii.gz"])
def test_dataset_json_paths_cannot_leave_the_dataset_folder(cli, copy_of, clean_dataset, tmp_path, monkeypatch,
                                                          image):
    outside = tmp_path / "outside_0000.nii.gz"
    outside.write_bytes((clean_dataset / "imagesTr" / "case_000_0000.nii.gz").read_bytes())
    monkeypatch.setenv("AUTOSEG_TEST_OUTSIDE", str(outside))
    image = image.replace("{abs}", str(outside))
    ds = _listing_dataset(copy_of, clean_dataset, [image, "imagesTr/case_000_0001.nii.gz"])
    status, _, err = cli("plan", ds, "--workdir", tmp_path / "work", "--preset", "cpu", "-j", "1")
    one_line_error(status, err, str(ds / "dataset.json"), "dataset folder")
    assert not (tmp_path / "work" / "fingerprint.json").exists()


def test_a_dotdot_after_a_linked_folder_stays_in_the_dataset_folder(copy_of, clean_dataset, tmp_path):
    """'link/..' is resolved in the text (the dataset folder), never next to the link's target."""
    elsewhere = tmp_path / "elsewhere" / "deep"
    elsewhere.mkdir(parents=True)
    (tmp_path / "elsewhere" / "case_000_0000.nii.gz").write_bytes(b"not the dataset's file")
    ds = _listing_dataset(copy_of, clean_dataset, ["link/../imagesTr/case_000_0000.nii.gz",
                                                   "imagesTr/case_000_0001.nii.gz"])
    (ds / "link").symlink_to(elsewhere, target_is_directory=True)
    case = load_dataset(ds).cases[0]
    assert case.images[0] == (ds / "imagesTr" / "case_000_0000.nii.gz").absolute()


@pytest.mark.parametrize("rel", ["../outside.json", "{abs}"])
def test_manifest_paths_cannot_leave_the_bundle(cli, bundle, tmp_path, rel):
    (tmp_path / "outside.json").write_text("{}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][rel.replace("{abs}", str(tmp_path / "outside.json"))] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    one_line_error(*cli("verify-bundle", bundle)[::2], "points outside the bundle", "Do not use this bundle")


def test_a_bundle_file_linked_outside_is_refused(cli, bundle, tmp_path, clean_dataset):
    weights = bundle / FOLD / "checkpoint_final.pt"
    outside = tmp_path / "elsewhere.pt"
    weights.rename(outside)
    weights.symlink_to(outside)  # same bytes, same hash: only the link betrays it
    one_line_error(*cli("verify-bundle", bundle)[::2], str(weights), "symbolic link", "outside the bundle")
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out", "--bundle", bundle,
                         "--device", "cpu")
    one_line_error(status, err, "symbolic link", "outside the bundle")


def test_a_linked_folder_added_to_a_bundle_is_reported(cli, bundle, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (bundle / "models" / "extra").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    status, out, _ = cli("verify-bundle", bundle)
    assert status == 1 and "models/extra: a symbolic link to" in out and "outside the bundle" in out


def test_a_bundle_cannot_name_a_model_outside_itself(cli, bundle, tmp_path, clean_dataset):
    """A forged best.json (manifest re-hashed) whose configuration '../../elsewhere' would load plans and weights
    from a folder next to the bundle is refused."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(bundle / "models" / "3d_fullres", elsewhere)
    plans = json.loads((elsewhere / "plans.json").read_text())
    plans["configurations"]["../../elsewhere"] = plans["configurations"]["3d_fullres"]
    (elsewhere / "plans.json").write_text(json.dumps(plans))
    best = json.loads((bundle / "selection" / "best.json").read_text())
    best["members"] = [{"configuration": "../../elsewhere", "folds": ["0"]}]
    (bundle / "selection" / "best.json").write_text(json.dumps(best))
    _rehash(bundle, "selection/best.json")
    status, _, err = cli("predict", "-i", clean_dataset / "imagesTr", "-o", tmp_path / "out", "--bundle", bundle,
                         "--device", "cpu", "--no-tta")
    one_line_error(status, err, str(bundle / "selection" / "best.json"), "path separators")
    assert empty(tmp_path / "out")
