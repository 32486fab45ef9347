"""Preprocess cases for one configuration: transpose, crop to non-zero, normalise, resample.

Order (as nnU-Net): transpose -> crop -> normalise -> resample, then foreground locations are sampled for
oversampling. Each case is stored in ``<workdir>/preprocessed/<data_identifier>/`` as

* ``<case>.npy``      float32 ``(C, *spatial)`` (read memory-mapped: a patch is read without the whole case);
  ``<case>.b2nd`` instead with ``Plans.storage == "blosc2"`` (compressed; see :mod:`.storage`);
* ``<case>_seg.npy``  int8/int16 ``(1, *spatial)``, ``-1`` outside the imaged region (``_seg.b2nd`` likewise);
* ``<case>_fg.npy``   int32 ``(N, 2 + ndim)`` foreground locations: label, connected component, coordinates;
* ``<case>.json``     :class:`CaseProperties`, written last: a case without it (or with another plan hash)
  is incomplete or stale and is redone, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.errors import MissingChannelError
from autoseg.fingerprint.extract import bincount_chunked, nonzero_bbox
from autoseg.fingerprint.model import DUMMY_2D_SPACING
from autoseg.io.atomic import ensure_writable, remove_stale_temporaries
from autoseg.io.dataset import CaseFiles, Dataset
from autoseg.io.image import Geometry, compact_dtype, image_stamp, read_image, read_label
from autoseg.parallel import imap_ordered
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.cropping import crop_to_nonzero
from autoseg.preprocessing.normalize import channel_normalizer
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resample import case_resampling, new_shape_for, present_values, resample_filled, resample_seg
from autoseg.preprocessing.storage import SUFFIXES, check_storage, load_case_array, save_case_array

#: foreground locations kept per class: min(MAX, n), at least 1 % of the class's voxels
MAX_LOCATIONS = 10_000
#: every connected component keeps at least this many locations (small lesions stay reachable)
MIN_LOCATIONS_PER_COMPONENT = 20


@dataclass(frozen=True)
class PreprocessedArrays:
    """One case in the planning axes, ready for training or prediction."""

    data: np.ndarray  # float32 (C, *spatial)
    seg: np.ndarray  # int16 (*spatial), -1 outside the imaged region
    properties: CaseProperties


def read_case(case: CaseFiles) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """Read a case's channels (stacked ``(C, *spatial)``), its label map (or None) and geometry.

    The channels keep their files' type when it is compact (e.g. int16 CT; see
    :func:`~autoseg.io.image.compact_dtype`), else they are float32; normalisation makes them float32.
    """
    chans = [read_image(p, dtype="compact") for p in case.images]
    dtype = compact_dtype(*(c.array.dtype for c in chans))
    images = np.concatenate([c.array for c in chans], dtype=dtype) if len(chans) > 1 else chans[0].array
    seg = read_label(case.label).array if case.label is not None else None
    return images, seg, chans[0].geometry


def target_spacing(config: ConfigurationPlan, spacing_t: Sequence[float]) -> tuple[float, ...]:
    """Spacing after resampling: the plan's; a 2D configuration keeps the case's out-of-plane spacing."""
    if config.ndim == 2:
        return (float(spacing_t[0]),) + tuple(config.spacing)
    return tuple(config.spacing)


def to_planning_axes(images: np.ndarray, seg: np.ndarray | None, geometry: Geometry, plans: Plans
                     ) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...]]:
    """Add the dummy axis of 2D files and apply the plans' transpose; returns images, seg, spacing."""
    spacing = tuple(float(s) for s in geometry.array_spacing)
    if images.ndim == 3:
        images = images[:, None]
        seg = seg[None] if seg is not None else None
        spacing = (DUMMY_2D_SPACING * max(spacing),) + spacing
    fwd = tuple(plans.transpose_forward)
    images = images.transpose((0,) + tuple(a + 1 for a in fwd))
    seg = seg.transpose(fwd) if seg is not None else None
    return images, seg, tuple(spacing[a] for a in fwd)


