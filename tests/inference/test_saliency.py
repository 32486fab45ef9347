"""Spatial explanations: Grad-CAM(++) on hand-built networks, occlusion, attention gates, and ``autoseg explain``."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.cli import main
from autoseg.errors import InferenceError
from autoseg.inference.saliency import check_method, default_block, layer_names, resolve_layer, saliency_maps
from autoseg.io.image import read_image
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet


class IgnoresChannelOne(nn.Module):
    """Feature c is input channel c (a grouped 1x1 conv); both outputs read feature 0 only."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(2, 2, 1, groups=2, bias=False)
        self.head = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.features.weight.fill_(1.0)
            self.head.weight.copy_(torch.tensor([[-1.0, 0.0], [1.0, 0.0]])[:, :, None, None])
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _two_regions() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = np.zeros((2, 16, 16), np.float32)
    data[0, 2:6, 2:6] = 1.0  # only channel 0 here
    data[1, 10:14, 10:14] = 1.0  # only channel 1 here
    a, b = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    a[2:6, 2:6], b[10:14, 10:14] = True, True
    return data, a, b


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_gradcam_puts_no_mass_on_features_of_an_ignored_channel(method):
    data, a, b = _two_regions()
    mask = np.ones((1, 16, 16), bool)
    cam = saliency_maps([IgnoresChannelOne()], data, mask, [1], method=method, patch_size=(16, 16),
                        layer="features")[0]
    assert cam.shape == (16, 16)
    assert cam[b].max() == 0.0  # the features of channel 1 get no weight
    assert cam[a].min() > 0 and cam[a].sum() == pytest.approx(cam.sum(), rel=1e-5)


