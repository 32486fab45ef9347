"""The attention U-Net: the U-Net's contract, gates on every skip, exact parameter count, memory estimate."""

from __future__ import annotations

import pytest
import torch
from topology_helpers import make  # noqa: E402

from autoseg.errors import PlanningError
from autoseg.networks import attention_unet, memory
from autoseg.networks.unet import UNet, measure_training_step

torch.set_num_threads(2)




ANISO = {"strides": ((1, 1, 1), (1, 2, 2), (2, 2, 2)), "kernels": ((1, 3, 3), (1, 3, 3), (3, 3, 3))}
TOPOLOGIES = {
    "plain_2d": make(2, (4, 8, 16)),
    "plain_3d": make(3, (4, 8, 16)),
    "residual_2d": make(2, (4, 8, 16), block="residual", blocks=(1, 2, 2), decoder=(1, 1)),
    "residual_3d": make(3, (2, 4, 8), block="residual", blocks=(1, 1, 1), decoder=(1, 1)),
    "plain_3d_aniso": make(3, (4, 8, 16), **ANISO),
    "one_stage": make(2, (3,)),
}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize(("in_channels", "num_classes"), [(1, 2), (3, 4)])
def test_parameter_count_is_exact(name, in_channels, num_classes):
    topo = TOPOLOGIES[name]
    net = attention_unet.build(topo, in_channels=in_channels, num_classes=num_classes)
    assert n_params(net) == attention_unet.count_parameters(topo, in_channels=in_channels, num_classes=num_classes)
    plain = memory.count_parameters(topo, in_channels=in_channels, num_classes=num_classes)
    assert (n_params(net) > plain) == (topo.n_stages > 1)  # the gates' parameters come on top


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_output_shapes_and_attention_maps_with_and_without_deep_supervision(name):
    topo = TOPOLOGIES[name]
    patch = tuple(2 * d for d in topo.divisible_by)
    net = attention_unet.build(topo, in_channels=2, num_classes=3).eval()
    assert (net.in_channels, net.num_classes, net.deep_supervision) == (2, 3, True)
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outs = net(x)
        assert net.attention_maps == []  # only kept on request
        assert isinstance(outs, list) and len(outs) == max(topo.n_stages - 1, 1)
        cumulative = [1] * topo.ndim
        for s, out in enumerate(outs):
            cumulative = [c * st for c, st in zip(cumulative, topo.strides[s], strict=True)]
            assert tuple(out.shape) == (2, 3, *(p // c for p, c in zip(patch, cumulative, strict=True)))
        net.deep_supervision = False
        net.keep_attention = True
        full = net(x)
    assert isinstance(full, torch.Tensor) and tuple(full.shape) == (2, 3, *patch)
    assert torch.allclose(full, outs[0], atol=1e-6)
    # one gate per decoder stage, highest resolution first, shaped like its skip with one channel
    maps = net.attention_maps
    assert len(maps) == topo.n_stages - 1
    for s, gate in enumerate(maps):
        assert tuple(gate.shape) == (2, 1, *outs[s].shape[2:])
        assert not gate.requires_grad and bool(((gate > 0) & (gate < 1)).all())
    net.keep_attention = False
    with torch.no_grad():
        net(x)
    assert net.attention_maps == []  # a forward pass never leaves stale maps


def test_anisotropic_topology_keeps_the_through_plane_axis_until_it_is_pooled():
    topo = TOPOLOGIES["plain_3d_aniso"]
    assert topo.divisible_by == (2, 4, 4)
    net = attention_unet.build(topo, in_channels=1, num_classes=2)
    net.keep_attention = True
    outs = net(torch.randn(1, 1, 4, 8, 12))
    assert [tuple(o.shape[2:]) for o in outs] == [(4, 8, 12), (4, 4, 6)]
    assert [tuple(a.shape[2:]) for a in net.attention_maps] == [(4, 8, 12), (4, 4, 6)]
    with pytest.raises(PlanningError, match="not divisible by"):
        net(torch.randn(1, 1, 3, 8, 12))
    with pytest.raises(PlanningError, match="channel"):
        net.check_input(torch.randn(1, 2, 4, 8, 12))


def test_gates_act_on_the_skips():
    torch.manual_seed(0)
    net = attention_unet.build(TOPOLOGIES["plain_2d"], in_channels=1, num_classes=2, deep_supervision=False).eval()
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        before = net(x)
        for gate in net.gates:  # psi's norm bias drives the gate: fully open (1) vs the learned gate
            torch.nn.init.constant_(gate.psi[1].weight, 0.0)
            torch.nn.init.constant_(gate.psi[1].bias, 30.0)
        opened = net(x)
        net.keep_attention = True
        net(x)
    assert not torch.allclose(before, opened)
    assert all(torch.allclose(m, torch.ones_like(m)) for m in net.attention_maps)
    # a fully open gate is the plain U-Net with the same weights
    unet = UNet(TOPOLOGIES["plain_2d"], in_channels=1, num_classes=2, deep_supervision=False).eval()
    unet.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("gates.")})
    with torch.no_grad():
        assert torch.allclose(unet(x), opened, atol=1e-5)


