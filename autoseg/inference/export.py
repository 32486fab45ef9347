"""Turn network output on the preprocessed grid back into a segmentation in the input's exact geometry.

Steps (the reverse of preprocessing): resample the logits to the cropped image's shape (order
``order_probabilities``, the coarse axis separately for anisotropic data), convert to labels (argmax, or
sigmoid > 0.5 per region with later regions painted over earlier ones in ``regions_class_order``), put the
crop back into the full image, undo the transpose and the dummy axis of 2D files. The file is written with
the input's spacing, origin and direction.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoseg.io.atomic import atomic_path
from autoseg.io.image import file_ending, write_label
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.cropping import uncrop
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import case_resampling, resample_data


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


def _interp_mode(order: int, ndim: int) -> str:
    return "nearest-exact" if order == 0 else ("linear", "bilinear", "trilinear")[ndim - 1]


def _resize_channel(x: np.ndarray, new_shape: Sequence[int], order: int, axis: int | None, order_z: int
                    ) -> np.ndarray:
    """One spatial float32 channel resized like :func:`resample_data` does it.

    Orders 0 and 1 run in torch (multi-threaded, releases the GIL so export overlaps prediction; linear
    matches scipy's pixel-edge aligned zoom to float precision); higher orders fall back to scipy.
    """
    new_shape = tuple(int(s) for s in new_shape)
    if tuple(x.shape) == new_shape:
        return x
    if order > 1 or (axis is not None and order_z > 1):
        return resample_data(x[None], new_shape, order=order, separate_axis=axis, order_z=order_z)[0]
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    with torch.inference_mode():
        if axis is None:
            t = torch.nn.functional.interpolate(t, size=new_shape, mode=_interp_mode(order, x.ndim))
        else:
            in_plane = list(new_shape)
            in_plane[axis] = x.shape[axis]
            t = torch.nn.functional.interpolate(t, size=tuple(in_plane), mode=_interp_mode(order, x.ndim))
            t = torch.nn.functional.interpolate(t, size=new_shape, mode=_interp_mode(order_z, x.ndim))
    return t[0, 0].numpy()


def resample_logits(logits: np.ndarray, props: CaseProperties, config: ConfigurationPlan,
                    channels: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(k, float32 logits of output k)`` on the cropped original grid, one channel at a time."""
    axis = case_resampling(config.resampling, props.target_spacing_t, props.spacing_t)
    rs = config.resampling
    for k in range(logits.shape[0]) if channels is None else channels:
        yield k, _resize_channel(np.asarray(logits[k], dtype=np.float32), props.shape_after_crop_t,
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

    Memory: the logits are resampled one channel at a time, so the segmentation needs about two
    full-resolution float32 volumes on top of the input, whatever the number of classes. Probabilities
    (optional) are held as one float16 ``(K, *spatial)`` volume.

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

    seg = uncrop(_labels_from_channels(channels(), shape, layout), props.bbox_t, props.shape_before_crop_t, fill=0)
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
    out = _resize_channel(x, props.shape_after_crop_t, min(rs.order_probabilities, 1), axis, min(rs.order_z, 1))
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
