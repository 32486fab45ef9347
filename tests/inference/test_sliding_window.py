"""Sliding-window prediction: windows cover the image, weights normalise, mirroring and padding are exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg.errors import AutosegError
from autoseg.inference.sliding_window import InferenceError, gaussian_importance_map, predict_logits, window_starts


def repeat_net(n: int):
    """'Network' returning its first input channel n times (identity-like, mirror-equivariant)."""
    return lambda x: x[:, :1].repeat(1, n, *([1] * (x.ndim - 2)))


@pytest.mark.parametrize("size,patch,step", [(160, 64, 0.5), (100, 64, 0.5), (97, 30, 0.3), (64, 64, 0.5),
                                             (65, 64, 0.5), (200, 48, 1.0), (50, 7, 0.25), (40, 64, 0.5)])
def test_window_starts_cover_and_overlap(size, patch, step):
    (starts,) = window_starts((size,), (patch,), step)
    assert starts[0] == 0
    if size <= patch:
        assert starts == [0]
        return
    assert starts[-1] + patch == size  # last window ends at the border
    gaps = np.diff(starts)
    assert (gaps > 0).all()
    assert (patch - gaps >= (1 - step) * patch - 1e-9).all()  # overlap of at least (1 - step) * patch
    assert len(starts) == int(np.ceil((size - patch) / np.floor(patch * step))) + 1


def test_window_starts_examples_and_errors():
    assert window_starts((160, 64, 32), (64, 64, 64), 0.5) == [[0, 32, 64, 96], [0], [0]]
    with pytest.raises(InferenceError, match=r"step_size"):
        window_starts((10,), (4,), 0.0)
    with pytest.raises(AutosegError, match="axes"):
        window_starts((10, 10), (4,), 0.5)


def test_gaussian_map():
    g = gaussian_importance_map((9, 8, 7))
    assert g.dtype == torch.float32 and tuple(g.shape) == (9, 8, 7)
    assert float(g.max()) == 1.0 and float(g.min()) > 0
    assert torch.equal(g, torch.flip(g, (0, 1, 2)))  # symmetric
    assert float(g[4, 3, 3]) > float(g[0, 0, 0])


@pytest.mark.parametrize("step", [0.5, 1.0])
@pytest.mark.parametrize("use_gaussian", [True, False])
def test_identity_network_reproduces_input_3d(step, use_gaussian):
    image = torch.randn(1, 20, 23, 17, generator=torch.Generator().manual_seed(0))
    out = predict_logits(repeat_net(2), image, patch_size=(8, 8, 8), num_outputs=2, step_size=step,
                         use_gaussian=use_gaussian, batch_size=3)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert tuple(out.shape) == (2, 20, 23, 17)
    torch.testing.assert_close(out[0], image[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], image[0], rtol=1e-5, atol=1e-5)


def test_conv_network_on_numpy_input_matches_direct_application():
    conv = torch.nn.Conv3d(2, 3, kernel_size=1)  # pointwise: windowing must not change the result
    image = np.random.default_rng(1).standard_normal((2, 12, 14, 10)).astype(np.float32)
    out = predict_logits(conv, image, patch_size=(6, 8, 6), num_outputs=3)
    with torch.no_grad():
        direct = conv(torch.from_numpy(image)[None])[0]
    torch.testing.assert_close(out, direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("step", [0.5, 1.0])
def test_2d_network_on_3d_volume_slice_by_slice(step):
    image = torch.randn(1, 5, 19, 22, generator=torch.Generator().manual_seed(2))
    calls = []

    def net(x):
        assert x.ndim == 4 and tuple(x.shape[2:]) == (8, 8)  # (B, C, y, x): 2D windows
        calls.append(x.shape[0])
        return repeat_net(2)(x)

    out = predict_logits(net, image, patch_size=(8, 8), num_outputs=2, step_size=step, batch_size=4,
                         mirror_axes=(0, 1))
    assert tuple(out.shape) == (2, 5, 19, 22)
    torch.testing.assert_close(out[1], image[0], rtol=1e-5, atol=1e-5)
    assert max(calls) == 4  # windows of several slices are batched together


def test_mirroring_with_equivariant_network_changes_nothing():
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    image = torch.randn(1, 16, 12, 10, generator=torch.Generator().manual_seed(3))
    plain = predict_logits(conv, image, patch_size=(8, 8, 8), num_outputs=2)
    mirrored = predict_logits(conv, image, patch_size=(8, 8, 8), num_outputs=2, mirror_axes=(0, 1, 2))
    torch.testing.assert_close(mirrored, plain, rtol=1e-5, atol=1e-5)


def test_mirroring_averages_flipped_predictions():
    image = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1).repeat(1, 1, 4)
    # a network that adds a ramp along axis 0: mirroring averages ramp and flipped ramp
    ramp = torch.arange(8, dtype=torch.float32).reshape(1, 1, 8, 1)
    out = predict_logits(lambda x: x + ramp, image, patch_size=(8, 4), num_outputs=1, mirror_axes=(0,))
    torch.testing.assert_close(out[0], image[0] + 3.5, rtol=1e-6, atol=1e-5)


def test_image_smaller_than_patch_is_padded_and_cropped_back():
    image = torch.randn(1, 5, 30, 7, generator=torch.Generator().manual_seed(4))
    out = predict_logits(repeat_net(3), image, patch_size=(8, 16, 8), num_outputs=3, mirror_axes=(2,))
    assert tuple(out.shape) == (3, 5, 30, 7)
    torch.testing.assert_close(out[2], image[0], rtol=1e-5, atol=1e-5)


def test_image_equal_to_patch_is_one_window():
    calls = []

    def net(x):
        calls.append(1)
        return x

    image = torch.randn(1, 8, 8, 8)
    out = predict_logits(net, image, patch_size=(8, 8, 8), num_outputs=1)
    assert len(calls) == 1
    torch.testing.assert_close(out, image, rtol=1e-6, atol=1e-6)


def test_clear_errors():
    image = torch.zeros(1, 8, 8)
    with pytest.raises(InferenceError, match="deep supervision"):
        predict_logits(lambda x: [x, x], image, patch_size=(8, 8), num_outputs=1)
    with pytest.raises(InferenceError, match=r"expected \(1, 2, 8, 8\)"):
        predict_logits(lambda x: x, image, patch_size=(8, 8), num_outputs=2)
    with pytest.raises(InferenceError, match="mirror_axes"):
        predict_logits(lambda x: x, image, patch_size=(8, 8), num_outputs=1, mirror_axes=(2,))
    with pytest.raises(InferenceError, match="spatial axes"):
        predict_logits(lambda x: x, torch.zeros(8, 8), patch_size=(8, 8, 8), num_outputs=1)
    with pytest.raises(InferenceError, match="non-finite"):
        predict_logits(lambda x: x / 0, image, patch_size=(8, 8), num_outputs=1)


def test_cpu_float32_network_is_traced_and_optimised_with_the_same_output():
    from autoseg.inference.sliding_window import inference_network
    from autoseg.networks.topology import UNetTopology
    from autoseg.networks.unet import UNet

    topo = UNetTopology(strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 2, features_per_stage=(4, 8),
                        n_blocks_per_stage=(1, 1), n_conv_per_stage_decoder=(1,), block="plain")
    net = UNet(topo, in_channels=2, num_classes=3, deep_supervision=True)
    fast = inference_network(net, in_channels=2, patch_size=(8, 8, 8), device="cpu", amp=False)
    assert isinstance(fast, torch.jit.ScriptModule) and net.deep_supervision is False
    assert inference_network(net, in_channels=2, patch_size=(8, 8, 8), device="cpu", amp=True) is net
    image = torch.rand(2, 12, 10, 9)
    kw = {"patch_size": (8, 8, 8), "num_outputs": 3, "mirror_axes": (0, 2)}
    with torch.inference_mode():
        eager = predict_logits(net, image, **kw)
        traced = predict_logits(fast, image, **kw, batch_size=2)  # another batch size than traced with
    assert torch.allclose(eager, traced, atol=1e-4)
