"""Turn network output on the preprocessed grid back into a segmentation in the input's exact geometry.

Steps (the reverse of preprocessing): resample the logits to the cropped image's shape (order
``order_probabilities``, the coarse axis separately for anisotropic data), convert to labels (argmax, or
sigmoid > 0.5 per region with later regions painted over earlier ones in ``regions_class_order``), put the
crop back into the full image, undo the transpose and the dummy axis of 2D files. The file is written with
the input's spacing, origin and direction.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.inference.logit_resampling import SLAB_VOXELS, axis_taps, channel_slab, resize_channel, separable_orders
from autoseg.io.atomic import atomic_path
from autoseg.io.image import Geometry, file_ending, write_image, write_label
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.cropping import uncrop
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import case_resampling


@dataclass(frozen=True)
class LabelLayout:
    """How network outputs map to label values.

    ``regions`` None: softmax over ``num_outputs`` classes, output ``i`` is label ``i``. Otherwise output
    ``i`` is region ``regions[i]`` (a tuple of labels, sigmoid), painted with ``regions_class_order[i]``.
    """

    num_outputs: int
    regions: tuple[tuple[int, ...], ...] | None = None
    regions_class_order: tuple[int, ...] | None = None

    @classmethod
    def from_labels(cls, labels: dict, regions_class_order: Sequence[int] | None = None) -> LabelLayout:
        """Layout from dataset.json ``labels`` (and ``regions_class_order`` for region datasets)."""
        entries = {k: v for k, v in labels.items() if k != "ignore"}
        as_tuple = {k: tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v])) for k, v in entries.items()}
        if any(len(v) > 1 for v in as_tuple.values()):
            regions = tuple(v for v in as_tuple.values() if v != (0,))
            order = tuple(int(v) for v in regions_class_order) if regions_class_order else tuple(max(r) for r in regions)
            return cls(len(regions), regions, order)
        return cls(max(v[0] for v in as_tuple.values()) + 1)

    @property
    def class_values(self) -> tuple[int, ...]:
        """Per output the label value it stands for (regions: the painted value)."""
        return self.regions_class_order if self.regions is not None else tuple(range(self.num_outputs))


def _to_file_axes(arr: np.ndarray, props: CaseProperties, plans: Plans, n_lead: int) -> np.ndarray:
    back = tuple(plans.transpose_backward)
    arr = arr.transpose(tuple(range(n_lead)) + tuple(a + n_lead for a in back))
    if props.file_ndim == 2:
        arr = arr.reshape(arr.shape[:n_lead] + arr.shape[n_lead + 1:])
    return arr


def _streamed_labels(logits: np.ndarray, shape: tuple[int, ...], orders: tuple[int, ...], layout: LabelLayout,
                     kept: np.ndarray | None) -> np.ndarray:
    """Labels of ``logits`` resampled to ``shape``, made slab by slab of the first axis: besides the label map
    only one slab of one channel is resampled at a time (``kept`` receives the resampled channels)."""
    seg = np.empty(shape, np.int16)
    plane = tuple(int(s) for s in shape[1:])
    step = max(1, SLAB_VOXELS // max(1, int(np.prod(plane))))
    taps = axis_taps(int(logits.shape[1]), int(shape[0]), orders[0])
    with torch.inference_mode():
        for a in range(0, shape[0], step):
            rows = slice(a, min(a + step, shape[0]))

            def channels(rows: slice = rows) -> Iterator[tuple[int, np.ndarray]]:
                for k in painting_order(layout):
                    ch = channel_slab(logits[k], taps, rows, plane, orders)
                    if kept is not None:
                        kept[k, rows] = ch
                    yield k, ch

            seg[rows] = _labels_from_channels(channels(), (rows.stop - rows.start, *plane), layout)
    return seg


def resample_logits(logits: np.ndarray, props: CaseProperties, config: ConfigurationPlan,
                    channels: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, float32 logits of output k)`` on the cropped original grid, one channel at a time."""
    axis = case_resampling(config.resampling, props.target_spacing_t, props.spacing_t)
    rs = config.resampling
    for k in range(logits.shape[0]) if channels is None else channels:
        yield k, resize_channel(np.asarray(logits[k], dtype=np.float32), props.shape_after_crop_t,
                                 rs.order_probabilities, axis, rs.order_z)


