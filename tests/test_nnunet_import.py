"""``autoseg import-nnunet``: models trained by nnU-Net v2 itself (fixtures made by
``tests/fixtures/nnunet/make_fixtures.py``) run in autoseg without nnU-Net, with nnU-Net's results."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg.errors import ModelImportError
from autoseg.inference.model import network_from_checkpoint
from autoseg.inference.predictor import Predictor
from autoseg.interop.nnunet import import_nnunet
from autoseg.io.image import read_image
from autoseg.networks.checkpoint import load_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "nnunet"
MODELS = ("3d_fullres", "2d", "regions", "resenc")


def _unpack(model: str, root: Path) -> tuple[Path, Path]:
    """The fixture's folder and its nnU-Net model folder."""
    with tarfile.open(FIXTURES / f"{model}.tar.xz") as tar:
        tar.extractall(root, filter="data")
    (folder,) = (root / "results").glob("Dataset*/*__*__*")
    return root, folder


@pytest.fixture(scope="module", params=MODELS)
def imported(request, tmp_path_factory):
    root, folder = _unpack(request.param, tmp_path_factory.mktemp(request.param))
    report = import_nnunet(folder, root / "work")
    return root, folder, report


def test_network_logits_match_nnunet(imported):
    """The imported network on nnU-Net's preprocessed input gives nnU-Net's float32 logits."""
    root, _, report = imported
    predictor = Predictor.from_workdir(report.workdir, report.configuration, device="cpu", amp=False)
    config = predictor.config
    ck = load_checkpoint(report.workdir / "models" / config.name / "fold_0" / "checkpoint_final.pt")
    net, _ = network_from_checkpoint(ck, config)
    net.eval()
    data = np.load(root / "replay" / "input.npy")
    x = data[:, 0] if config.ndim == 2 else data
    crop = x[(slice(None), *(slice(0, p) for p in config.patch_size))]
    patch = np.zeros((x.shape[0], *config.patch_size), np.float32)
    patch[(slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
    with torch.no_grad():
        out = net(torch.from_numpy(patch)[None])[0].numpy()
    np.testing.assert_allclose(out, np.load(root / "replay" / "patch_logits.npy"), atol=1e-4, rtol=0)


def test_preprocessing_and_segmentations_match_nnunet(imported):
    """Preprocessing within 1e-5; exported files: same grid, <= 0.1 % of voxels differ, only where nnU-Net's
    own (float16) margin between the top two probabilities is below 1e-2."""
    root, _, report = imported
    predictor = Predictor.from_workdir(report.workdir, report.configuration, device="cpu", amp=False)
    images = sorted((root / "imagesTs").glob("*_0000.nii.gz"))[:1]  # the second case: make_fixtures.py's check
    for i, path in enumerate(images):
        image = read_image(path)
        pre = predictor.preprocess(image.array, image.geometry)
        if i == 0:
            np.testing.assert_allclose(pre.data, np.load(root / "replay" / "input.npy"), atol=1e-5, rtol=0)
        seg, _ = predictor.export(predictor.logits(pre.data), pre.properties)
        case = path.name[:-len("_0000.nii.gz")]
        reference = read_image(root / "nnunet" / f"{case}.nii.gz")
        assert seg.shape == reference.array.shape[1:]
        differ = seg != reference.array[0]
        assert differ.mean() <= 1e-3, (case, int(differ.sum()))
        npz = root / "nnunet" / f"{case}.npz"
        if differ.any() and npz.is_file() and predictor.layout.regions is None:
            probs = np.sort(np.load(npz)["probabilities"].astype(np.float32), axis=0)
            assert (probs[-1] - probs[-2])[differ].max() < 1e-2


def test_import_writes_an_autoseg_work_folder(imported):
    """Plans flagged with nnU-Net's rules, the checkpoint's mirror axes, labels, source hashes and licence."""
    _, folder, report = imported
    model_dir = report.workdir / "models" / report.configuration
    plans = json.loads((model_dir / "plans.json").read_text())
    assert plans["configurations"][report.configuration]["rules"] == "nnunet"
    ck = load_checkpoint(model_dir / "fold_0" / "checkpoint_final.pt")
    assert tuple(ck["mirror_axes"]) == report.mirror_axes and report.mirror_axes
    source = json.loads((model_dir / "imported_from.json").read_text())
    assert source["files"]["fold_0/checkpoint_final.pth"] and "CC-BY" in source["licence"]
    assert json.loads((model_dir / "dataset.json").read_text())["labels"] == \
        json.loads((folder / "dataset.json").read_text())["labels"]


def _edited_copy(tmp_path: Path, edit) -> Path:
    _, folder = _unpack("3d_fullres", tmp_path)
    ck = folder / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ck, map_location="cpu", weights_only=False)  # the fixture is our own file
    edit(state)
    torch.save(state, ck)
    return folder


class _Payload:
    """Pickled, it would create a file when unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


@pytest.mark.parametrize("case", ["batchnorm", "unknown", "malicious"])
def test_refusals_are_one_line_and_run_nothing(tmp_path, case):
    marker = tmp_path / "payload_ran"

    def edit(state):
        weights = state["network_weights"]
        if case == "batchnorm":
            weights["encoder.stages.0.0.convs.0.norm.running_mean"] = torch.zeros(2)
        elif case == "unknown":
            weights["encoder.stages.0.0.attention.qkv.weight"] = torch.zeros(2, 2)
        else:
            state["logging"]["extra"] = _Payload(marker)

    folder = _edited_copy(tmp_path, edit)
    with pytest.raises(ModelImportError) as err:
        import_nnunet(folder, tmp_path / "work")
    message = str(err.value)
    assert "\n" not in message
    assert {"batchnorm": "BatchNorm", "unknown": "attention.qkv", "malicious": "loaded safely"}[case] in message
    assert not marker.exists() and not (tmp_path / "work").exists()
    assert pickle.dumps  # the payload class itself is importable (the refusal is not an import error)


def test_imported_folder_exports_verifies_and_fine_tunes(tmp_path, capsys):
    """export + verify-bundle (the files against the manifest) and --init-from's loading work on an imported
    folder (prediction: the tests above)."""
    from autoseg.cli.app import main
    from autoseg.networks.unet import UNet
    from autoseg.planner.plans import Plans
    from autoseg.training.transfer import load_matching_weights

    _, folder = _unpack("3d_fullres", tmp_path)
    work = tmp_path / "work"
    assert main(["import-nnunet", str(folder), "--workdir", str(work)]) == 0
    bundle = tmp_path / "bundle"
    assert main(["-q", "export", "--workdir", str(work), "-o", str(bundle)]) == 0
    assert main(["-q", "verify-bundle", str(bundle)]) == 0, capsys.readouterr()
    assert json.loads((bundle / "models" / "3d_fullres" / "imported_from.json").read_text())["trainer"]
    config = Plans.load(work / "models" / "3d_fullres" / "plans.json").configuration("3d_fullres")
    net = UNet(config.topology, in_channels=1, num_classes=3)
    report = load_matching_weights(net, work, configuration="3d_fullres")
    assert not report.to_json().get("skipped") and not report.to_json().get("missing"), report.to_json()


def _dice(seg: np.ndarray, ref: np.ndarray, label: int) -> float | None:
    a, b = seg == label, ref == label
    total = int(a.sum() + b.sum())
    return 2.0 * float((a & b).sum()) / total if total else None


def _reference_dataset(root: Path) -> Path:
    """The fixture's labels of the held-out cases as a dataset folder (find-best reads no image: any file with the
    case's id does)."""
    dataset = root / "dataset"
    (dataset / "imagesTr").mkdir()
    for label in (dataset / "labelsTr").glob("*.nii.gz"):
        (dataset / "imagesTr" / label.name.replace(".nii.gz", "_0000.nii.gz")).write_bytes(label.read_bytes())
    return dataset


def test_find_best_scores_imported_cv_results(tmp_path, capsys):
    """nnU-Net's fold_0/validation/ becomes the fold's val/ and splits.json; find-best scores nnU-Net's own files
    against labelsTr (Dice as computed here) and records the imported model as the choice."""
    from autoseg.cli.app import main
    from autoseg.ensemble.selection import find_best
    from autoseg.inference.export import load_probabilities_npz

    root, folder = _unpack("3d_fullres", tmp_path)
    work = tmp_path / "work"
    assert main(["import-nnunet", str(folder), "--workdir", str(work)]) == 0
    assert "CV results of fold(s) 0 imported (2 case(s))" in capsys.readouterr().out
    source = sorted((folder / "fold_0" / "validation").glob("*.nii.gz"))
    cases = [p.name[:-len(".nii.gz")] for p in source]
    assert json.loads((work / "splits.json").read_text())[0]["val"] == cases
    val = work / "models" / "3d_fullres" / "fold_0" / "val"
    probs, _ = load_probabilities_npz(val / f"{cases[0]}.npz")
    assert probs.shape[0] == 3 and set(json.loads((val / "quality.json").read_text())["cases"]) == set(cases)
    dataset = _reference_dataset(root)
    sel = find_best(work, dataset=dataset, progress=False, postprocessing=False)
    assert sel.best.name == "3d_fullres" and sorted(sel.best.predictions) == cases
    for cid, path in sel.best.predictions.items():
        assert path.read_bytes() == (folder / "fold_0" / "validation" / path.name).read_bytes()
    per_class = []
    for label in (1, 2):
        scores = [_dice(read_image(folder / "fold_0" / "validation" / f"{c}.nii.gz").array,
                        read_image(dataset / "labelsTr" / f"{c}.nii.gz").array, label) for c in cases]
        per_class.append(np.mean([s for s in scores if s is not None]))
    assert sel.best.score == pytest.approx(np.mean(per_class), abs=1e-6)
    assert json.loads((work / "selection" / "best.json").read_text())["members"][0]["configuration"] == "3d_fullres"


def test_imported_model_predicts_with_the_onnx_backend(tmp_path):
    """``predict --backend onnx`` on an imported folder gives nnU-Net's segmentations (<= 0.1 % of voxels)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from autoseg.api import predict

    root, folder = _unpack("3d_fullres", tmp_path)
    work = tmp_path / "work"
    import_nnunet(folder, work)
    done = predict(root / "imagesTs", tmp_path / "out", workdir=work, backend="onnx", device="cpu", amp=False,
                   progress=False)
    assert json.loads((tmp_path / "out" / "prediction.json").read_text())["runs"][0]["backend"] == "onnx"
    for cid, path in done.outputs.items():
        seg, ref = read_image(path).array, read_image(root / "nnunet" / f"{cid}.nii.gz").array
        assert seg.shape == ref.shape and (seg != ref).mean() <= 1e-3, cid


def test_find_best_ensembles_imported_models_and_says_when_it_cannot(tmp_path):
    """nnU-Net's 3d_fullres and 2d models of one dataset imported into one work folder: find-best scores both and
    their ensemble (nnU-Net's probabilities averaged); without one model's probabilities it says so and leaves the
    ensemble out."""
    from autoseg.ensemble.imported_cv import import_cv_results
    from autoseg.ensemble.selection import find_best

    root, fullres = _unpack("3d_fullres", tmp_path / "fullres")
    _, flat = _unpack("2d", tmp_path / "flat")
    work = tmp_path / "work"
    for folder, cfg in ((fullres, "3d_fullres"), (flat, "2d")):
        import_nnunet(folder, work)
        assert not import_cv_results(folder, work, cfg, ["0"]).without_probabilities
    dataset = _reference_dataset(root)
    sel = find_best(work, dataset=dataset, progress=False, postprocessing=False)
    ensemble = next(c for c in sel.candidates if c.name.startswith("ensemble__"))
    assert len(sel.candidates) == 3 and ensemble.score == ensemble.score
    for cid, path in ensemble.predictions.items():  # the average of nnU-Net's own probabilities, argmax
        mean = sum(np.load(f / "fold_0" / "validation" / f"{cid}.npz")["probabilities"].astype(np.float32)
                   for f in (fullres, flat)) / 2
        assert (read_image(path).array[0] == np.argmax(mean, axis=0)).mean() > 0.999
    for npz in (flat / "fold_0" / "validation").glob("*.npz"):
        npz.unlink()
    assert import_cv_results(flat, work, "2d", ["0"]).without_probabilities == ("0",)
    notes: list[str] = []
    sel = find_best(work, dataset=dataset, progress=False, postprocessing=False, on_note=notes.append)
    assert sorted(c.name for c in sel.candidates) == ["2d", "3d_fullres"]
    assert any(n.startswith("2d: imported without CV probabilities") and "--npz" in n for n in notes), notes
