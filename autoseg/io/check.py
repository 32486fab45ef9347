"""The dataset integrity check behind ``autoseg check`` (also run by ``autoseg plan``).

Every problem is collected and reported at once, as a table, instead of stopping at the first. Each
problem names the case, the file, what is wrong (with the values) and how to fix it. Errors stop planning;
warnings are shown but do not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, DatasetError, DatasetIntegrityError
from autoseg.io.dataset import CaseFiles, Dataset, DatasetSpec, load_dataset
from autoseg.io.image import Geometry, Image, read_image, read_label, spacing_is_valid
from autoseg.parallel import imap_ordered


@dataclass(frozen=True)
class Problem:
    """One problem found by the check."""

    severity: str  # "error" | "warning"
    kind: str  # short code, e.g. "missing_label", "label_values", "geometry"
    case_id: str | None
    path: Path | None
    message: str
    fix: str


@dataclass
class CaseData:
    """A case that was read without errors (handed to the fingerprint)."""

    images: np.ndarray  # float32 (C, *spatial)
    label: np.ndarray | None  # integer spatial array
    geometry: Geometry


@dataclass
class CaseCheck:
    """The check of one case."""

    case_id: str
    problems: list[Problem]
    image_hash: str | None
    data: CaseData | None = None
    labels_present: tuple[int, ...] = ()
    ndim: int | None = None  # spatial dimensions of the label (or first channel)


def _err(kind: str, case: str | None, path: Path | None, message: str, fix: str) -> Problem:
    return Problem("error", kind, case, path, message, fix)


def _warn(kind: str, case: str | None, path: Path | None, message: str, fix: str) -> Problem:
    return Problem("warning", kind, case, path, message, fix)


def _read_channels(case: CaseFiles, spec: DatasetSpec, probs: list[Problem]) -> list[tuple[Path, Image]]:
    """Read the channel files; an RGB ``_0000`` file may hold every channel (nnU-Net's PNG convention)."""
    cid = case.case_id
    present = [p for p in case.images if p.is_file()]
    out: list[tuple[Path, Image]] = []
    for p in case.images:
        if not p.is_file():
            continue
        try:
            out.append((p, read_image(p)))
        except AutosegError as err:
            probs.append(_err("unreadable", cid, p, str(err).split(": ", 1)[-1], "re-export or re-copy the file"))
    packed = len(out) == 1 and out[0][0] == case.images[0] and out[0][1].array.shape[0] == spec.n_channels
    if packed:
        return out
    for p in case.images:
        if not p.is_file():
            probs.append(_err("missing_channel", cid, p, f"channel file {p.name} is missing "
                              f"({len(present)} of {spec.n_channels} channel files present)",
                              f"add {p.name} or fix channel_names in dataset.json"))
    for p, img in out:
        if img.array.shape[0] != 1:
            probs.append(_err("dimensionality", cid, p, f"the file holds {img.array.shape[0]} channels or "
                              f"volumes (shape {(*img.array.shape[1:],)} x {img.array.shape[0]}); one channel per "
                              "file is expected", "split it into one file per channel (CASE_0000, CASE_0001, ...); "
                              "for a Decathlon 4D image use `autoseg convert-msd`"))
    return out


def _check_values(case_id: str, path: Path, label: np.ndarray, spec: DatasetSpec,
                  probs: list[Problem]) -> np.ndarray | None:
    """Check label values; return them as an integer array, or None after an error."""
    if label.dtype.kind == "f":
        if not np.isfinite(label).all():
            probs.append(_err("nan_inf", case_id, path, "the label map holds NaN or inf values",
                              "save labels as integers"))
            return None
        frac = label[label != np.round(label)]
        if frac.size:
            probs.append(_err("label_values", case_id, path,
                              f"{frac.size} label voxels are not whole numbers (e.g. {np.unique(frac)[:3].tolist()}); "
                              "the mask looks interpolated or anti-aliased",
                              "round or threshold the labels, and resample label maps with nearest neighbour"))
            return None
    if label.dtype.kind not in "iuf" :
        probs.append(_err("label_values", case_id, path, f"label voxels have type {label.dtype}",
                          "save labels as integers"))
        return None
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0:
        probs.append(_err("label_values", case_id, path, f"negative label value {lo}", "labels start at 0 (background)"))
        return None
    seg = label.astype(np.int16 if hi < 2**15 else np.int32, copy=False)
    present = np.flatnonzero(np.bincount(seg.ravel(), minlength=1)) if hi < 2**20 else np.unique(seg)
    extra = sorted(set(int(v) for v in present) - set(spec.label_values))
    if extra:
        hint = "declare them in dataset.json 'labels' or relabel the file"
        if extra == [255] and set(spec.label_values) >= {0, 1}:
            hint = "this looks like a 0/255 mask: map 255 to 1 (e.g. seg[seg == 255] = 1) or declare 255"
        probs.append(_err("label_values", case_id, path, f"label values {extra} are not declared in dataset.json "
                          f"(declared: {list(spec.label_values)})", hint))
        return None
    if not any(v for v in present if v != spec.ignore_label):
        probs.append(_warn("empty_label", case_id, path, "the label map holds background only",
                           "fine for a case without findings; otherwise check the export"))
    return seg


def check_case(case: CaseFiles, spec: DatasetSpec, *, keep_arrays: bool = False,
               strict_geometry: bool = False) -> CaseCheck:
    """Read one case and check it: files present and readable, channels and label share shape and
    geometry, label values declared, no NaN/inf.

    Args:
        case: the case's files.
        spec: the parsed dataset.json.
        keep_arrays: hand the loaded arrays on in ``CaseCheck.data`` when the case has no error.
        strict_geometry: origin/direction mismatches are errors instead of warnings.

    Returns:
        The case's problems, a hash of its voxels (for duplicate detection) and optionally its arrays.
    """
    cid = case.case_id
    probs: list[Problem] = []
    channels = _read_channels(case, spec, probs)
    label_img: Image | None = None
    if case.label is None or not case.label.is_file():
        probs.append(_err("missing_label", cid, case.label, f"label file {case.label.name if case.label else ''} "
                          "is missing", "add the label map to labelsTr/ (same name as the case, no channel suffix)"))
    else:
        try:
            label_img = read_label(case.label)
        except AutosegError as err:
            probs.append(_err("unreadable", cid, case.label, str(err).split(": ", 1)[-1],
                              "re-export or re-copy the file"))
    ref = label_img or (Image(channels[0][1].array[0], channels[0][1].geometry) if channels else None)
    h = hashlib.blake2b(digest_size=16)
    for p, img in channels:
        h.update(img.array.tobytes())
        if not spacing_is_valid(img.geometry.spacing):
            probs.append(_err("spacing", cid, p, f"invalid spacing {img.geometry.spacing}",
                              "fix the header: spacing must be positive"))
        if not np.isfinite(img.array).all():
            n = int((~np.isfinite(img.array)).sum())
            probs.append(_err("nan_inf", cid, p, f"{n} voxels are NaN or inf", "replace them (e.g. with 0) "
                              "before training: np.nan_to_num"))
        if ref is None or (label_img is None and img is channels[0][1]):
            continue
        if img.array.shape[1:] != ref.array.shape:
            probs.append(_err("shape", cid, p, f"shape {img.array.shape[1:]} differs from the label's "
                              f"{ref.array.shape}", "resample/crop so every channel and the label share one grid"))
            continue
        for diff in img.geometry.differences(ref.geometry):
            spacing = diff.startswith("spacing") or diff.startswith("dimensionality")
            sev = _err if spacing or strict_geometry else _warn
            probs.append(sev("geometry", cid, p, f"{diff} (this file vs the label)",
                             "resample the file onto the label's grid or fix its header"))
    seg = None
    if label_img is not None:
        seg = _check_values(cid, case.label, label_img.array, spec, probs)
    present = tuple(int(v) for v in np.flatnonzero(np.bincount(seg.ravel()))) if seg is not None else ()
    ok = not any(p.severity == "error" for p in probs)
    data = None
    if keep_arrays and ok and channels:
        arrays = [img.array for _, img in channels]
        data = CaseData(np.concatenate(arrays) if len(arrays) > 1 else arrays[0], seg, channels[0][1].geometry)
    return CaseCheck(cid, probs, h.hexdigest() if channels else None, data, present,
                     ref.array.ndim if ref is not None else None)


def check_dataset_level(dataset: Dataset) -> list[Problem]:
    """Problems of the dataset as a whole: case count, stray files, label declarations."""
    spec, probs = dataset.spec, []
    if not dataset.cases:
        probs.append(_err("no_cases", None, dataset.root / "imagesTr", "no training cases found",
                          f"name images CASE_0000{spec.file_ending} (one file per channel) in imagesTr/"))
    elif len(dataset.cases) != spec.num_training:
        probs.append(_err("num_training", None, dataset.root / "dataset.json",
                          f"numTraining is {spec.num_training} but {len(dataset.cases)} cases were found",
                          f"set \"numTraining\": {len(dataset.cases)} or add the missing cases"))
    for p in dataset.stray_files:
        probs.append(_warn("stray_file", None, p, f"{p.name} belongs to no case (expected names CASE_XXXX"
                           f"{spec.file_ending} in imagesTr/, CASE{spec.file_ending} in labelsTr/)",
                           "rename it, or remove it if it is not part of the dataset"))
    plain = [v for v in spec.label_values if v != spec.ignore_label]
    if plain and plain != list(range(plain[-1] + 1)):
        probs.append(_warn("label_declaration", None, dataset.root / "dataset.json",
                           f"declared labels {plain} are not consecutive", "fine for autoseg; nnU-Net would "
                           "refuse it: relabel to 0..N-1 to share the dataset with nnU-Net"))
    ign = spec.ignore_label
    if ign is not None and ign != max(v for v in spec.label_values if v != ign) + 1:
        probs.append(_err("label_declaration", None, dataset.root / "dataset.json",
                          f"the ignore label is {ign}; it must be the largest label + 1",
                          "renumber the ignore label"))
    return probs


def assemble_report(dataset: Dataset, case_checks: Sequence[CaseCheck]) -> CheckReport:
    """Combine per-case checks with dataset-level problems, duplicates and classes absent everywhere."""
    probs = check_dataset_level(dataset)
    for c in case_checks:
        probs.extend(c.problems)
    dims = [c.ndim for c in case_checks if c.ndim is not None]
    if dims:
        common = max(set(dims), key=dims.count)
        for c in case_checks:
            if c.ndim is not None and c.ndim != common:
                probs.append(_err("dimensionality", c.case_id, None, f"the case is {c.ndim}D; most cases are "
                                  f"{common}D", f"convert it to {common}D or remove it"))
    found = set().union(*(c.labels_present for c in case_checks)) if case_checks else set()
    all_read = bool(case_checks) and all(c.labels_present for c in case_checks)
    for v in dataset.spec.foreground_labels:
        if all_read and v not in found:
            name = next((k for k, x in dataset.spec.labels.items() if x == v), str(v))
            probs.append(_warn("absent_class", None, dataset.root / "dataset.json",
                               f"class {name} ({v}) appears in no case", "check the labels or drop the class"))
    seen: dict[str, str] = {}
    for c in case_checks:
        if c.image_hash is None:
            continue
        if c.image_hash in seen:
            probs.append(_warn("duplicate", c.case_id, None, f"images are identical to case {seen[c.image_hash]}",
                               "remove the duplicate: it leaks between cross-validation folds"))
        else:
            seen[c.image_hash] = c.case_id
    return CheckReport(dataset=str(dataset.root), n_cases=len(case_checks), problems=probs)


def _check_worker(args: tuple[CaseFiles, DatasetSpec, bool]) -> CaseCheck:
    case, spec, strict = args
    return check_case(case, spec, strict_geometry=strict)


def check_dataset(dataset_or_path: Dataset | str | Path, *, jobs: int = 1, progress: bool = True,
                  strict_geometry: bool = False) -> CheckReport:
    """Check a whole dataset and report every problem at once (never raises on a bad dataset).

    Args:
        dataset_or_path: a loaded dataset or its folder.
        jobs: worker processes.
        progress: show a progress bar.
        strict_geometry: origin/direction mismatches are errors instead of warnings.

    Returns:
        The report.
    """
    if isinstance(dataset_or_path, Dataset):
        dataset = dataset_or_path
    else:
        try:
            dataset = load_dataset(dataset_or_path)
        except DatasetError as err:
            root = Path(dataset_or_path)
            return CheckReport(str(root), 0, [_err("dataset_json", None, root, str(err),
                                                   "fix dataset.json / the folder layout as the message says")])
    work = [(c, dataset.spec, strict_geometry) for c in dataset.cases]
    checks = list(imap_ordered(_check_worker, work, jobs=jobs, desc="check", progress=progress,
                               label=lambda w: f"case {w[0].case_id}"))
    return assemble_report(dataset, checks)


@dataclass
class CheckReport:
    """All problems of a dataset."""

    dataset: str
    n_cases: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def _rel(self, path: Path | None) -> str:
        if path is None:
            return "-"
        try:
            return str(Path(path).relative_to(self.dataset))
        except ValueError:
            return str(path)

    def summary(self) -> str:
        cases = len({p.case_id for p in self.problems if p.case_id})
        return (f"{self.dataset}: {len(self.errors)} errors, {len(self.warnings)} warnings in {cases} cases "
                f"({self.n_cases} cases checked)")

    def format_table(self, max_rows: int = 200) -> str:
        """The problems as an aligned text table, errors first, with a one-line summary."""
        rows = [(p.severity, p.case_id or "-", self._rel(p.path), p.message, p.fix)
                for p in self.errors + self.warnings]
        if not rows:
            return self.summary()
        head = ("severity", "case", "file", "problem", "fix")
        shown = rows[:max_rows]
        widths = [min(max(len(r[i]) for r in [head, *shown]), 60) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=True)) + "  " + r[3] + " -> " + r[4]
                 for r in [head, *shown]]
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more rows (see --json)")
        return "\n".join([*lines, self.summary()])

    def raise_for_errors(self) -> None:
        """Raise DatasetIntegrityError with the table when there are errors."""
        if self.errors:
            raise DatasetIntegrityError(f"the dataset check found errors:\n{self.format_table()}", report=self)

    def to_json(self) -> dict:
        return {"dataset": self.dataset, "n_cases": self.n_cases, "ok": self.ok,
                "problems": [{"severity": p.severity, "kind": p.kind, "case": p.case_id,
                              "file": self._rel(p.path), "message": p.message, "fix": p.fix} for p in self.problems]}
