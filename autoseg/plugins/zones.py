"""Peritumoral risk zones: shells at given distances (mm) around a segmented tumour.

Zone ``i`` holds the voxels outside the tumour whose distance to the nearest tumour voxel lies in
``(w_1 + ... + w_{i-1}, w_1 + ... + w_i]`` mm (``widths_mm = (5, 10)``: zone 1 = (0, 5] mm, zone 2 = (5, 15] mm).
Distances are Euclidean between voxel centres with the image's spacing (anisotropic voxels are respected).
The tumour is the union of ``labels`` (default: every foreground label); ``within_body`` keeps only voxels
inside the image's nonzero region (e.g. not in the air around a head).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from autoseg.plugins.base import LABELS, LabelsPlugin, Param, PluginError, PluginInfo

WIDTHS_MM = (5.0, 10.0)


def peritumoral_zones(seg: np.ndarray, spacing: Sequence[float], *, labels: Sequence[int] | None = None,
                      widths_mm: Sequence[float] = WIDTHS_MM, body: np.ndarray | None = None) -> np.ndarray:
    """Label map of the zones around the tumour (``0`` elsewhere, tumour included; ``1..n`` the zones).

    Only a box around the tumour, grown by the total width, is searched, so large images stay cheap.

    Args:
        seg: label map (any integer type, 2D or 3D).
        spacing: voxel size per array axis (numpy order), in mm.
        labels: label values forming the tumour (None: every value > 0).
        widths_mm: width of each zone, innermost first.
        body: optional mask (shape of ``seg``); zones are kept only where it is True.

    Returns:
        uint8 label map, shape of ``seg``.

    Raises:
        PluginError: spacing or body that do not fit ``seg``, or a width that is not positive.

    Example:
        >>> seg = np.zeros((1, 1, 9), np.uint8); seg[0, 0, 4] = 1
        >>> peritumoral_zones(seg, (1.0, 1.0, 2.0), widths_mm=(2, 2))[0, 0].tolist()
        [0, 0, 2, 1, 0, 1, 2, 0, 0]
    """
    seg = np.asarray(seg)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != seg.ndim or not all(s > 0 for s in spacing):
        raise PluginError(f"peritumoral_zones: spacing {spacing} does not fit a {seg.ndim}D label map "
                          "(give one positive size in mm per array axis).")
    if not widths_mm or any(not w > 0 for w in widths_mm):
        raise PluginError(f"peritumoral_zones: widths_mm {tuple(widths_mm)} must be positive numbers.")
    if body is not None and np.shape(body) != seg.shape:
        raise PluginError(f"peritumoral_zones: body mask of shape {np.shape(body)} does not fit the label map "
                          f"{seg.shape}.")
    tumour = seg > 0 if labels is None else np.isin(seg, np.asarray(list(labels)))
    out = np.zeros(seg.shape, np.uint8)
    if not tumour.any():
        return out
    edges = np.cumsum([0.0, *(float(w) for w in widths_mm)])
    box = []
    for ax, sp in enumerate(spacing):  # the tumour's bounding box grown by the total width
        hit = np.flatnonzero(tumour.any(axis=tuple(a for a in range(seg.ndim) if a != ax)))
        grow = math.ceil(edges[-1] / sp)
        box.append(slice(max(0, int(hit[0]) - grow), min(seg.shape[ax], int(hit[-1]) + grow + 1)))
    box_t = tuple(box)
    distance = ndimage.distance_transform_edt(~tumour[box_t], sampling=spacing)
    zones = np.searchsorted(edges, distance, side="left").astype(np.uint8)  # (e_{i-1}, e_i] -> i; 0 stays 0
    zones[distance > edges[-1]] = 0
    if body is not None:
        zones[~np.asarray(body, bool)[box_t]] = 0
    out[box_t] = zones
    return out


class PeritumoralZones(LabelsPlugin):
    """The ``peritumoral_zones`` labels plugin (see :func:`peritumoral_zones`)."""

    def __init__(self, *, labels: Sequence[int] | None = None, widths_mm: Sequence[float] = WIDTHS_MM,
                 within_body: bool = False) -> None:
        self.labels = None if labels is None else tuple(int(v) for v in labels)
        self.widths_mm = tuple(float(w) for w in widths_mm)
        self.needs_body = bool(within_body)

    def derive(self, seg: np.ndarray, spacing: Sequence[float], body: np.ndarray | None = None) -> np.ndarray:
        if self.needs_body and body is None:
            raise PluginError("peritumoral_zones: within_body=true needs the image (its nonzero region); pass the "
                              "image files too.")
        return peritumoral_zones(seg, spacing, labels=self.labels, widths_mm=self.widths_mm,
                                 body=body if self.needs_body else None)


PERITUMORAL_ZONES = PluginInfo(
    name="peritumoral_zones", kind=LABELS,
    doc="Peritumoral risk zones: shells at given distances (mm) around the segmented tumour, written as a label "
        "map (1 = innermost zone).\n\n" + (__doc__ or ""),
    params=(Param("widths_mm", "floats", list(WIDTHS_MM), "width of each zone in mm, innermost first", low=0.01),
            Param("labels", "ints", None, "labels forming the tumour (default: all foreground)", low=1,
                  optional=True),
            Param("within_body", "bool", False, "keep zones only inside the image's nonzero region")),
    build=PeritumoralZones, output="zones")
