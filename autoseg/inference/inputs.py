"""Find and check the images to predict, before any prediction starts.

Input is a folder in the nnU-Net layout (``{CASE}_{XXXX}{ending}``, one file per channel), or a list of
files. Files without a channel suffix are accepted as whole cases when the model takes one channel, and a
list of exactly as many unsuffixed files as the model has channels is taken as the channels of one case, in
order. Every header is read up front, so a missing channel, an unreadable file, channels that do not line up
or a channel-name mismatch stops the run with one message listing every problem, before hours of
prediction; nothing is written. A spacing far outside the training range only warns.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, ImageReadError
from autoseg.io.dataset import CHANNEL_RE, CaseFiles, read_dataset_json
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending, read_header

#: a spacing more than this factor outside the training range (per axis) gets a warning
SPACING_WARN_FACTOR = 2.0
#: problems listed in one error message before "and N more"
MAX_LISTED = 20

class PredictionInputError(AutosegError, ValueError):
    """The images given to ``predict`` are missing, unreadable or do not fit the model."""


@dataclass(frozen=True)
class InputCase:
    """One case to predict: its channel files (in channel order) and the file ending outputs get."""

    case_id: str
    images: tuple[Path, ...]
    ending: str

    def as_case_files(self) -> CaseFiles:
        return CaseFiles(self.case_id, self.images, None)


def _channels_text(names: Sequence[str]) -> str:
    return ", ".join(f"_{i:04d} {n}" for i, n in enumerate(names))


def _fail(problems: list[str], what: str) -> None:
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PredictionInputError(f"{what}: {len(problems)} problem(s), nothing was predicted:\n  "
                                   + "\n  ".join(shown) + more)


def collect_cases(inputs: Sequence[str | os.PathLike[str]], channel_names: Sequence[str]) -> list[InputCase]:
    """Group input files into cases.

    Args:
        inputs: one folder, or image files.
        channel_names: the model's input channels (their number sets how files are grouped).

    Returns:
        Cases sorted by id.

    Raises:
        PredictionInputError: no input, an empty folder, missing or surplus channel files, unsupported files
            given explicitly (the message lists every problem and how to name the files).
    """
    n = len(channel_names)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise PredictionInputError("no input given; pass a folder of images or image files with -i.")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise PredictionInputError(f"input not found: {', '.join(missing)}. Check the path(s).")
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
                 and file_ending(p) in SUPPORTED_ENDINGS]
        if not files:
            raise PredictionInputError(
                f"{folder}: no image files ({', '.join(SUPPORTED_ENDINGS)}) in this folder. Put the cases here "
                f"as CASE_0000.nii.gz ... (one file per channel: {_channels_text(channel_names)}).")
    else:
        dirs = [str(p) for p in paths if p.is_dir()]
        if dirs:
            raise PredictionInputError(f"{', '.join(dirs)}: give either one folder or image files, not both.")
        files = paths
        bad = [str(p) for p in files if file_ending(p) not in SUPPORTED_ENDINGS]
        if bad:
            raise PredictionInputError(f"{', '.join(bad)}: not a supported image type. Supported: "
                                       f"{', '.join(SUPPORTED_ENDINGS)}.")
        plain = [p for p in files if not CHANNEL_RE.match(p.name[: -len(file_ending(p))])]
        if n > 1 and len(plain) == len(files) == n:  # the channels of one case, in the order given
            stem = files[0].name[: -len(file_ending(files[0]))]
            return [InputCase(stem, tuple(files), file_ending(files[0]))]
    return _group(files, channel_names)


def _group(files: Iterable[Path], channel_names: Sequence[str]) -> list[InputCase]:
    n = len(channel_names)
    by_case: dict[tuple[str, str], dict[int, Path]] = {}
    problems: list[str] = []
    for p in files:
        ending = file_ending(p)
        stem = p.name[: -len(ending)]
        m = CHANNEL_RE.match(stem)
        if m is None and n == 1:
            case, ch = stem, 0
        elif m is None:
            problems.append(f"{p}: no channel suffix, but the model takes {n} channels; name the files "
                            f"{stem}_0000{ending} ... {stem}_{n - 1:04d}{ending} ({_channels_text(channel_names)}).")
            continue
        else:
            case, ch = m["case"], int(m["ch"])
        by_case.setdefault((case, ending), {})[ch] = p
    ids: dict[str, list[str]] = {}
    for case, ending in by_case:
        ids.setdefault(case, []).append(ending)
    for case, endings in ids.items():
        if len(endings) > 1:
            problems.append(f"case {case}: files with different endings ({', '.join(sorted(endings))}); keep one "
                            "format per case.")
    cases = []
    for (case, ending), chans in sorted(by_case.items()):
        extra = sorted(c for c in chans if c >= n)
        if extra:
            problems.append(f"case {case}: {', '.join(chans[c].name for c in extra)} but the model takes {n} "
                            f"channel(s) ({_channels_text(channel_names)}); remove the extra file(s) or use "
                            "the model trained with them.")
        lacking = [c for c in range(n) if c not in chans]
        if lacking:
            problems.append(f"case {case}: missing channel file(s) "
                            + ", ".join(f"{case}_{c:04d}{ending} ({channel_names[c]})" for c in lacking)
                            + "; every case needs all the channels the model was trained with.")
        if not extra and not lacking:
            cases.append(InputCase(case, tuple(chans[c] for c in range(n)), ending))
    _fail(problems, "input images")
    return cases


def check_channel_names(inputs: Sequence[str | os.PathLike[str]], channel_names: Sequence[str]) -> None:
    """Compare the channel names of a ``dataset.json`` next to the input (in the folder or its parent) with
    the model's; a different order or modality is an error (a T2 fed as FLAIR segments silently badly)."""
    first = Path(inputs[0]) if inputs else None
    if first is None:
        return
    folder = first if first.is_dir() else first.parent
    for spec_path in (folder / "dataset.json", folder.parent / "dataset.json"):
        if not spec_path.is_file():
            continue
        try:
            names = read_dataset_json(spec_path).channel_names
        except AutosegError:
            return  # not a dataset.json of ours to judge
        if tuple(n.lower() for n in names) != tuple(n.lower() for n in channel_names):
            raise PredictionInputError(
                f"{spec_path} names the input channels {_channels_text(names)}, but the model was trained on "
                f"{_channels_text(channel_names)}. Rename or reorder the files so that each suffix carries the "
                "channel the model expects (or use the model trained on these channels).")
        return


