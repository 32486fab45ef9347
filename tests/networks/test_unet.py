"""The U-Net builder: it matches the analytic parameter count and memory estimate, and trains."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from topology_helpers import make  # noqa: E402

from autoseg.errors import PlanningError
from autoseg.networks.memory import (
    BYTES_PER_ELEMENT_FP32,
    BYTES_PER_PARAMETER_FP32,
    count_parameters,
    estimate_training_bytes,
    feature_map_elements,
)
from autoseg.networks.topology import UNetTopology
from autoseg.networks.unet import UNet, build_network, measure_training_step

torch.set_num_threads(2)




ANISO = dict(strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
             kernels=((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)))
TOPOLOGIES = {
    "plain_2d": make(2, (4, 8, 16, 16)),
    "plain_3d": make(3, (4, 8, 16)),
    "plain_3d_aniso": make(3, (4, 8, 16, 16), **ANISO),
    "residual_2d": make(2, (4, 8, 16), block="residual", blocks=(1, 2, 2), decoder=(1, 1)),
    # the last two stages keep 16 channels: a stride alone (average pooling, no projection) on the skip
    "residual_3d": make(3, (4, 8, 16, 16), block="residual", blocks=(1, 2, 2, 1), decoder=(1, 1, 1)),
    "residual_3d_aniso": make(3, (4, 8, 16, 16), block="residual", blocks=(1, 1, 2, 1), decoder=(1, 2, 1), **ANISO),
    "one_stage": make(3, (4,)),
}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 2), (4, 3)])
def test_parameter_count_matches_the_analytic_count(name, in_channels, num_classes):
    topo = TOPOLOGIES[name]
    net = UNet(topo, in_channels=in_channels, num_classes=num_classes)
    assert n_params(net) == count_parameters(topo, in_channels=in_channels, num_classes=num_classes)


def test_nnunet_default_3d_network_has_nnunets_parameter_count():
    topo = make(3, (32, 64, 128, 256, 320, 320))
    assert n_params(UNet(topo, in_channels=1, num_classes=3)) == 31_196_399


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_output_shapes_with_and_without_deep_supervision(name):
    topo = TOPOLOGIES[name]
    patch = tuple(2 * d for d in topo.divisible_by)
    net = UNet(topo, in_channels=2, num_classes=3).eval()
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outs = net(x)
        assert isinstance(outs, list) and len(outs) == max(topo.n_stages - 1, 1)
        cumulative = [1] * topo.ndim
        for s, out in enumerate(outs):
            cumulative = [c * st for c, st in zip(cumulative, topo.strides[s], strict=True)]
            assert tuple(out.shape) == (2, 3, *(p // c for p, c in zip(patch, cumulative, strict=True)))
        net.deep_supervision = False
        full = net(x)
    assert isinstance(full, torch.Tensor) and tuple(full.shape) == (2, 3, *patch)
    assert torch.allclose(full, outs[0])  # the same logits, whichever way the flag is set


def test_anisotropic_strides_keep_the_through_plane_axis_until_it_is_pooled():
    topo = TOPOLOGIES["plain_3d_aniso"]
    assert topo.divisible_by == (4, 8, 8)
    outs = UNet(topo, in_channels=1, num_classes=2)(torch.randn(1, 1, 4, 16, 24))
    assert [tuple(o.shape[2:]) for o in outs] == [(4, 16, 24), (4, 8, 12), (2, 4, 6)]


def test_lower_heads_are_skipped_without_deep_supervision():
    net = UNet(TOPOLOGIES["plain_2d"], in_channels=1, num_classes=2, deep_supervision=False)
    calls = []
    for head in net.heads:
        head.register_forward_hook(lambda *_: calls.append(1))
    net(torch.randn(1, 1, 16, 16))
    assert len(calls) == 1


def test_patch_not_divisible_by_the_strides_names_shape_divisor_and_fix():
    net = UNet(TOPOLOGIES["plain_3d_aniso"], in_channels=1, num_classes=2)
    with pytest.raises(PlanningError) as err:
        net(torch.randn(1, 1, 4, 20, 24))
    message = str(err.value)
    assert "(4, 20, 24)" in message and "(4, 8, 8)" in message and "(4, 24, 24)" in message
    assert "pad" in message and "patch" in message
    with pytest.raises(PlanningError, match="channel"):
        net(torch.randn(1, 3, 4, 16, 16))


def test_bad_topology_and_arguments_are_rejected_before_building():
    bad = UNetTopology(strides=((1, 1),), kernel_sizes=((3, 3), (3, 3)), features_per_stage=(4,),
                       n_blocks_per_stage=(1,), n_conv_per_stage_decoder=())
    with pytest.raises(PlanningError, match="kernel_sizes has 2 entries"):
        UNet(bad, in_channels=1, num_classes=2)
    with pytest.raises(PlanningError, match="num_classes=0"):
        UNet(TOPOLOGIES["plain_2d"], in_channels=1, num_classes=0)


def test_weights_are_he_initialised_with_zero_biases():
    torch.manual_seed(0)
    net = UNet(make(3, (16, 32)), in_channels=8, num_classes=2)
    conv = net.encoder[1][1][0]  # 32 -> 32 channels, 3x3x3: fan_in 864
    assert torch.count_nonzero(conv.bias) == 0
    expected = (2.0 / (1 + 1e-4) / (32 * 27)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    assert all(torch.count_nonzero(h.bias) == 0 for h in net.heads)


def test_build_network_reads_the_configuration_topology():
    config = SimpleNamespace(topology=TOPOLOGIES["residual_2d"], patch_size=(16, 16), batch_size=2)
    net = build_network(config, in_channels=1, num_classes=4, deep_supervision=False)
    assert tuple(net(torch.zeros(1, 1, 16, 16)).shape) == (1, 4, 16, 16)
    with pytest.raises(PlanningError, match="UNetTopology"):
        build_network(SimpleNamespace(topology=None), in_channels=1, num_classes=2)


@pytest.mark.parametrize("name", ["plain_3d", "residual_2d"])
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(name):
    torch.manual_seed(0)
    topo = TOPOLOGIES[name]
    patch = (16,) * topo.ndim
    net = UNet(topo, in_channels=1, num_classes=2)
    x = torch.randn(2, 1, *patch)
    target = (x[:, 0] > 0.3).long()  # learnable from the image itself
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        outs = net(x)  # deep supervision: every head gets the target subsampled to its size
        loss = sum(torch.nn.functional.cross_entropy(
            o, target[(slice(None), *(slice(None, None, p // s) for p, s in zip(patch, o.shape[2:])))])
            for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_importing_the_memory_estimate_does_not_import_torch():
    code = "import sys, autoseg, autoseg.networks, autoseg.networks.memory; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- memory: the estimate against a measured training step --------------------------------------------
MEMORY_CASES = [  # (topology, patch, batch): big enough that per-element costs dominate fixed overheads
    ("plain_3d", make(3, (8, 16, 32, 64)), (32, 32, 32), 2),
    ("residual_3d", make(3, (8, 16, 32, 64), block="residual", blocks=(1, 2, 2, 2), decoder=(1, 1, 1)),
     (32, 32, 32), 2),
    ("plain_2d", make(2, (8, 16, 32, 64, 64)), (128, 128), 4),
    ("residual_2d", make(2, (8, 16, 32, 64), block="residual", blocks=(1, 2, 3, 3), decoder=(1, 1, 1)),
     (128, 128), 4),
    ("plain_3d_aniso", make(3, (8, 16, 32, 32), **ANISO), (16, 48, 48), 2),
]


@pytest.mark.parametrize(("name", "topo", "patch", "batch"), MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_fp32_memory_estimate_is_close_to_a_measured_cpu_training_step(name, topo, patch, batch):
    torch.manual_seed(0)
    net = UNet(topo, in_channels=1, num_classes=3)
    measured = measure_training_step(net, patch, batch_size=batch)
    elements = feature_map_elements(topo, patch, num_classes=3) * batch
    # autograd keeps two fp32 activations per counted element: conv output and normalised/activated output
    assert 7.5 < measured.saved_bytes / elements < 8.5
    estimate = estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=3,
                                       bytes_per_element=BYTES_PER_ELEMENT_FP32,
                                       bytes_per_parameter=BYTES_PER_PARAMETER_FP32)
    assert 0.8 < measured.peak_bytes / estimate < 1.2  # measured 0.92-1.01 (torch 2.13, 2 threads)


def test_estimate_scales_like_the_measurement_with_the_batch():
    topo = MEMORY_CASES[0][1]
    net = UNet(topo, in_channels=1, num_classes=3)
    one, three = (measure_training_step(net, (32, 32, 32), batch_size=b).saved_bytes for b in (1, 3))
    per_sample = feature_map_elements(topo, (32, 32, 32), num_classes=3)
    assert (three - one) / 2 == pytest.approx(8 * per_sample, rel=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("name", "topo", "patch", "batch"), MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_mixed_precision_estimate_is_close_to_cuda_peak_memory(name, topo, patch, batch):
    torch.manual_seed(0)
    net = UNet(topo, in_channels=1, num_classes=3)
    batch *= 4  # make activations dominate the CUDA allocator's fixed blocks
    measured = measure_training_step(net, patch, batch_size=batch, device="cuda", amp=True)
    estimate = estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=3)
    assert 0.5 < measured.peak_bytes / estimate < 1.5
    assert measured.saved_bytes / (feature_map_elements(topo, patch, num_classes=3) * batch) < 6