def check_missing(missing: Sequence[int], n_channels: int) -> tuple[int, ...]:
    """Validate indices of absent channels.

    Args:
        missing: channel indices (0-based, as the ``_000k`` file suffixes).
        n_channels: channels of the image.

    Returns:
        The indices, sorted and without duplicates.

    Raises:
        MissingChannelError: an index is not an integer in ``0 .. n_channels - 1``.

    Every channel may be absent (the input is then all zeros: what ``explain`` scores as the empty coalition);
    prediction inputs refuse that earlier, in :func:`autoseg.inference.inputs.resolve_missing`.

    Example:
        >>> check_missing([2, 0, 2], 4)
        (0, 2)
    """
    out = set()
    for m in missing:
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 0 <= int(m) < n_channels:
            raise MissingChannelError(f"missing channel {m!r} is not a channel index of this image: it has "
                                      f"{n_channels} channel(s), indices 0..{n_channels - 1}; pass the indices "
                                      "of the absent channels (the _000k file suffixes).")
        out.add(int(m))
    return tuple(sorted(out))


def _crop_present(images: np.ndarray, seg: np.ndarray | None, missing: tuple[int, ...]
                  ) -> tuple[np.ndarray, np.ndarray, tuple[tuple[int, int], ...]]:
    """:func:`crop_to_nonzero` with the mask taken from the present channels only; absent ones come back as 0."""
    if not missing:
        return crop_to_nonzero(images, seg)
    present = [c for c in range(images.shape[0]) if c not in missing]
    if not present:  # nothing acquired: the whole image, all zeros
        return crop_to_nonzero(np.zeros_like(images), seg)
    cropped, seg_c, bbox = crop_to_nonzero(images[present], seg)
    data = np.zeros((images.shape[0], *cropped.shape[1:]), dtype=cropped.dtype)
    data[present] = cropped
    return data, seg_c, bbox


def preprocess_arrays(images: np.ndarray, seg: np.ndarray | None, geometry: Geometry, plans: Plans,
                      config: ConfigurationPlan, *, case_id: str = "", missing: Sequence[int] = ()
                      ) -> PreprocessedArrays:
    """Preprocess one case held in memory (also what prediction uses for new images).

    Args:
        images: ``(C, *spatial)`` channels as read from the files.
        seg: label map (spatial) or None.
        geometry: the file geometry (restored at export).
        plans: the plans.
        config: the configuration.
        case_id: name recorded in the properties.
        missing: indices of channels that were not acquired. Their content is ignored (it may be anything,
            e.g. zeros): they take no part in the crop-to-nonzero mask and are 0 after normalisation (the
            channel mean, as modality dropout blanks channels in training).

    Returns:
        Normalised, resampled data, label map (all zeros when ``seg`` is None) and the properties export
        needs to undo it.

    Raises:
        MissingChannelError: a ``missing`` index is out of range, or every channel is missing.
        PlanningError: the image has another number of channels than the plans.

    Example:
        >>> out = preprocess_arrays(images, None, geometry, plans, config, missing=(2,))  # doctest: +SKIP
        >>> bool((out.data[2] == 0).all())  # doctest: +SKIP
        True
    """
    absent = check_missing(missing, images.shape[0])
    file_ndim = images.ndim - 1
    images, seg, spacing_t = to_planning_axes(images, seg, geometry, plans)
    shape_before = tuple(int(s) for s in images.shape[1:])
    cropped, seg_c, bbox = _crop_present(images, seg, absent)
    target = target_spacing(config, spacing_t)
    new_shape = new_shape_for(cropped.shape[1:], spacing_t, target)
    axis = case_resampling(config.resampling, spacing_t, target)
    rs = config.resampling
    normalized = channel_normalizer(cropped, config.normalization, seg_c)

    def fill(c: int, dest: np.ndarray) -> None:  # normalised straight into the resampling's input buffer
        normalized(c, dest)
        if c in absent:
            dest[...] = 0

    data = resample_filled(cropped.shape[1:], cropped.shape[0], fill, new_shape, order=rs.order_image,
                           separate_axis=axis, order_z=rs.order_z, clip=config.rules == "nnunet")
    fill = normalized = None  # type: ignore[assignment]  # frees the cropped image the normaliser holds
    del cropped
    data[list(absent)] = 0  # exact zeros whatever the interpolation does
    if seg is None:  # prediction: no labels; the outside-the-body mask (-1) is not needed either
        seg_r = np.zeros(new_shape, np.int16)
    else:
        seg_r = resample_seg(seg_c, new_shape, order=rs.order_seg, separate_axis=axis, order_z=rs.order_z)
    present = tuple(v for v in present_values(seg_r) if v >= 0) if seg is not None else ()
    props = CaseProperties(case_id=case_id, geometry=geometry, file_ndim=file_ndim, spacing_t=spacing_t,
                           shape_before_crop_t=shape_before, bbox_t=bbox,
                           shape_after_crop_t=tuple(int(s) for s in seg_c.shape), target_spacing_t=target,
                           shape_after_resampling_t=tuple(int(s) for s in new_shape), separate_axis=axis,
                           labels_present=present)
    return PreprocessedArrays(data, seg_r, props)


