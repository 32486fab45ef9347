"""Voxel-value checks of the integrity check: non-finite values, label values and label declarations.

SimpleITK (ITK 5) silently reads NaN and inf voxels of float NIfTI files as 0, so :func:`nifti_nonfinite`
counts them from the file's bytes. Users' most common label mistakes get a precise hint: 0/255 masks (map
255 to 1), anti-aliased or linearly resampled masks (non-integer values: threshold or round), an image saved
as a label (many values), negative values, and an ignore label that is not the largest label + 1.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from autoseg.io.check_report import Problem, error, warning
from autoseg.io.dataset import CHANNEL_RE, Dataset, DatasetSpec
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending

#: Voxels counted per ``np.bincount`` call (bounds the temporary int64 copy to 32 MiB).
_CHUNK = 1 << 22
#: Largest label value counted with ``np.bincount``; larger values use ``np.unique``.
_BINCOUNT_MAX = 1 << 16


def _nifti_bytes(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a NIfTI file, in blocks (several gzip members are read one after the other)."""
    gz = file_ending(path) == ".nii.gz"
    inflater = zlib.decompressobj(wbits=31)
    with path.open("rb") as f:
        while raw := f.read(1 << 22):
            if not gz:
                yield raw
                continue
            while raw:
                try:
                    yield inflater.decompress(raw)
                except zlib.error:
                    return  # a damaged stream: the reader reports that file as unreadable
                raw = inflater.unused_data if inflater.eof else b""
                if inflater.eof:
                    inflater = zlib.decompressobj(wbits=31)