class DecidedByOneRegion(nn.Module):
    """Output 1 everywhere is the summed input of rows/cols 4:8; output 0 is constant."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        s = x[:, :, 4:8, 4:8].sum(dim=(1, 2, 3)) * self.scale
        one = s[:, None, None, None].expand(-1, 1, *x.shape[2:])
        return torch.cat([torch.zeros_like(one), one], dim=1)


def test_occlusion_of_the_deciding_region_lowers_its_logit_with_bounded_batches():
    net = DecidedByOneRegion()
    data = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32) + 0.5
    occ = saliency_maps([net], data, np.ones((1, 16, 16), bool), [1], method="occlusion", patch_size=(16, 16),
                        batch=3)[0]
    inside = np.zeros((16, 16), bool)
    inside[4:8, 4:8] = True
    assert occ[inside].min() > 0 and np.abs(occ[~inside]).max() < 1e-4
    with torch.no_grad():  # and blanking that region really lowers the logit
        x = torch.from_numpy(data)[None]
        blanked = x.clone()
        blanked[:, :, 4:8, 4:8] = 0
        assert float(net(blanked)[0, 1].sum()) < float(net(x)[0, 1].sum())
    # memory bound: every call sees at most `batch` windows of the patch, never the volume times the occluders
    big = np.random.default_rng(1).random((2, 48, 40)).astype(np.float32)
    net.shapes.clear()
    saliency_maps([net], big, np.ones((1, 48, 40), bool), [1], method="occlusion", patch_size=(16, 16), batch=3)
    n_windows, per_window = 5 * 4, (16 // 4) ** 2  # windows at step 8; default block = patch / 4
    assert default_block((16, 16)) == (4, 4)
    assert max(s[0] for s in net.shapes) <= 3 and {s[1:] for s in net.shapes} == {(2, 16, 16)}
    assert len(net.shapes) == n_windows * (1 + -(-per_window // 3))  # one plain pass + ceil(16 / 3) per window


def _unet() -> UNet:
    topo = UNetTopology(strides=((1, 1), (2, 2)), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4, 8),
                        n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    return UNet(topo, in_channels=1, num_classes=2, deep_supervision=False)


def test_attention_is_refused_on_a_plain_unet_and_layers_are_listed():
    net = _unet()
    with pytest.raises(InferenceError, match="attention_unet") as err:
        check_method("attention", net)
    assert "\n" not in str(err.value)
    with pytest.raises(InferenceError, match="decoder.0"):
        resolve_layer(net, "decoder.7")
    assert resolve_layer(net, None) is dict(net.named_modules())["decoder.0"]
    assert "encoder.1" in layer_names(net)


def test_attention_map_is_the_gate_and_maps_cover_2d_patches_on_3d_data():
    from autoseg.networks.attention_unet import build

    topo = UNetTopology(strides=((1, 1), (2, 2)), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4, 8),
                        n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,))
    net = build(topo, in_channels=1, num_classes=2, deep_supervision=False).eval()
    data = np.random.default_rng(0).random((1, 3, 16, 16)).astype(np.float32)
    maps = saliency_maps([net], data, np.ones((2, 3, 16, 16), bool), [1, 1], method="attention", patch_size=(16, 16))
    net.keep_attention = True
    with torch.no_grad():
        net(torch.from_numpy(data[:, 1])[None])
    np.testing.assert_allclose(maps[0, 1], net.attention_maps[0][0, 0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(maps[0], maps[1])
    assert "gates.0" not in layer_names(net)  # the gates are called through .gate(): no activations to hook
    for method in ("gradcam", "gradcam++"):
        with pytest.raises(InferenceError, match="not called by the network's forward pass"):
            saliency_maps([net], data, np.ones((1, 3, 16, 16), bool), [1], method=method, patch_size=(16, 16),
                          layer="gates.0")


def test_cli_spatial_maps_have_the_input_geometry(trained, tmp_path, capsys):
    ds, wd, _ = trained
    out = tmp_path / "maps"
    assert main(["-q", "explain", "--workdir", str(wd), "-i", str(ds.root / "imagesTs"), "--max-cases", "1",
                 "--method", "gradcam", "-o", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "explanations.csv", newline="")))
    assert len(rows) == 3 and {r["method"] for r in rows} == {"gradcam"}  # 3 regions, one case
    image = read_image(next((ds.root / "imagesTs").glob(f"{rows[0]['case']}_0000.*")))
    for r in rows:
        m = read_image(r["file"])
        assert m.array.shape == image.array.shape and m.geometry.differences(image.geometry) == []
        assert open(r["overlay"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["-q", "explain", "--workdir", str(wd), "-i", str(ds.root / "imagesTs"), "--method", "attention",
                 "-o", str(out)]) == 2
    assert "attention_unet" in capsys.readouterr().err


def test_cli_evaluate_scores_a_trained_model_end_to_end(trained, tmp_path, capsys, monkeypatch):
    from autoseg.evaluation import explanation_scores
    from autoseg.evaluation.explanation_scores import auc

    fractions = (0.0, 0.5, 2.0)  # 4 predictions per map instead of 14: 3 regions x 3 maps
    monkeypatch.setattr(explanation_scores, "FRACTIONS", fractions)
    ds, wd, _ = trained
    out = tmp_path / "scored"
    assert main(["-q", "explain", "--workdir", str(wd), "-i", str(ds.root / "imagesTs"), "-r",
                 str(ds.root / "labelsTs"), "--max-cases", "1", "--method", "gradcam", "--evaluate",
                 "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Explanation quality" in printed and "gradcam: " in printed
    rows = list(csv.DictReader(open(out / "explanation_scores.csv", newline="")))
    assert len(rows) == 9 and {r["method"] for r in rows} == {"random", "distance", "gradcam"}  # 3 regions
    firsts: dict[str, set] = {}
    for r in rows:
        deletion, insertion = ([float(v) for v in r[k].split()] for k in ("deletion_curve", "insertion_curve"))
        assert len(deletion) == len(insertion) == len(fractions)
        assert float(r["deletion_auc"]) == pytest.approx(auc(fractions, deletion), abs=1e-4)
        assert float(r["insertion_auc"]) == pytest.approx(auc(fractions, insertion), abs=1e-4)
        assert 0 <= float(r["mass_inside"]) <= 1
        firsts.setdefault(r["class"], set()).add((deletion[0], insertion[0]))
    # nothing blanked (deletion) and everything blanked (insertion) are the same predictions for every map
    assert len(firsts) == 3 and all(len(v) == 1 for v in firsts.values())