def foreground_locations(seg: np.ndarray, labels: Sequence[int], *, seed: int) -> np.ndarray:
    """Sample voxel locations of each foreground label, per connected component.

    Per label ``target = max(min(10000, n), ceil(0.01 n))`` locations, shared among its connected
    components in proportion to their size but at least :data:`MIN_LOCATIONS_PER_COMPONENT` each (or all
    of a smaller component's voxels), so the loader can also pick a lesion uniformly, not only a voxel.

    Returns:
        int32 ``(N, 2 + ndim)``: label, component index (per label, from 0), coordinates.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for lab in labels:
        mask = seg == lab
        if not mask.any():
            continue
        box = nonzero_bbox(mask[None])  # components are labelled inside the label's box only (same numbering)
        comps, n_comp = ndimage.label(mask[box])
        del mask
        sizes = bincount_chunked(comps)[1:]
        total = int(sizes.sum())
        target = max(min(MAX_LOCATIONS, total), math.ceil(0.01 * total))
        where = np.flatnonzero(comps)  # C order, as np.argwhere lists the voxels
        ids = comps.reshape(-1)[where] - 1
        offset = np.array([b.start for b in box])
        for c in range(n_comp):
            idx = np.flatnonzero(ids == c)
            k = min(idx.size, max(MIN_LOCATIONS_PER_COMPONENT, round(target * idx.size / total)))
            pick = rng.choice(idx, size=k, replace=False)
            block = np.empty((k, 2 + seg.ndim), np.int32)
            block[:, 0], block[:, 1] = lab, c
            block[:, 2:] = np.stack(np.unravel_index(where[pick], comps.shape), axis=1) + offset
            rows.append(block)
    return np.concatenate(rows) if rows else np.zeros((0, 2 + seg.ndim), np.int32)


def plan_hash(plans: Plans, config: ConfigurationPlan, case: CaseFiles) -> str:
    """Hash of everything a preprocessed case depends on: the configuration's data-relevant plan entries,
    the transpose, the labels and the case's files (names, sizes, modification times)."""
    cfg = config.to_json()
    relevant = {k: cfg[k] for k in ("spacing", "normalization", "resampling")}
    files = [p for p in case.images + ((case.label,) if case.label else ())]
    stats = [(p.name, *(image_stamp(p) or (-1, -1))) for p in files]
    blob = json.dumps([relevant, plans.transpose_forward, plans.labels, stats, 1], sort_keys=True, default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def case_paths(folder: Path, case_id: str, storage: str | None = None) -> dict[str, Path]:
    """Paths of a stored case's files.

    Args:
        folder: the configuration's preprocessed folder.
        case_id: the case.
        storage: ``npy`` or ``blosc2`` (the suffix of ``data`` and ``seg``); None: the format the case is stored
            in (blosc2 when its ``.b2nd`` file exists, else npy), for readers that do not hold the plans.
    """
    if storage is None:
        storage = "blosc2" if (folder / f"{case_id}{SUFFIXES['blosc2']}").is_file() else "npy"
    suffix = SUFFIXES[storage]
    return {"data": folder / f"{case_id}{suffix}", "seg": folder / f"{case_id}_seg{suffix}",
            "fg": folder / f"{case_id}_fg.npy", "props": folder / f"{case_id}.json"}


def is_complete(folder: Path, case_id: str, expected_hash: str, storage: str = "npy") -> bool:
    """True when the case was stored completely with the expected plan hash in the expected format (a case
    stored in the other format is redone: switching ``--storage`` re-preprocesses)."""
    paths = case_paths(folder, case_id, storage)
    try:
        props = CaseProperties.load(paths["props"])
        if props.plan_hash != expected_hash:
            return False
        data = load_case_array(paths["data"])
        seg = load_case_array(paths["seg"])
        np.load(paths["fg"], mmap_mode="r")
    except Exception:  # noqa: BLE001 - anything unreadable is simply redone
        return False
    shape = props.shape_after_resampling_t
    return tuple(data.shape[1:]) == shape and tuple(seg.shape[1:]) == shape


def _seed_of(case_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{case_id}".encode()).digest()[:4], "little")


def _job(args: tuple[CaseFiles, Plans, str, Path, tuple[int, ...]]) -> str:
    case, plans, config_name, folder, labels = args
    config = plans.configuration(config_name)
    h = plan_hash(plans, config, case)
    images, seg, geometry = read_case(case)
    out = preprocess_arrays(images, seg, geometry, plans, config, case_id=case.case_id)
    del images, seg
    seg_store = out.seg.astype(np.int8 if max(labels, default=0) <= 127 else np.int16)[None]
    paths = case_paths(folder, case.case_id, plans.storage)
    paths["props"].unlink(missing_ok=True)  # the marker goes first, so a crash below leaves the case "incomplete"
    for other in (s for s in SUFFIXES if s != plans.storage):  # arrays stored in another format before go
        for key in ("data", "seg"):
            case_paths(folder, case.case_id, other)[key].unlink(missing_ok=True)
    patch = config.patch_size  # Blosc2 chunks are laid out for the training patch
    save_case_array(paths["data"], out.data, patch_size=patch)
    save_case_array(paths["seg"], seg_store, patch_size=patch)
    save_case_array(paths["fg"], foreground_locations(out.seg, labels, seed=_seed_of(case.case_id, plans.seed)))
    dataclasses.replace(out.properties, plan_hash=h).save(paths["props"])
    return case.case_id


@dataclass(frozen=True)
class PreprocessSummary:
    """What :func:`preprocess_dataset` did."""

    folder: Path
    processed: tuple[str, ...]
    reused: tuple[str, ...]


def preprocess_dataset(dataset: Dataset, plans: Plans, config_name: str, workdir: str | os.PathLike[str], *,
                       jobs: int = 1, progress: bool = True, overwrite: bool = False) -> PreprocessSummary:
    """Preprocess every training case of ``dataset`` for a configuration (idempotent).

    Cases already stored with the same plan hash are reused; changed, missing or incomplete ones are
    redone. Workers write their case to disk themselves and return only its name, so memory stays
    bounded by ``jobs`` cases.

    Args:
        dataset: the raw dataset.
        plans: the plans.
        config_name: configuration (its ``data_identifier`` names the folder; the cascade shares 3d_fullres's).
        workdir: work folder; cases go to ``<workdir>/preprocessed/<data_identifier>/``.
        jobs: worker processes.
        progress: show a progress bar.
        overwrite: redo every case.

    Returns:
        The folder and which cases were processed or reused.

    Raises:
        PlanningError: unknown configuration.
        WorkerError, ImageReadError: a case failed (the message names it).
    """
    config = plans.configuration(config_name)
    check_storage(plans.storage)  # blosc2 without its package fails here, in one line, before any work
    folder = Path(workdir) / "preprocessed" / config.data_identifier
    folder.mkdir(parents=True, exist_ok=True)
    labels = tuple(v for v in plans.label_values if v != 0)
    todo, reused = [], []
    for case in dataset.cases:
        if not overwrite and is_complete(folder, case.case_id, plan_hash(plans, config, case), plans.storage):
            reused.append(case.case_id)
        else:
            todo.append(case)
    # what a killed run was writing (a crash leaves only hidden temporaries; live writers' are locked and kept)
    remove_stale_temporaries(*(p for c in dataset.cases for st in SUFFIXES
                               for p in case_paths(folder, c.case_id, st).values()))
    if todo:
        ensure_writable(folder)  # a read-only or full disk fails now, not after the first case's work
    jobs_args = [(c, plans, config_name, folder, labels) for c in todo]
    done = list(imap_ordered(_job, jobs_args, jobs=jobs, desc=f"preprocess {config.data_identifier}",
                             label=lambda a: f"case {a[0].case_id}", progress=progress, max_in_flight=max(1, jobs)))
    return PreprocessSummary(folder, tuple(done), tuple(reused))