@pytest.mark.parametrize("name", ["plain_2d", "plain_3d_aniso", "residual_3d"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    topo = TOPOLOGIES[name]
    net = attention_unet.build(topo, in_channels=1, num_classes=2)
    patch = tuple(2 * d for d in topo.divisible_by)
    x = torch.randn(2, 1, *patch)
    if topo.block == "residual":
        # the last norm of every residual block starts at zero (nnU-Net), which blocks the gradient of the
        # conv before it on the very first step; start from a non-zero scale for this check
        for module in net.modules():
            if hasattr(module, "skip") and hasattr(module, "norm"):
                torch.nn.init.constant_(module.norm.weight, 0.5)
    loss = sum((o * torch.randn_like(o)).sum() for o in net(x))
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not bool(p.grad.abs().gt(0).any())]
    assert missing == []


def test_same_seed_same_network_and_same_output():
    topo = TOPOLOGIES["residual_2d"]
    x = torch.randn(2, 1, 16, 16)
    nets = []
    for _ in range(2):
        torch.manual_seed(3)
        nets.append(attention_unet.build(topo, in_channels=1, num_classes=2))
    a, b = nets
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert all(torch.equal(o, p) for o, p in zip(a(x), b(x), strict=True))
    assert all(torch.equal(o, p) for o, p in zip(a(x), a(x), strict=True))


def test_state_dict_round_trip_into_a_fresh_network():
    topo = TOPOLOGIES["plain_3d"]
    torch.manual_seed(0)
    src = attention_unet.build(topo, in_channels=1, num_classes=2, deep_supervision=False).eval()
    torch.manual_seed(1)
    dst = attention_unet.build(topo, in_channels=1, num_classes=2, deep_supervision=False).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))
        dst.load_state_dict(src.state_dict())
        assert torch.equal(src(x), dst(x))
    assert any(k.startswith("gates.") for k in src.state_dict())


def test_feature_map_elements_add_the_gates_conv_outputs():
    topo = make(2, (8, 16, 32))
    unet = memory.feature_map_elements(topo, (32, 32), num_classes=2)
    # gates on stage 0 (8 ch -> 4 + 4 + 1 channels at 32x32) and stage 1 (16 ch -> 8 + 8 + 1 at 16x16)
    assert attention_unet.feature_map_elements(topo, (32, 32), num_classes=2) == unet + 9 * 1024 + 17 * 256
    assert attention_unet.feature_map_elements(TOPOLOGIES["one_stage"], (8, 8), num_classes=2) == \
        memory.feature_map_elements(TOPOLOGIES["one_stage"], (8, 8), num_classes=2)
    with pytest.raises(PlanningError, match="2D"):
        attention_unet.feature_map_elements(topo, (32, 32, 32), num_classes=2)


def test_memory_estimate_is_positive_and_grows_with_patch_and_batch():
    topo = TOPOLOGIES["plain_3d"]

    def est(patch, batch):
        return attention_unet.estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=2)

    assert 0 < est((16, 16, 16), 1) < est((16, 16, 32), 1) < est((32, 32, 32), 1)
    assert est((16, 16, 16), 1) < est((16, 16, 16), 2) < est((16, 16, 16), 4)
    assert est((16, 16, 16), 2) > memory.estimate_training_bytes(topo, (16, 16, 16), batch_size=2, in_channels=1,
                                                                 num_classes=2)
    with pytest.raises(PlanningError, match="batch_size"):
        est((16, 16, 16), 0)


MEMORY_CASES = [  # big enough that per-element costs dominate fixed overheads, small enough for seconds
    ("plain_2d", make(2, (8, 16, 32, 64, 64)), (128, 128), 4),
    ("residual_3d", make(3, (8, 16, 32, 64), block="residual", blocks=(1, 2, 2, 2), decoder=(1, 1, 1)),
     (32, 32, 32), 2),
]


@pytest.mark.parametrize(("name", "topo", "patch", "batch"), MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_fp32_memory_estimate_is_close_to_a_measured_cpu_training_step(name, topo, patch, batch):
    torch.manual_seed(0)
    net = attention_unet.build(topo, in_channels=1, num_classes=3)
    measured = measure_training_step(net, patch, batch_size=batch)
    estimate = attention_unet.estimate_training_bytes(topo, patch, batch_size=batch, in_channels=1, num_classes=3,
                                                      bytes_per_element=memory.BYTES_PER_ELEMENT_FP32,
                                                      bytes_per_parameter=memory.BYTES_PER_PARAMETER_FP32)
    assert 0.8 < measured.peak_bytes / estimate < 1.2  # measured 0.97 (2D) and 0.95 (3D), torch 2.13, 2 threads