def logits_to_labels(logits: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """Label map from logits ``(K, *spatial)`` (argmax, or regions painted in order)."""
    return _labels_from_channels(((k, logits[k]) for k in painting_order(layout)), logits.shape[1:], layout)


def _labels_from_channels(channels: Iterable[tuple[int, np.ndarray]], shape: Sequence[int], layout: LabelLayout
                          ) -> np.ndarray:
    """Labels from logits arriving one channel at a time: memory is two volumes, not K.

    Labels: a running maximum and its index (ties go to the lower index, as ``np.argmax``). Regions: each
    channel paints its value where its sigmoid exceeds 0.5 (logit > 0); channels must come in painting order.
    """
    seg = torch.zeros(tuple(shape), dtype=torch.int16)  # torch: the elementwise work runs on every core
    best = None
    for k, ch in channels:
        c = torch.from_numpy(ch)
        if layout.regions is not None:
            seg.masked_fill_(c > 0, layout.regions_class_order[k])
        elif best is None:
            best = c.clone()
        else:
            seg.masked_fill_(c > best, k)
            torch.maximum(best, c, out=best)
    return seg.numpy()


def painting_order(layout: LabelLayout) -> list[int]:
    """Outputs in the order their labels are written (regions: ``regions_class_order`` ascending)."""
    if layout.regions is None:
        return list(range(layout.num_outputs))
    return [int(i) for i in np.argsort(layout.regions_class_order, kind="stable")]


def probabilities_to_labels(probs: np.ndarray, layout: LabelLayout) -> np.ndarray:
    """Label map from probabilities ``(K, *spatial)`` (argmax, or regions above 0.5 painted in order);
    used for averaged probabilities of several models."""
    offset = 0.5 if layout.regions is not None else 0.0  # a region is present where its probability > 0.5
    return _labels_from_channels(((k, np.asarray(probs[k], np.float32) - offset) for k in painting_order(layout)),
                                 probs.shape[1:], layout)


def probabilities(logits: np.ndarray, layout: LabelLayout, *, slab: int = 16) -> np.ndarray:
    """Softmax (labels) or sigmoid (regions) of ``(K, *spatial)`` logits, in slabs of the first spatial axis.

    Returns float32 for float32 input; a float16 input is converted in place (no float32 copy of the volume).
    """
    x = np.asarray(logits)
    out = x if x.dtype == np.float16 else np.empty(x.shape, np.float32)
    for z in range(0, x.shape[1], slab):
        part = x[:, z:z + slab].astype(np.float32)
        if layout.regions is not None:
            part = 1.0 / (1.0 + np.exp(-part))
        else:
            part = np.exp(part - part.max(axis=0, keepdims=True))
            part /= part.sum(axis=0, keepdims=True)
        out[:, z:z + slab] = part
    return out


def export_segmentation(logits: np.ndarray, props: CaseProperties, plans: Plans, config: ConfigurationPlan,
                        layout: LabelLayout, *, return_probabilities: bool = False
                        ) -> tuple[np.ndarray, np.ndarray | None]:
    """Segmentation (and optionally probabilities) in the input file's array layout.

    Memory: with linear or nearest resampling (the default) the logits are resampled and turned into labels a
    few slices at a time, so besides the logits only the int16 label map is full-size, whatever the number of
    classes; with spline orders one channel at a time (about two full-resolution float32 volumes).
    Probabilities (optional) are held as one float16 ``(K, *spatial)`` volume.

    Args:
        logits: ``(K, *spatial)`` network output on the preprocessed grid.
        props: the case's preprocessing record.
        plans: the plans (for the transpose).
        config: the configuration (for the resampling orders).
        layout: how outputs map to labels.
        return_probabilities: also return ``(K, *file_spatial)`` float16 probabilities.

    Returns:
        Label map with the file's spatial shape (numpy order), and the probabilities or None.
    """
    shape = props.shape_after_crop_t
    kept = np.empty((logits.shape[0], *shape), np.float16) if return_probabilities else None

    def channels() -> Iterator[tuple[int, np.ndarray]]:
        for k, ch in resample_logits(logits, props, config, painting_order(layout)):
            if kept is not None:
                kept[k] = ch
            yield k, ch

    orders = separable_orders(config, props)
    labels = (_streamed_labels(logits, shape, orders, layout, kept) if orders is not None
              else _labels_from_channels(channels(), shape, layout))
    seg = uncrop(labels, props.bbox_t, props.shape_before_crop_t, fill=0)
    del labels
    probs = None
    if kept is not None:
        p, kept = probabilities(kept, layout), None
        probs = uncrop(p, props.bbox_t, props.shape_before_crop_t, fill=0)
        del p
        if layout.regions is None:  # outside the crop everything is background
            probs[0][uncrop(np.zeros(shape, bool), props.bbox_t, props.shape_before_crop_t, fill=True)] = 1
        probs = _to_file_axes(probs, props, plans, 1)
    return _to_file_axes(seg, props, plans, 0), probs


def export_map(values: np.ndarray, props: CaseProperties, plans: Plans, config: ConfigurationPlan) -> np.ndarray:
    """A float map on the preprocessed grid (e.g. voxel uncertainty) in the input file's array layout.

    Resampled like probabilities (linear by default), clipped to the map's range, 0 outside the crop.
    """
    axis = case_resampling(config.resampling, props.target_spacing_t, props.spacing_t)
    rs = config.resampling
    x = np.asarray(values, np.float32)
    out = resize_channel(x, props.shape_after_crop_t, min(rs.order_probabilities, 1), axis, min(rs.order_z, 1))
    out = np.clip(out, float(x.min(initial=0.0)), float(x.max(initial=0.0)))
    return _to_file_axes(uncrop(out, props.bbox_t, props.shape_before_crop_t, fill=0), props, plans, 0)


def probabilities_path(seg_path: str | os.PathLike[str]) -> Path:
    """``<case>.npz`` next to ``<case><ending>`` (the case id may contain dots: ``BraTS.001.nii.gz``)."""
    seg_path = Path(seg_path)
    return seg_path.with_name(seg_path.name[: -len(file_ending(seg_path))] + ".npz")


def write_prediction(path: str | os.PathLike[str], logits: np.ndarray, props: CaseProperties, plans: Plans,
                     config: ConfigurationPlan, layout: LabelLayout, *, save_probabilities: bool = False) -> np.ndarray:
    """Export and write a prediction with the input's geometry; probabilities go to ``<name>.npz``.

    Returns:
        The segmentation written (file array layout).
    """
    seg, probs = export_segmentation(logits, props, plans, config, layout, return_probabilities=save_probabilities)
    path = Path(path)
    if probs is not None:
        save_probabilities_npz(probabilities_path(path), probs, layout)
    write_label(path, seg, props.geometry)
    return seg


def output_names(labels: dict, layout: LabelLayout) -> list[str]:
    """Per network output the dataset.json name of its class or region (``label_<value>`` when unnamed)."""
    by_value: dict[tuple[int, ...], str] = {}
    for name, v in labels.items():
        if name != "ignore":
            by_value.setdefault(tuple(int(x) for x in (v if isinstance(v, (list, tuple)) else [v])), name)
    keys = layout.regions if layout.regions is not None else [(k,) for k in range(layout.num_outputs)]
    return [by_value.get(tuple(key), f"label_{'_'.join(map(str, key))}") for key in keys]


def probability_image_path(folder: str | os.PathLike[str], seg_path: str | os.PathLike[str], name: str) -> Path:
    """``folder/<case>_<name><ending>`` for the segmentation ``seg_path`` (2D image formats: ``.tif``, which holds
    floats; characters other than letters, digits, ``.``, ``-`` and ``_`` in ``name`` become ``_``)."""
    seg_path = Path(seg_path)
    ending = file_ending(seg_path)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(folder) / f"{seg_path.name[: -len(ending)]}_{safe}{'.tif' if ending in ('.png', '.bmp') else ending}"


def write_probability_images(folder: str | os.PathLike[str], seg_path: str | os.PathLike[str], probs: np.ndarray,
                             names: Sequence[str], geometry: Geometry) -> list[Path]:
    """Write each output's probabilities (``probs``: ``(K, *file spatial)``, file layout) as a float32 image with
    the input's geometry, one output at a time: besides ``probs`` only one output's float32 volume (and the
    writer's copy of it) is held, whatever the number of classes.

    Returns:
        The files written, in output order.
    """
    Path(folder).mkdir(parents=True, exist_ok=True)
    written = []
    for k, name in enumerate(names):
        path = probability_image_path(folder, seg_path, name)
        write_image(path, np.asarray(probs[k], np.float32), geometry)
        written.append(path)
    return written


def save_probabilities_npz(path: str | os.PathLike[str], probs: np.ndarray, layout: LabelLayout) -> None:
    """Write ``probabilities`` (float16, file layout), ``class_values`` and ``regions`` (sigmoid outputs) atomically.

    The file is self-describing, so folders of them can be ensembled without the model
    (:func:`load_probabilities_npz`).
    """
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, probabilities=probs.astype(np.float16, copy=False),
                            class_values=np.asarray(layout.class_values), regions=np.bool_(layout.regions is not None))


def load_probabilities_npz(path: str | os.PathLike[str]) -> tuple[np.ndarray, LabelLayout]:
    """Probabilities and a layout that turns them into labels (regions: painted in ``class_values`` order).

    Raises:
        ImageReadError: not a probabilities file written by autoseg.
    """
    from autoseg.errors import ImageReadError

    try:
        with np.load(path, allow_pickle=False) as z:
            probs, values = z["probabilities"], tuple(int(v) for v in z["class_values"])
            regions = bool(z["regions"]) if "regions" in z.files else False
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise ImageReadError(f"{path}: not a readable probabilities file ({err}); predict again with "
                             "--save-probabilities to recreate it.") from err
    if regions:
        layout = LabelLayout(len(values), tuple((v,) for v in values), values)
    else:
        layout = LabelLayout(len(values))
    return probs, layout