def nifti_nonfinite(path: Path) -> tuple[int, int]:
    """NaN and inf voxels stored in a float NIfTI file, counted from its bytes in bounded memory.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.

    Returns:
        ``(n_nan, n_inf)``; ``(0, 0)`` for integer files or a header nibabel cannot parse.
    """
    import nibabel as nib  # lazy: only float NIfTI files need it

    try:
        proxy = nib.load(str(path)).dataobj
        dtype, skip = np.dtype(proxy.dtype), int(proxy.offset)
    except Exception:  # noqa: BLE001 - the reader reports files it cannot parse
        return 0, 0
    if dtype.kind != "f":
        return 0, 0
    n_nan = n_inf = 0
    rest = b""
    for block in _nifti_bytes(path):
        if skip:
            cut = min(skip, len(block))
            block, skip = block[cut:], skip - cut
        block = rest + block
        usable = len(block) - len(block) % dtype.itemsize
        values = np.frombuffer(block, dtype=dtype, count=usable // dtype.itemsize)
        rest = block[usable:]
        bad = values.size - np.count_nonzero(np.isfinite(values))
        if bad:
            nan = int(np.count_nonzero(np.isnan(values)))
            n_nan, n_inf = n_nan + nan, n_inf + bad - nan
    return n_nan, n_inf


def _few(values: list[float] | np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(f"{float(v):.6g}" for v in list(values)[:limit])
    return f"{shown}, ... ({len(values)} distinct)" if len(values) > limit else shown


def _value_counts(array: np.ndarray, lo: int, hi: int) -> tuple[tuple[int, ...], dict[int, int] | None]:
    """The values present in a non-negative integer-valued array (sorted), and their voxel counts when known."""
    if hi - lo <= 1:  # binary masks (the common case): min and max already name every value
        return tuple(sorted({lo, hi})), None
    flat = array.reshape(-1)
    if hi < _BINCOUNT_MAX:
        counts = np.zeros(hi + 1, dtype=np.int64)
        for start in range(0, flat.size, _CHUNK):
            counts += np.bincount(flat[start:start + _CHUNK].astype(np.intp, copy=False), minlength=hi + 1)
        present = np.flatnonzero(counts)
        return tuple(int(v) for v in present), {int(v): int(counts[v]) for v in present}
    values, n = np.unique(flat, return_counts=True)
    return tuple(int(v) for v in values), {int(v): int(c) for v, c in zip(values, n, strict=True)}


def _undeclared_fix(extra: list[int], present: tuple[int, ...], spec: DatasetSpec) -> str:
    declared = set(spec.label_values)
    if extra == [255] and 1 in declared and set(present) <= {0, 255}:
        return ("this looks like a 0/255 binary mask: map 255 to 1 (255->1, e.g. seg[seg == 255] = 1) and save "
                "again, or declare 255 in 'labels'")
    if 255 in extra and 1 in declared and 1 not in present:
        return "if 255 marks the foreground of a 0/255 mask, map 255 to 1 (255->1); otherwise declare the values"
    if len(extra) > 20:
        return (f"the file holds {len(present)} distinct values: it looks like an image or a linearly resampled mask, "
                "not a label map; use the label map (resample labels with nearest-neighbour interpolation)")
    return "declare the values in dataset.json 'labels', or relabel the file"


def check_label_values(case_id: str, path: Path, array: np.ndarray, spec: DatasetSpec, *,
                       keep: bool = False) -> tuple[np.ndarray | None, tuple[int, ...] | None, list[Problem]]:
    """Check the voxel values of one label map against dataset.json.

    Args:
        case_id: the case (for the problems).
        path: the label file (for the problems).
        array: the label voxels in the file's stored type.
        spec: the parsed dataset.json.
        keep: return the labels as a compact integer array (int16 when the values fit).

    Returns:
        The integer label array (only with ``keep`` and no error), the label values present (None when they
        cannot be determined) and the problems found.
    """
    probs: list[Problem] = []
    kind = array.dtype.kind
    if kind not in "biuf":
        probs.append(error("label_values", case_id, path, f"label voxels have type {array.dtype}",
                           "save labels as an integer image"))
        return None, None, probs
    if kind == "f":
        finite = np.isfinite(array)
        if not finite.all():
            probs.append(error("nan_inf", case_id, path, f"the label map holds {finite.size - np.count_nonzero(finite)}"
                               " NaN or inf voxels", "save labels as an integer image without NaN"))
            return None, None, probs
        rounded = np.rint(array)
        bad = rounded != array
        if bad.any():
            odd = np.unique(array[bad])
            probs.append(error("label_not_integer", case_id, path, f"{int(np.count_nonzero(bad))} voxels hold "
                               f"non-integer label values, e.g. {_few(odd)} (an anti-aliased or interpolated mask)",
                               "threshold or round the mask (seg > 0.5 for a binary mask, else np.rint) and resample "
                               "label maps with nearest-neighbour interpolation only"))
            return None, None, probs
        array = rounded
    if array.size == 0:
        probs.append(error("label_values", case_id, path, "the label map has no voxels", "re-export the label map"))
        return None, None, probs
    lo, hi = int(array.min()), int(array.max())
    if lo < 0:
        neg = np.unique(array[array < 0])
        probs.append(error("negative_label", case_id, path, f"negative label values {_few(neg)}",
                           "labels start at 0 (background); relabel the negative values (e.g. to 0 or to the "
                           "ignore label)"))
        return None, None, probs
    present, counts = _value_counts(array, lo, hi)
    extra = [v for v in present if v not in set(spec.label_values)]
    if extra:
        if counts is None:
            counts = {v: int(np.count_nonzero(array == v)) for v in extra}
        named = ", ".join(f"{v} ({counts[v]} voxels)" for v in extra[:8]) + (
            f", ... ({len(extra)} values)" if len(extra) > 8 else "")
        probs.append(error("label_values", case_id, path, f"label values not declared in dataset.json: {named}; "
                           f"declared: {list(spec.label_values)}", _undeclared_fix(extra, present, spec)))
    elif not [v for v in present if v != 0 and v != spec.ignore_label]:
        probs.append(warning("empty_label", case_id, path,
                             f"the label map holds no foreground (values {list(present)})",
                             "fine for a case without findings; otherwise re-export the mask"))
    seg = None
    if keep and not extra:
        seg = array.astype(np.int16 if hi < 2**15 else np.int32 if hi < 2**31 else np.int64, copy=False)
    return seg, present, probs


def label_names(spec: DatasetSpec) -> dict[int, str]:
    """A readable name for every declared label value (regions name the classes they contain)."""
    out: dict[int, str] = {}
    for name, v in spec.labels.items():
        if isinstance(v, int):
            out.setdefault(v, f"'{name}'")
    for name, v in spec.labels.items():
        if isinstance(v, tuple):
            for x in v:
                out.setdefault(x, f"in region '{name}'")
    return out


def check_label_declaration(spec: DatasetSpec, json_path: Path) -> list[Problem]:
    """Problems with the labels (and file ending) declared in dataset.json.

    Args:
        spec: the parsed dataset.json.
        json_path: the dataset.json file (for the problems).

    Returns:
        Errors for negative values, a misplaced or region ignore label, region labels without a usable
        ``regions_class_order`` and an unsupported file ending; warnings for gaps between label values and
        several names sharing one value.
    """
    probs: list[Problem] = []
    values = spec.label_values
    ignore = spec.labels.get("ignore")
    negative = [v for v in values if v < 0]
    if negative:
        probs.append(error("label_declaration", None, json_path, f"negative label values declared: {negative}",
                           "number the labels from 0 (background) upwards"))
    if isinstance(ignore, tuple):
        probs.append(error("label_declaration", None, json_path, f"the ignore label is a region {list(ignore)}",
                           "give 'ignore' one integer value: the largest label + 1"))
    elif ignore is not None:
        top = max(v for v in values if v != ignore)
        if ignore != top + 1:
            probs.append(error("label_declaration", None, json_path, f"the ignore label is {ignore}; it must be the "
                               f"largest other label + 1 = {top + 1}", f"set \"ignore\": {top + 1} in dataset.json and "
                               f"relabel the ignored voxels to {top + 1}"))
    used = sorted({v for v in values if v != spec.ignore_label and v >= 0})
    gaps = sorted(set(range(max(used) + 1)) - set(used)) if used else []
    if gaps:
        probs.append(warning("label_gaps", None, json_path, f"declared labels {used} are not consecutive "
                             f"({gaps[:10]} unused)", "autoseg accepts gaps; nnU-Net requires labels 0..N-1, so "
                             "relabel if the dataset must also work with nnU-Net"))
    by_value = Counter(v for k, v in spec.labels.items() if isinstance(v, int) and k != "ignore")
    for v, n in sorted(by_value.items()):
        if n > 1:
            names = [k for k, x in spec.labels.items() if x == v]
            probs.append(warning("label_declaration", None, json_path, f"labels {names} all have value {v}",
                                 "give each class its own value, or keep one name"))
    if spec.has_regions:
        n_regions = sum(1 for k in spec.labels if k not in ("background", "ignore"))
        order = spec.regions_class_order
        if order is None or len(order) != n_regions:
            found = "is missing" if order is None else f"has {len(order)} entries"
            probs.append(error("label_declaration", None, json_path, f"region labels need 'regions_class_order' with "
                               f"one entry per region ({n_regions}); it {found}", "add \"regions_class_order\": the "
                               "integer painted for each region, in the order of 'labels'"))
    if spec.file_ending.lower() not in SUPPORTED_ENDINGS:
        probs.append(error("dataset_json", None, json_path, f"file_ending '{spec.file_ending}' is not a supported "
                           f"image format (supported: {', '.join(SUPPORTED_ENDINGS)})",
                           "convert the files (.nii.gz recommended) and update file_ending"))
    return probs


NIFTI_ENDINGS = (".nii.gz", ".nii")


def _stray_problem(dataset: Dataset, path: Path) -> Problem:
    ending = dataset.spec.file_ending
    name, folder = path.name, path.parent.name
    if path.is_dir():  # a DICOM series folder CASE_XXXX/ whose channel dataset.json does not declare
        return warning("stray_file", None, path, f"series folder {name}/ is channel {name[-4:]}, which dataset.json's "
                       f"channel_names does not declare, so it is not used",
                       "add the channel to channel_names if the model should see it, otherwise remove the folder")
    twin = _nifti_twin(path, ending)
    if twin is not None and twin.is_file():
        return error("stray_file", None, path, f"{name} lies beside {twin.name}: the NIfTI reader looks for '.nii' "
                     f"before '.nii.gz', so {twin.name} may be read from the wrong file",
                     f"remove or move {name} (keep one file per channel, ending in '{ending}')")
    if not name.endswith(ending):
        return warning("stray_file", None, path, f"{name} does not end in the dataset's file_ending '{ending}', so "
                       "it belongs to no case", f"convert or rename it to a '{ending}' file (or correct file_ending in "
                       "dataset.json); otherwise remove it")
    stem = name[: -len(ending)]
    if folder == "labelsTr":
        return warning("stray_file", None, path, f"label {name} has no images (no imagesTr/{stem}_0000{ending})",
                       "add the case's images, or remove the label")
    m = CHANNEL_RE.match(stem)
    if m is not None:
        n = dataset.spec.n_channels
        return warning("stray_file", None, path, f"channel {m['ch']} is not declared: dataset.json's channel_names "
                       f"has {n} channel(s) (_0000 to _{n - 1:04d}), so this file is not used",
                       "add the channel to channel_names if the model should see it, otherwise remove the file")
    return warning("stray_file", None, path, f"{name} has no 4-digit channel suffix, so it belongs to no case",
                   f"rename it to {stem}_0000{ending} (channel 0), or remove it")


def _nifti_twin(path: Path, ending: str) -> Path | None:
    """The same file name with the other NIfTI ending (``x.nii`` <-> ``x.nii.gz``), when the dataset is NIfTI."""
    if ending not in NIFTI_ENDINGS:
        return None
    for mine, other in zip(NIFTI_ENDINGS, reversed(NIFTI_ENDINGS)):
        if path.name.endswith(mine):
            return path.with_name(path.name[: -len(mine)] + other)
    return None


def check_dataset_level(dataset: Dataset) -> list[Problem]:
    """Problems of the dataset as a whole: no cases, numTraining, stray files, label declarations.

    Args:
        dataset: the loaded dataset (no voxels are read).

    Returns:
        The problems found (empty when there are none).
    """
    spec, json_path = dataset.spec, dataset.root / "dataset.json"
    probs: list[Problem] = []
    if not dataset.cases:
        where = "dataset.json's 'dataset' listing" if "dataset" in spec.raw else "imagesTr/"
        probs.append(error("no_cases", None, json_path if "dataset" in spec.raw else dataset.root / "imagesTr",
                           f"no training cases found in {where} ({len(dataset.stray_files)} files there do not "
                           "match the naming)", f"name the images CASE_0000{spec.file_ending} (one file per "
                           f"channel) and the labels labelsTr/CASE{spec.file_ending}"))
    elif len(dataset.cases) != spec.num_training:
        probs.append(error("num_training", None, json_path, f"numTraining is {spec.num_training} but "
                           f"{len(dataset.cases)} cases were found", f"set \"numTraining\": {len(dataset.cases)} "
                           "in dataset.json, or add the missing cases"))
    probs.extend(_stray_problem(dataset, p) for p in dataset.stray_files)
    probs.extend(check_label_declaration(spec, json_path))
    return probs
