"""ONNX export and the ONNX Runtime backend: exported logits equal torch's, predictions equal torch's, bundles
carry (and verify with) the ONNX files, and the errors say what to do."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from autoseg.api import predict  # noqa: E402
from autoseg.cli import main as cli  # noqa: E402
from autoseg.ensemble.bundle import export_bundle, verify_bundle  # noqa: E402
from autoseg.errors import BundleError, ModelNotFoundError
from autoseg.inference import onnx_backend  # noqa: E402
from autoseg.inference.onnx_backend import (  # noqa: E402
    ONNX_FILE,
    OPSET,
    OnnxNetwork,
    OnnxUnavailableError,
    compare_with_torch,
    export_onnx,
    network_to_onnx,
)
from autoseg.inference.predictor import Predictor  # noqa: E402
from autoseg.inference.sliding_window import InferenceError  # noqa: E402
from autoseg.io.image import read_label  # noqa: E402
from autoseg.io.model_folder import require_intact, sha256
from autoseg.networks.checkpoint import FINAL, load_checkpoint, save_checkpoint  # noqa: E402
from autoseg.networks.topology import UNetTopology  # noqa: E402
from autoseg.networks.unet import UNet, build_network  # noqa: E402
from autoseg.planner.plans import Plans  # noqa: E402

#: |onnxruntime - torch| logits, relative to the largest |logit| (measured: ~1e-7 to 1e-6 on these tiny networks)
RTOL = 1e-5
QUIET = {"device": "cpu", "amp": False, "progress": False}


def _fold_network(wd, config_name="3d_fullres", fold="0"):
    config = Plans.load(wd / "plans.json").configuration(config_name)
    ckpt = load_checkpoint(wd / "models" / config_name / f"fold_{fold}" / FINAL)
    net = build_network(config, in_channels=int(ckpt["in_channels"]), num_classes=int(ckpt["num_outputs"]),
                        deep_supervision=False)
    net.load_state_dict(ckpt["network"])
    return config, net.eval(), int(ckpt["in_channels"])


@pytest.fixture
def work(trained, tmp_path):
    """A private copy of the trained work folder (the ONNX cache is written into it)."""
    ds, wd, _ = trained
    return ds, shutil.copytree(wd, tmp_path / "work")


def test_exported_3d_network_gives_torch_logits_for_any_batch_and_patch_multiple(trained, tmp_path):
    _, wd, _ = trained
    paths = export_onnx(wd, "3d_fullres", [0], output=tmp_path / "onnx")
    assert paths == [tmp_path / "onnx" / "models" / "3d_fullres" / "fold_0" / ONNX_FILE]
    assert not (wd / "models" / "3d_fullres" / "fold_0" / ONNX_FILE).exists()  # output given: nothing in the source
    config, net, cin = _fold_network(wd)
    runner = OnnxNetwork(paths[0])
    assert runner.metadata["autoseg.checkpoint_sha256"] == sha256(wd / "models" / "3d_fullres" / "fold_0" / FINAL)
    for batch, spatial in ((1, config.patch_size), (3, config.patch_size), (2, tuple(2 * p for p in config.patch_size))):
        diff, scale = compare_with_torch(runner, net, in_channels=cin, spatial=spatial, batch=batch)
        print(f"3d batch {batch} {spatial}: max diff {diff:.2e}, max |logit| {scale:.2f}")
        assert diff <= RTOL * max(1.0, scale)


def _tiny_2d(block="plain"):
    topo = UNetTopology(strides=((1, 1), (2, 2), (2, 2)), kernel_sizes=((3, 3),) * 3, features_per_stage=(4, 8, 16),
                        n_blocks_per_stage=(1, 1, 1), n_conv_per_stage_decoder=(1, 1), block=block)
    torch.manual_seed(0)
    return UNet(topo, in_channels=2, num_classes=3, deep_supervision=True)


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_2d_network_exports_with_torch_logits(block):
    net = _tiny_2d(block)
    data = network_to_onnx(net, in_channels=2, patch_size=(16, 16))
    assert net.deep_supervision is False  # exported as the predictor runs it: full-resolution logits only
    for batch, spatial in ((1, (16, 16)), (4, (16, 16)), (2, (32, 24))):
        diff, scale = compare_with_torch(data, net, in_channels=2, spatial=spatial, batch=batch)
        print(f"2d {block} batch {batch} {spatial}: max diff {diff:.2e}, max |logit| {scale:.2f}")
        assert diff <= RTOL * max(1.0, scale)


def test_dynamo_exporter_gives_the_same_interface():
    pytest.importorskip("onnxscript")
    net = _tiny_2d()
    runner = OnnxNetwork(network_to_onnx(net, in_channels=2, patch_size=(16, 16), exporter="dynamo"))
    assert runner.metadata["autoseg.exporter"] == "dynamo"
    diff, scale = compare_with_torch(runner, net, in_channels=2, spatial=(32, 16), batch=2)
    assert diff <= RTOL * max(1.0, scale)


def test_onnx_predictions_equal_torch_and_the_cache_follows_the_checkpoint(work, tmp_path):
    ds, wd = work
    images = ds.root / "imagesTs"
    ref = predict(images, tmp_path / "torch", workdir=wd, **QUIET)
    got = predict(images, tmp_path / "onnx", workdir=wd, backend="onnx", uncertainty=True, **QUIET)
    for cid, path in ref.outputs.items():
        a, b = read_label(path).array, read_label(got.outputs[cid]).array
        print(f"{cid}: {float((a != b).mean()):.2e} of voxels differ")
        assert (a != b).mean() < 1e-3
    assert (tmp_path / "onnx" / "uncertainty").is_dir()  # member outputs (mirror variants) run through ONNX too
    assert json.loads((tmp_path / "onnx" / "prediction.json").read_text())["runs"][0]["backend"] == "onnx"
    cached = wd / "models" / "3d_fullres" / "fold_0" / ONNX_FILE
    before = cached.stat().st_mtime_ns
    Predictor.from_workdir(wd, "3d_fullres", device="cpu", backend="onnx")
    assert cached.stat().st_mtime_ns == before  # reused
    ckpt_path = wd / "models" / "3d_fullres" / "fold_0" / FINAL
    state = load_checkpoint(ckpt_path)
    state["network"] = {k: v * 1.01 if v.is_floating_point() else v for k, v in state["network"].items()}
    save_checkpoint(ckpt_path, state)  # "retrained": the cached export is stale and is replaced
    model = Predictor.from_workdir(wd, "3d_fullres", device="cpu", backend="onnx")
    assert model.networks[0].metadata["autoseg.checkpoint_sha256"] == sha256(ckpt_path)
    cached.write_bytes(b"truncated")  # a damaged cache file is exported again too
    model = Predictor.from_workdir(wd, "3d_fullres", device="cpu", backend="onnx")
    assert model.networks[0].source == str(cached) and cached.stat().st_size > 1000


def test_bundle_with_onnx_lists_and_verifies_its_networks(trained, tmp_path, capsys):
    ds, wd, _ = trained
    bundle = tmp_path / "bundle"
    assert cli(["-q", "export", "--workdir", str(wd), "-o", str(bundle), "--dataset", str(ds.root), "--onnx",
                "--no-hash-data"]) == 0
    assert "--backend onnx" in capsys.readouterr().out
    manifest = json.loads((bundle / "manifest.json").read_text())
    rel = f"models/3d_fullres/fold_0/{ONNX_FILE}"
    assert manifest["files"][rel] == sha256(bundle / rel)
    record = manifest["onnx"]
    assert record["files"] == [rel] and record["opset"] == OPSET
    assert record["onnx"] == __import__("onnx").__version__
    assert record["onnxruntime"] == __import__("onnxruntime").__version__
    report = verify_bundle(bundle, progress=False)
    assert report.ok and report.identical, report.format()
    case = sorted((ds.root / "imagesTs").glob("test_000_*"))  # one case: the other test covers the folder
    out = predict(case, tmp_path / "pred", workdir=bundle, backend="onnx", **QUIET)
    expected = predict(case, tmp_path / "ref", workdir=bundle, **QUIET)
    assert (read_label(out.outputs["test_000"]).array != read_label(expected.outputs["test_000"]).array).mean() < 1e-3
    require_intact(bundle)  # predicting wrote nothing into the bundle


def test_bundle_without_onnx_names_the_export_flag(trained, tmp_path):
    ds, wd, _ = trained
    bundle = export_bundle(wd, tmp_path / "bundle", progress=False, hash_dataset=False)
    assert json.loads((bundle / "manifest.json").read_text())["onnx"] is None
    with pytest.raises(ModelNotFoundError, match=r"autoseg export .*--onnx") as err:
        predict(ds.root / "imagesTs", tmp_path / "out", workdir=bundle, backend="onnx", **QUIET)
    assert ONNX_FILE in str(err.value)
    with pytest.raises(BundleError, match="--onnx"):
        export_onnx(bundle)  # never written into a bundle: its manifest would no longer match
    require_intact(bundle)
    assert export_onnx(bundle, output=tmp_path / "elsewhere")  # into another folder it works


def test_unknown_backend_and_missing_onnxruntime_are_clear(trained, monkeypatch):
    _, wd, _ = trained
    with pytest.raises(InferenceError, match="torch, onnx"):
        Predictor.from_workdir(wd, "3d_fullres", device="cpu", backend="tensorrt")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(OnnxUnavailableError, match=r"pip install autoseg\[onnx\]"):
        Predictor.from_workdir(wd, "3d_fullres", device="cpu", backend="onnx")
    with pytest.raises(OnnxUnavailableError, match="onnxruntime"):
        onnx_backend.require("onnxruntime")


def test_runtime_network_rejects_wrong_inputs_by_name():
    net = _tiny_2d()
    runner = OnnxNetwork(network_to_onnx(net, in_channels=2, patch_size=(16, 16)))
    with pytest.raises(InferenceError, match=r"\(batch, 2, \*spatial\)"):
        runner(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InferenceError, match="multiples"):
        runner(torch.zeros(1, 2, 18, 18))
    out = runner(torch.zeros(2, 2, 16, 16))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and tuple(out.shape) == (2, 3, 16, 16)
    assert np.isfinite(out.numpy()).all()