@dataclass(frozen=True)
class CaseInfo:
    """What the headers of one case say (numpy axis order)."""

    case: InputCase
    shape: tuple[int, ...]
    spacing: tuple[float, ...]


def check_cases(cases: Sequence[InputCase], *, training_spacings: np.ndarray | None = None
                ) -> tuple[list[CaseInfo], list[str]]:
    """Read every header; channels of a case must agree in shape and spacing.

    Args:
        cases: from :func:`collect_cases`.
        training_spacings: ``(n_cases, ndim)`` spacings of the training cases (numpy order), for the drift
            warning; None skips it.

    Returns:
        Per case its shape and spacing, and warnings (spacing far outside the training range).

    Raises:
        PredictionInputError: unreadable files, or channels that do not line up (every problem listed).
    """
    problems: list[str] = []
    warnings: list[str] = []
    infos: list[CaseInfo] = []
    for case in cases:
        headers = []
        for p in case.images:
            try:
                headers.append(read_header(p))
            except ImageReadError as err:
                problems.append(str(err))
        if len(headers) != len(case.images):
            continue
        first = headers[0]
        for h in headers:
            if h.n_components != 1:
                problems.append(f"{h.path}: {h.n_components} values per voxel (RGB or vector image); each channel "
                                "must be its own single-valued file (split it into _0000, _0001, ...).")
            elif h.shape != first.shape:
                problems.append(f"case {case.case_id}: {h.path.name} has shape {h.shape}, {first.path.name} has "
                                f"{first.shape}; all channels of a case must be on the same grid (resample them "
                                "to the first channel).")
            else:
                diff = first.geometry.differences(h.geometry)
                if any(d.startswith("spacing") or d.startswith("dimensionality") for d in diff):
                    problems.append(f"case {case.case_id}: {h.path.name} differs from {first.path.name} in "
                                    f"{'; '.join(diff)}; register/resample the channels onto one grid.")
        info = CaseInfo(case, first.shape, tuple(first.geometry.array_spacing))
        infos.append(info)
        if training_spacings is not None:
            warnings += _spacing_drift(info, training_spacings)
    _fail(problems, "input images")
    return infos, warnings


def _spacing_drift(info: CaseInfo, training: np.ndarray) -> list[str]:
    if training.ndim == 2 and training.shape[1] == len(info.spacing) + 1:
        training = training[:, 1:]  # 2D files: the fingerprint's leading axis is the dummy one
    if training.ndim != 2 or training.shape[1] != len(info.spacing):
        return []
    lo, hi = training.min(axis=0), training.max(axis=0)
    out = []
    axes = ("z", "y", "x")[-len(info.spacing):]
    for ax, s, a, b in zip(axes, info.spacing, lo, hi, strict=True):
        factor = max(a / s, s / b) if s > 0 else float("inf")
        if factor > SPACING_WARN_FACTOR:
            side = "finer than the finest" if s < a else "coarser than the coarsest"
            out.append(f"case {info.case.case_id}: spacing {s:.4g} mm along {ax} is {factor:.1f}x {side} training "
                       f"spacing (training range {a:.4g}-{b:.4g} mm); it is resampled, but expect lower accuracy.")
    return out
