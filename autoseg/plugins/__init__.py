"""Plugins: extra network input channels computed from the images, and label maps derived from segmentations.

Chosen when planning (``autoseg plan DATASET --plugin kle_residual``, ``autoseg.plan(..., plugins=[...])``) and
recorded in ``plans.json``; ``autoseg plugins`` lists what is available. Built in:

* ``kle_residual`` (channel): Karhunen-Loeve residual anomaly map (:mod:`autoseg.plugins.kle`).
* ``peritumoral_zones`` (labels): shells at given distances around the tumour (:mod:`autoseg.plugins.zones`).

Other packages add plugins through the ``autoseg.plugins`` entry-point group (:mod:`autoseg.plugins.registry`).
"""

from autoseg.plugins.base import ChannelPlugin, LabelsPlugin, Param, PluginError, PluginInfo
from autoseg.plugins.labels import derive_labels
from autoseg.plugins.planning import parse_spec, resolve_plugins, with_plugins
from autoseg.plugins.registry import GROUP, available_plugins, get_plugin
from autoseg.plugins.zones import peritumoral_zones

__all__ = ["GROUP", "ChannelPlugin", "LabelsPlugin", "Param", "PluginError", "PluginInfo", "available_plugins",
           "derive_labels", "get_plugin", "parse_spec", "peritumoral_zones", "resolve_plugins", "with_plugins"]
