"""Every registered network, loss and augmentation keeps the part contract of :mod:`autoseg.training.contracts`.

The parameters come from :func:`~autoseg.training.parts.part_tables` at collection time, so a part an installed
package registers (``autoseg.plugins`` entry point) is checked by this suite without any change to it. The last
tests hand the checks deliberately broken parts, to show that they fail, and with the message a part's author needs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from autoseg import registry
from autoseg.errors import TrainingConfigError
from autoseg.networks.parts import NetworkPart, UNetPart
from autoseg.networks.unet import UNet
from autoseg.registry import PluginInfo
from autoseg.training.augmentation_presets import AugmentationPreset
from autoseg.training.contracts import NETWORK_CHECKS, check_augmentation, check_loss, check_network, check_part
from autoseg.training.losses import dice_ce
from autoseg.training.parts import augmentation_part, loss_part, part_tables

#: network checks that take ~10 s or more on 2 CPU cores (SwinUNETR's smallest patches are 64 x 32 (x 32))
SLOW = {("swin_unetr", check) for check in ("outputs", "gradients", "determinism", "state_dict", "onnx")}
#: contract failures of built-in parts, reported and left to their owners; strict, so a fix shows as XPASS
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def network_params(tables):
    """One test per (network, check), with the slow and known-failure marks."""
    out = []
    for name in tables["network"]:
        for check in NETWORK_CHECKS:
            marks = [pytest.mark.slow] if (name, check) in SLOW else []
            if (name, check) in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(raises=AssertionError, strict=True,
                                               reason=KNOWN_FAILURES[(name, check)]))
            out.append(pytest.param(name, check, marks=marks, id=f"{name}-{check}"))
    return out


TABLES = part_tables()


@pytest.mark.parametrize(("name", "check"), network_params(TABLES))
def test_network_keeps_the_contract(name, check):
    check_network(name, checks=(check,))


@pytest.mark.parametrize("name", list(TABLES["loss"]))
def test_loss_keeps_the_contract(name):
    check_part("loss", name)


@pytest.mark.parametrize("name", list(TABLES["augmentation"]))
def test_augmentation_keeps_the_contract(name):
    check_part("augmentation", name)


# ---- a part an installed package registers is put under the contract ------------------------------------
class _EntryPoint:
    """What importlib.metadata yields, reduced to what the registry reads."""

    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"thirdparty.parts:{name.upper()}", obj

    def load(self):
        return self._obj


TINY_NET = PluginInfo("tiny_net", "network", "A third party's network.", (), lambda: UNetPart("plain"))
TINY_LOSS = loss_part("tiny_loss", dice_ce)


def test_an_installed_part_gets_checked_without_changing_the_suite(monkeypatch):
    eps = [_EntryPoint("tiny_net", TINY_NET), _EntryPoint("tiny_loss", TINY_LOSS)]
    monkeypatch.setattr(registry, "entry_points", lambda group: eps if group == registry.GROUP else [])
    tables = part_tables()
    assert {p.values for p in network_params(tables)} >= {("tiny_net", c) for c in NETWORK_CHECKS}
    assert "tiny_loss" in tables["loss"]
    check_part("network", "tiny_net", ndims=(2,))
    check_part("loss", "tiny_loss")


def test_an_author_can_check_a_part_before_registering_it():
    check_network(TINY_NET, ndims=(2,))
    check_network(UNetPart("residual"), ndims=(3,), checks=("outputs", "parameter_count"))
    check_loss(dice_ce)
    check_augmentation(augmentation_part("crop_only", lambda: AugmentationPreset(p_rotation=0.0)), ndims=(2,))


def test_kinds_without_a_contract_and_unknown_checks_are_refused():
    with pytest.raises(ValueError, match="checked kinds: network, loss, augmentation"):
        check_part("optimizer", "sgd")
    with pytest.raises(ValueError, match="choose among outputs"):
        check_network("unet", checks=("speed",))


# ---- broken parts fail ----------------------------------------------------------------------------------
class _LyingCount(UNetPart):
    def count_parameters(self, topology, *, in_channels, num_classes):
        return super().count_parameters(topology, in_channels=in_channels, num_classes=num_classes) + 1


class _TensorOnly(UNet):
    def forward(self, x):
        out = super().forward(x)
        return out[0] if isinstance(out, list) else out


class _UnusedLayer(UNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spare = torch.nn.Linear(2, 2)


class _AcceptsAnything(UNet):
    def check_input(self, x):
        pass


class _Unseeded(UNet):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            self.heads[0].bias.copy_(torch.from_numpy(np.random.rand(self.num_classes)))


class _Built(NetworkPart):
    def __init__(self, cls):
        self.cls = cls

    def build(self, topology, *, in_channels, num_classes, deep_supervision=True):
        return self.cls(topology, in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision)


@pytest.mark.parametrize(("part", "check", "message"), [
    (_LyingCount("plain"), "parameter_count", r"count_parameters says (\d+), the built network has"),
    (_Built(_TensorOnly), "outputs", r"with deep_supervision=True forward must return a list of logits.*returned a "
                                     r"Tensor \(2, 3, 16, 16\)"),
    (_Built(_UnusedLayer), "gradients", r"2 of \d+ parameters got no gradient.*spare.weight, spare.bias"),
    (_Built(_AcceptsAnything), "check_input", r"check_input accepted \(2, 3, 16, 16\), which has 3 channels"),
    (_Built(_Unseeded), "determinism", r"differ in heads.0.bias; initialise from torch's global generator"),
], ids=["lying-count", "tensor-with-deep-supervision", "unused-layer", "no-channel-check", "unseeded"])
def test_a_broken_network_fails_with_a_message_naming_it(part, check, message):
    with pytest.raises(AssertionError, match=message) as err:
        check_network(part, ndims=(2,), checks=(check,))
    assert str(err.value).startswith(f"network '{type(part).__name__}' (2D, strides [[1, 1], [2, 2], [2, 2]], "
                                     "patch (16, 16)): ")


def _ignores_nothing(*, regions, batch_dice, ignore_label):
    """Cross-entropy that treats the ignore label as a class (so it never ignores anything)."""
    if regions:
        raise TrainingConfigError("labels only")
    return lambda logits, target: torch.nn.functional.cross_entropy(
        logits, target.long()[:, 0].clamp(max=logits.shape[1] - 1))


def _rewards_mistakes(*, regions, batch_dice, ignore_label):
    if not regions:
        raise TrainingConfigError("regions only")
    return lambda logits, target: -torch.nn.functional.binary_cross_entropy_with_logits(logits, target[:, :3])


def _refuses_everything(*, regions, batch_dice, ignore_label):
    raise TrainingConfigError("no mode")


@pytest.mark.parametrize(("factory", "message"), [
    (_ignores_nothing, r"loss '_ignores_nothing' \(labels, 2D, ignore_label=3, batch_dice=False\): ignored voxels get "
                       "a gradient"),
    (_rewards_mistakes, r"loss '_rewards_mistakes' \(regions, 2D, ignore_label=None, batch_dice=False\): a "
                        "near-perfect prediction scores .*, not lower than a wrong one"),
    (_refuses_everything, "refuses both label and region training"),
])
def test_a_broken_loss_fails_with_a_message_naming_it(factory, message):
    with pytest.raises(AssertionError, match=message):
        check_loss(factory)


def test_an_augmentation_that_is_not_a_preset_fails():
    with pytest.raises(AssertionError, match=r"augmentation 'broken': the factory gave a dict, not an "
                                             "AugmentationPreset"):
        check_augmentation(augmentation_part("broken", lambda: {}))

