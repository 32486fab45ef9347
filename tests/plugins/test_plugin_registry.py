"""The plugin table, parameter checks, third-party entry points, plans that carry plugins, `autoseg plugins`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from autoseg import registry
from autoseg.cli import plugins as cli_plugins
from autoseg.planner.plans import Plans
from autoseg.plugins import (
    ChannelPlugin,
    Param,
    PluginError,
    PluginInfo,
    available_plugins,
    get_plugin,
    parse_spec,
    resolve_plugins,
    with_plugins,
)


class _Ones(ChannelPlugin):
    """A third-party channel: a constant."""

    def __init__(self, *, value: float = 1.0) -> None:
        self.value = value

    def fit(self, cases, ndim):
        return {}

    def compute(self, state, data, ndim):
        return np.full((1, *data.shape[1:]), self.value, np.float32)


ONES = PluginInfo(name="ones", kind="channel", doc="A constant channel.",
                  params=(Param("value", "float", 1.0, "the constant"),), build=_Ones)


class _EntryPoint:
    """What importlib.metadata yields, reduced to what the registry reads."""

    def __init__(self, name, value, obj):
        self.name, self.value, self._obj = name, value, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def _fake_entry_points(monkeypatch, *eps):
    monkeypatch.setattr(registry, "entry_points", lambda group: list(eps) if group == registry.GROUP else [])


def test_built_in_plugins_are_listed_with_kinds_docs_and_defaults():
    table = available_plugins()
    assert {"kle_residual", "peritumoral_zones"} <= set(table)
    kle, zones = table["kle_residual"], table["peritumoral_zones"]
    assert (kle.kind, zones.kind, zones.output) == ("channel", "labels", "zones")
    assert kle.validate({}) == {"grid": 48, "n_components": 32}
    assert zones.validate({}) == {"widths_mm": [5.0, 10.0], "labels": None, "within_body": False}
    assert kle.summary and "grid=48" in "\n".join(kle.describe())


def test_unknown_plugin_names_what_exists_and_the_closest():
    with pytest.raises(PluginError, match=r"no plugin 'kle_resdual' \(did you mean 'kle_residual'\?\); available: "
                                          r"kle_residual, peritumoral_zones"):
        get_plugin("kle_resdual")


@pytest.mark.parametrize("spec, message", [
    ("kle_residual:grid=2", r"grid='2' is not allowed: expected an integer >= 4 and <= 256"),
    ("kle_residual:n_components=1.5", r"n_components='1.5' is not allowed: expected an integer >= 1"),
    ("kle_residual:colour=red", r"no parameter 'colour'; its parameters: grid \(.*\), n_components"),
    ("peritumoral_zones:widths_mm=5,-1", r"widths_mm='5,-1' is not allowed: expected comma-separated numbers"),
    ("peritumoral_zones:within_body=maybe", r"within_body='maybe' is not allowed: expected true or false"),
    ("peritumoral_zones:widths_mm", r"'widths_mm' is not KEY=VALUE"),
])
def test_bad_parameters_say_what_is_allowed(spec, message):
    with pytest.raises(PluginError, match=message):
        resolve_plugins([spec])


def test_choices_parse_from_text_and_mappings_with_defaults_filled_in():
    assert parse_spec("peritumoral_zones:widths_mm=5,10;labels=1") == (
        "peritumoral_zones", {"widths_mm": "5,10", "labels": "1"})
    chosen = resolve_plugins(["kle_residual:grid=32", {"name": "peritumoral_zones",
                                                        "params": {"widths_mm": [3], "labels": [1, 2]}}])
    assert chosen == ({"name": "kle_residual", "kind": "channel", "params": {"grid": 32, "n_components": 32}},
                      {"name": "peritumoral_zones", "kind": "labels",
                       "params": {"widths_mm": [3.0], "labels": [1, 2], "within_body": False}})
    assert resolve_plugins(chosen) == chosen  # the stored form goes back in unchanged
    with pytest.raises(PluginError, match="chosen twice"):
        resolve_plugins(["kle_residual", "kle_residual:grid=8"])


def test_entry_point_plugins_are_discovered_and_usable(monkeypatch):
    _fake_entry_points(monkeypatch, _EntryPoint("ones", "thirdparty.plugins:ONES", ONES))
    table = available_plugins()
    assert table["ones"].origin == "entry point thirdparty.plugins:ONES"
    assert list(table)[:2] == ["kle_residual", "peritumoral_zones"]
    assert resolve_plugins(["ones:value=2"])[0]["params"] == {"value": 2.0}
    data = np.zeros((2, 3, 4, 5), np.float32)
    assert table["ones"].create({"value": 3}).compute({}, data, 3).max() == 3.0


@pytest.mark.parametrize("ep, message", [
    (_EntryPoint("broken", "thirdparty:BROKEN", ImportError("no module thirdparty")), "failed to load"),
    (_EntryPoint("odd", "thirdparty:ODD", 42), "gives a int, not an autoseg.plugins.PluginInfo"),
    (_EntryPoint("other", "thirdparty:ONES", ONES), "declares a plugin named 'ones'"),
    (_EntryPoint("kle_residual", "thirdparty:KLE", ONES.__class__(
        name="kle_residual", kind="channel", doc="x", params=(), build=_Ones)), "reuses the name"),
])
def test_broken_entry_points_are_named_with_the_fix(monkeypatch, ep, message):
    _fake_entry_points(monkeypatch, ep)
    with pytest.raises(PluginError, match=message) as err:
        available_plugins()
    assert "uninstall" in str(err.value) or "rename" in str(err.value)


def _plans() -> Plans:
    return Plans(dataset_name="Toy", preset="cpu", gpu_memory_gb=8.0, seed=1, channel_names=("t1", "t2"),
                 labels={"background": 0, "tumour": 1}, num_training=12, transpose_forward=(0, 1, 2),
                 transpose_backward=(0, 1, 2), original_median_spacing=(1.0, 1.0, 1.0),
                 original_median_shape=(64.0, 64.0, 64.0), decisions=("target spacing 1x1x1",))


def test_plans_carry_plugins_through_json_and_explain_them(tmp_path):
    plain = _plans()
    assert "plugins" not in plain.to_json()  # plans without plugins are written as before
    plans = with_plugins(plain, ["kle_residual", "peritumoral_zones:widths_mm=5,10:labels=1"])
    plans.save(tmp_path / "plans.json")
    back = Plans.load(tmp_path / "plans.json")
    assert back == plans and back.plugins[1]["params"]["labels"] == [1]
    text = "\n".join(back.explain())
    assert "plugin kle_residual (channel; grid=48, n_components=32): adds 1 network input channel" in text
    assert "32 component(s) capped at 11 (12 training cases - 1)" in text
    assert "OUTPUT/zones/<case>" in text
    again = with_plugins(back, [])  # choosing again replaces the plugins and their decisions
    assert again.plugins == () and again.decisions == plain.decisions
    old = json.loads((tmp_path / "plans.json").read_text())
    del old["plugins"]  # a plans.json from before plugins existed
    assert Plans.from_json(old).plugins == ()


def test_plugins_command_lists_every_plugin_with_parameters(capsys):
    parser = argparse.ArgumentParser()
    cli_plugins.add_parsers(parser.add_subparsers(dest="command"))
    assert cli_plugins.COMMANDS["plugins"](parser.parse_args(["plugins"])) == 0
    out = capsys.readouterr().out
    assert "kle_residual (channel)" in out and "widths_mm=5,10" in out and "labels=all" in out
    assert cli_plugins.COMMANDS["plugins"](parser.parse_args(["plugins", "peritumoral_zones"])) == 0
    assert "distance" in capsys.readouterr().out
    with pytest.raises(PluginError, match="available"):
        cli_plugins.COMMANDS["plugins"](parser.parse_args(["plugins", "zones"]))
