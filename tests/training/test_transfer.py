"""Fine-tuning starts: matching tensors are copied, the others are named, and unusable sources are refused."""

from __future__ import annotations

import pickle

import pytest
import torch

from autoseg.errors import AutosegError, FileFormatError
from autoseg.networks.checkpoint import FINAL, save_checkpoint
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet
from autoseg.training.transfer import find_source_checkpoint, load_matching_weights


def net(in_channels: int = 1, classes: int = 2, ndim: int = 3, features=(4, 8, 16)) -> UNet:
    n = len(features)
    topo = UNetTopology(strides=((1,) * ndim,) + ((2,) * ndim,) * (n - 1), kernel_sizes=((3,) * ndim,) * n,
                        features_per_stage=tuple(features), n_blocks_per_stage=(1,) * n,
                        n_conv_per_stage_decoder=(1,) * (n - 1), block="plain")
    return UNet(topo, in_channels=in_channels, num_classes=classes)


def saved(tmp_path, network, where="models/3d_fullres/fold_0") -> None:
    torch.manual_seed(0)
    save_checkpoint(tmp_path / where / FINAL, {"network": network.state_dict(), "epoch": 3})


def test_same_network_copies_everything(tmp_path):
    torch.manual_seed(1)
    source = net()
    saved(tmp_path, source)
    target = net()
    report = load_matching_weights(target, tmp_path, configuration="3d_fullres")
    assert report.matched_fraction == 1.0 and not report.reshaped and not report.missing
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_other_classes_and_channels_keep_their_fresh_layers_and_name_them(tmp_path):
    source = net(in_channels=1, classes=2)
    saved(tmp_path, source)
    target = net(in_channels=3, classes=4)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_matching_weights(target, tmp_path / "models/3d_fullres/fold_0", configuration="3d_fullres")
    names = {n for n, _, _ in report.reshaped}
    assert names and all("head" in n or "stem" in n or n.startswith("encoder.0") for n in names), names
    state = target.state_dict()
    for n in names:
        assert torch.equal(state[n], fresh[n])  # left as initialised
    for n in report.matched:
        assert torch.equal(state[n], source.state_dict()[n])
    assert 0.5 < report.matched_fraction < 1.0
    text = "\n".join(report.lines())
    assert "not matched" in text and str(tmp_path) in text


def test_an_unrelated_network_is_refused(tmp_path):
    saved(tmp_path, net(ndim=2))
    with pytest.raises(AutosegError, match="none of its .* tensors fits"):
        load_matching_weights(net(ndim=3), tmp_path, configuration="3d_fullres")


def test_source_choice_prefers_fold_all_and_names_what_is_there(tmp_path):
    saved(tmp_path, net(), "models/3d_fullres/fold_1")
    saved(tmp_path, net(), "models/3d_fullres/fold_all")
    assert find_source_checkpoint(tmp_path, "3d_fullres").parent.name == "fold_all"
    assert find_source_checkpoint(tmp_path, "2d").parent.name == "fold_all"  # the only trained configuration
    saved(tmp_path, net(ndim=2), "models/2d/fold_0")
    with pytest.raises(AutosegError, match="its models are 2d, 3d_fullres"):
        find_source_checkpoint(tmp_path, "3d_lowres")
    with pytest.raises(AutosegError, match="not found"):
        find_source_checkpoint(tmp_path / "nowhere", "3d_fullres")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"network": Payload()}))
    with pytest.raises(FileFormatError, match="would run code"):
        load_matching_weights(net(), path, configuration="3d_fullres")


def test_cli_fine_tunes_from_a_checkpoint_and_lists_the_unmatched_layers(tmp_path, tiny_brats, capsys):
    import shutil

    from autoseg.cli import main
    from autoseg.networks.checkpoint import load_checkpoint

    ds, wd, plans = tiny_brats
    work = tmp_path / "work"
    shutil.copytree(wd, work, ignore=shutil.ignore_patterns("models"))
    source = net(in_channels=2, classes=5)  # same topology as the tiny plans, other number of outputs
    saved(tmp_path / "pretrained", source)
    argv = ["-q", "train", str(ds.root), "3d_fullres", "all", "--workdir", str(work), "--epochs", "1",
            "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "0", "--device", "cpu", "--no-validation",
            "--init-from", str(tmp_path / "pretrained")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "initialised from" in out and "not matched" in out and "heads" in out
    ckpt = load_checkpoint(work / "models" / "3d_fullres" / "fold_all" / FINAL)
    assert ckpt["init_from"]["matched"] > 0 and ckpt["settings"]["init_from"] == str(tmp_path / "pretrained")


def test_a_path_object_as_source_still_gives_a_safely_loadable_checkpoint(tmp_path):
    from autoseg.training.settings import TrainSettings

    settings = TrainSettings(init_from=tmp_path / "pretrained")  # the Python API takes Paths
    assert settings.init_from == str(tmp_path / "pretrained")
    assert settings.to_json()["init_from"] == str(tmp_path / "pretrained")  # a Path here broke weights_only loading
