"""Labels plugins in the pipeline: maps derived from each prediction, or from any label file.

``autoseg predict`` writes, for each case, ``OUTPUT/<output>/<case><ending>`` (e.g. ``OUTPUT/zones/``) for every
labels plugin of the plans, from the final segmentation (after postprocessing and ``--map-labels``), in the
segmentation's geometry. :func:`derive_labels` does the same for a reference or any other label file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.io.image import Geometry, read_image, read_label, write_label
from autoseg.planner.plans import Plans
from autoseg.plugins.base import LABELS, LabelsPlugin, PluginError, PluginInfo, create_plugin
from autoseg.plugins.planning import chosen_plugins
from autoseg.plugins.registry import get_plugin


def body_mask(images: np.ndarray, missing: Sequence[int] = ()) -> np.ndarray:
    """The image's nonzero region: voxels where any acquired channel of ``(C, *spatial)`` is not 0."""
    present = [c for c in range(images.shape[0]) if c not in set(missing)] or list(range(images.shape[0]))
    mask = np.zeros(images.shape[1:], bool)
    for c in present:
        mask |= images[c] != 0
    return mask


@dataclass(frozen=True)
class DerivedLabels:
    """The labels plugins of a model's plans, ready to run on its predictions."""

    plugins: tuple[tuple[PluginInfo, LabelsPlugin], ...]

    @classmethod
    def from_plans(cls, plans: Plans) -> DerivedLabels | None:
        """None when the plans name no labels plugin.

        Raises:
            PluginError: a plugin of the plans is not installed.
        """
        chosen = [(info, p) for _, info, p in chosen_plugins(plans, LABELS) if isinstance(p, LabelsPlugin)]
        return cls(tuple(chosen)) if chosen else None

    @property
    def needs_body(self) -> bool:
        """Some plugin needs the image's nonzero region (pass :func:`body_mask` of the inputs to :meth:`write`)."""
        return any(p.needs_body for _, p in self.plugins)

    def write(self, seg_path: str | os.PathLike[str], seg: np.ndarray, geometry: Geometry,
              body: np.ndarray | None = None) -> list[Path]:
        """Derive and write each map next to the segmentation ``seg_path``: ``<its folder>/<output>/<its name>``."""
        seg_path = Path(seg_path)
        written = []
        for info, plugin in self.plugins:
            target = seg_path.parent / info.output / seg_path.name
            write_label(target, plugin.derive(seg, geometry.array_spacing, body), geometry)
            written.append(target)
        return written


def derive_labels(label_file: str | os.PathLike[str], output: str | os.PathLike[str], *,
                  plugin: str = "peritumoral_zones", params: Mapping[str, Any] | None = None,
                  images: Sequence[str | os.PathLike[str]] = ()) -> Path:
    """Apply a labels plugin to a label file (e.g. a reference segmentation) and write the result.

    Args:
        label_file: the segmentation.
        output: the file to write (its ending chooses the format); the label file's geometry is kept.
        plugin: a labels plugin name (``autoseg plugins`` lists them).
        params: its parameters (defaults for the others).
        images: the case's image files, needed by plugins that use the image (e.g. ``within_body=True``).

    Returns:
        ``output``.

    Raises:
        PluginError: unknown plugin, not a labels plugin, bad parameters, or images that do not fit the labels.

    Example:
        >>> derive_labels("labelsTr/case_000.nii.gz", "zones/case_000.nii.gz",
        ...               params={"widths_mm": [5, 10]})  # doctest: +SKIP
    """
    info = get_plugin(plugin)
    if info.kind != LABELS:
        raise PluginError(f"plugin {plugin!r} is a {info.kind} plugin; derive_labels takes a labels plugin.")
    obj = create_plugin(info, params)
    assert isinstance(obj, LabelsPlugin)
    label = read_label(label_file)
    body = None
    if obj.needs_body:
        if not images:
            raise PluginError(f"{label_file}: plugin {plugin!r} with these parameters uses the image; pass its files "
                              "(images=[...]).")
        chans = [read_image(p).array for p in images]
        if any(c.shape[1:] != label.array.shape for c in chans):
            raise PluginError(f"{label_file}: the images {[str(p) for p in images]} do not have the label map's "
                              f"shape {label.array.shape}.")
        body = body_mask(np.concatenate(chans))
    out = Path(output)
    write_label(out, obj.derive(label.array, label.geometry.array_spacing, body), label.geometry)
    return out
