"""Find and check the images to predict, before any prediction starts.

Input is a folder in the nnU-Net layout (``{CASE}_{XXXX}{ending}``, one file per channel; a channel may be a
DICOM series folder ``{CASE}_{XXXX}/``, and its case's output is NIfTI), one DICOM series folder (holding several
series: one case per series, named by its SeriesInstanceUID), or a list of files and series folders (a series of a
folder holding several is named ``FOLDER/<SeriesInstanceUID>``). Files without a channel suffix are accepted as whole cases when the model takes one channel, and a
list of exactly as many unsuffixed files as the model has channels is taken as the channels of one case, in
order. Channels that were not acquired are named with ``missing``: their files are not needed, and
:meth:`InputCase.read` zero-fills them (preprocessing blanks them after normalisation). Every header is read up front, so a missing channel, an unreadable file, channels that do not line up
or a channel-name mismatch stops the run with one message listing every problem, before hours of
prediction; nothing is written. Inputs far from the training data (spacing, size, intensities) only warn, case
by case while predicting (:mod:`autoseg.fingerprint.drift`).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, ImageReadError, PredictionInputError
from autoseg.io.dataset import CHANNEL_RE, CaseFiles, read_dataset_json
from autoseg.io.dicom import is_series_path, series_uids
from autoseg.io.image import SUPPORTED_ENDINGS, Geometry, compact_dtype, file_ending, read_header, read_image

#: problems listed in one error message before "and N more"
MAX_LISTED = 20


@dataclass(frozen=True)
class InputCase:
    """One case to predict.

    Attributes:
        case_id: the case name (outputs are ``<case_id><ending>``).
        images: the files of the *present* channels, in channel order (channel ``present[i]`` is
            ``images[i]``); with nothing missing, one file per model channel.
        ending: the file ending the outputs get.
        missing: indices of the model's channels that were not acquired (no file; filled with 0 after
            normalisation), sorted.
    """

    case_id: str
    images: tuple[Path, ...]
    ending: str
    missing: tuple[int, ...] = ()

    @property
    def n_channels(self) -> int:
        """The model's number of input channels (present + missing)."""
        return len(self.images) + len(self.missing)

    @property
    def present(self) -> tuple[int, ...]:
        """Channel index of each file in :attr:`images`."""
        return tuple(c for c in range(self.n_channels) if c not in self.missing)

    def as_case_files(self) -> CaseFiles:
        """The present channel files as a :class:`CaseFiles` (no label); see :meth:`read` for all channels."""
        return CaseFiles(self.case_id, self.images, None)

    def read(self) -> tuple[np.ndarray, Geometry]:
        """Read the case as the model's full input: missing channels are zero-filled.

        Pass :attr:`missing` on to preprocessing (``preprocess_arrays(..., missing=case.missing)``): the zeros
        here only hold the place; preprocessing sets those channels to 0 *after* normalisation.

        Returns:
            ``(n_channels, *spatial)`` in file layout, in the files' type when it is compact (e.g. int16 CT, see
            :func:`~autoseg.io.image.compact_dtype`) else float32, and the geometry of the first present file.

        Raises:
            ImageReadError: a file cannot be read.
            PredictionInputError: a file holds more than one channel or NaN/inf voxels, or files of the case
                differ in shape.

        Example:
            >>> images, geometry = case.read()  # doctest: +SKIP
        """
        arrays, geometry = [], None
        for path in self.images:
            img = read_image(path, dtype="compact")
            if img.array.shape[0] != 1:
                raise PredictionInputError(f"{path}: {img.array.shape[0]} values per voxel; each channel must be "
                                           "its own single-valued file (split it into _0000, _0001, ...).")
            if arrays and img.array.shape != arrays[0].shape:
                raise PredictionInputError(f"case {self.case_id}: {path.name} has shape {img.array.shape[1:]}, "
                                           f"{self.images[0].name} has {arrays[0].shape[1:]}; all channels of a "
                                           "case must be on the same grid.")
            if img.array.dtype.kind == "f" and not np.isfinite(img.array).all():
                bad = img.array.size - int(np.count_nonzero(np.isfinite(img.array)))
                raise PredictionInputError(f"{path}: {bad} NaN or inf voxel(s), which the network cannot take; replace "
                                           "them (e.g. np.nan_to_num(image, nan=0.0)) and save the file again.")
            geometry = geometry or img.geometry
            arrays.append(img.array)
        if geometry is None:
            raise PredictionInputError(f"case {self.case_id}: no channel file (every channel is missing).")
        dtype = compact_dtype(*(a.dtype for a in arrays))
        if self.n_channels == 1:  # the one file as read: no second copy
            return arrays[0].astype(dtype, copy=False), geometry
        out = np.zeros((self.n_channels, *arrays[0].shape[1:]), dtype)
        for c, arr in zip(self.present, arrays, strict=True):
            out[c] = arr[0]
        return out, geometry


def _channels_text(names: Sequence[str]) -> str:
    return ", ".join(f"_{i:04d} {n}" for i, n in enumerate(names))


def _fail(problems: list[str], what: str) -> None:
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise PredictionInputError(f"{what}: {len(problems)} problem(s), nothing was predicted:\n  "
                                   + "\n  ".join(shown) + more)


def resolve_missing(missing: Sequence[str | int], channel_names: Sequence[str]) -> tuple[int, ...]:
    """Channel indices of channels named as not acquired.

    Args:
        missing: channel names (case-insensitive, as in dataset.json ``channel_names``) or indices (ints, or
            strings of digits that are not a channel name).
        channel_names: the model's input channels.

    Returns:
        Sorted indices without duplicates.

    Raises:
        PredictionInputError: an unknown name (with "did you mean" and the channel list), an index out of
            range, or every channel missing.

    Example:
        >>> resolve_missing(["flair", 0], ["T1", "T1ce", "T2", "FLAIR"])
        (0, 3)
    """
    lower = [name.lower() for name in channel_names]
    n = len(channel_names)
    out: set[int] = set()
    for m in [missing] if isinstance(missing, str) else missing:
        if isinstance(m, (int, np.integer)) and not isinstance(m, bool):
            index = int(m)
        elif isinstance(m, str) and m.strip().lower() in lower:
            index = lower.index(m.strip().lower())
        elif isinstance(m, str) and m.strip().isdigit():
            index = int(m.strip())
        else:
            close = difflib.get_close_matches(str(m).lower(), lower, n=1, cutoff=0.5) if isinstance(m, str) else []
            hint = f" Did you mean {channel_names[lower.index(close[0])]!r}?" if close else ""
            raise PredictionInputError(f"--missing {m!r} is not an input channel of this model.{hint} Its channels "
                                       f"are {_channels_text(channel_names)}; give names or indices.")
        if not 0 <= index < n:
            raise PredictionInputError(f"--missing {m!r}: channel index {index} is out of range; this model has "
                                       f"{n} channel(s): {_channels_text(channel_names)}.")
        out.add(index)
    if n and len(out) == n:
        raise PredictionInputError(f"--missing names every input channel ({_channels_text(channel_names)}); at "
                                   "least one channel must be given to segment anything.")
    return tuple(sorted(out))


def collect_cases(inputs: Sequence[str | os.PathLike[str]], channel_names: Sequence[str],
                  missing: Sequence[str | int] = ()) -> list[InputCase]:
    """Group input files into cases.

    Args:
        inputs: one folder, or image files.
        channel_names: the model's input channels (their number sets how files are grouped).
        missing: channels that were not acquired, by name (case-insensitive) or index: their ``_000k`` files
            are not needed (and ignored if present); every case gets them in :attr:`InputCase.missing`. A list
            of unsuffixed files as long as the present channels is then one case, in the present channels'
            order (a list as long as all channels still is one case; the missing channels' files are ignored).

    Returns:
        Cases sorted by id.

    Raises:
        PredictionInputError: no input, an empty folder, missing or surplus channel files, unsupported files
            given explicitly (the message lists every problem and how to name the files), an unknown
            ``missing`` channel, or every channel missing.

    Example:
        >>> collect_cases(["imagesTs"], ["T1", "T2", "FLAIR"], missing=["FLAIR"])  # doctest: +SKIP
    """
    absent = resolve_missing(missing, channel_names)
    n = len(channel_names)
    n_present = n - len(absent)
    paths = [Path(p) for p in inputs]
    if not paths:
        raise PredictionInputError("no input given; pass a folder of images or image files with -i.")
    missing = [str(p) for p in paths if not p.exists() and not is_series_path(p)]
    if missing:
        raise PredictionInputError(f"input not found: {', '.join(missing)}. Check the path(s).")
    if len(paths) == 1 and paths[0].is_dir():
        files = _folder_entries(paths[0], channel_names)
    else:
        files = paths
        bad = [str(p) for p in files if not is_series_path(p) and file_ending(p) not in SUPPORTED_ENDINGS]
        if bad:
            raise PredictionInputError(f"{', '.join(bad)}: not a supported image type. Supported: "
                                       f"{', '.join(SUPPORTED_ENDINGS)}, or a DICOM series folder.")
        plain = [p for p in files if not CHANNEL_RE.match(_stem_ending(p)[0])]
        one_case = len(files) == n or (n_present > 1 and len(files) == n_present)
        if n > 1 and len(plain) == len(files) and one_case:  # one case's channels, in the order given
            if len(files) == n:  # every channel given: those marked missing are ignored
                files = [files[c] for c in range(n) if c not in absent]
            stem, ending = _stem_ending(files[0])
            return [InputCase(stem, tuple(files), ending, absent)]
    return _group(files, channel_names, absent)


#: the output ending of cases read from DICOM series folders
SERIES_OUTPUT_ENDING = ".nii.gz"


def _stem_ending(path: Path) -> tuple[str, str]:
    """A file's name without its ending, and the ending; a DICOM series folder's name (or chosen series' UID), and the
    output ending."""
    if is_series_path(path):
        return path.name, SERIES_OUTPUT_ENDING
    ending = file_ending(path)
    return path.name[: -len(ending)], ending


def _holds_series(folder: Path) -> bool:
    """Whether a folder looks like a DICOM series: it holds files and none of an image type autoseg reads (a folder
    of NIfTI files, e.g. earlier predictions, is not taken for a case)."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]
    return bool(files) and not any(file_ending(p) in SUPPORTED_ENDINGS for p in files)


def _folder_entries(folder: Path, channel_names: Sequence[str]) -> list[Path]:
    """The image files and DICOM series folders in ``folder``; the folder itself when it is one DICOM series."""
    entries = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".")
               and (_holds_series(p) if p.is_dir() else p.is_file() and file_ending(p) in SUPPORTED_ENDINGS)]
    if entries:
        return entries
    if _holds_series(folder):  # the folder itself is a series (read_image judges whether it is DICOM); several: a case each
        uids = series_uids(folder)
        return [folder / uid for uid in uids] if len(uids) > 1 else [folder]
    raise PredictionInputError(
        f"{folder}: no image files ({', '.join(SUPPORTED_ENDINGS)}) or DICOM series folders in this folder. Put the "
        f"cases here as CASE_0000.nii.gz ... (one file or series folder per channel: {_channels_text(channel_names)}).")


def _group(files: Iterable[Path], channel_names: Sequence[str], missing: tuple[int, ...] = ()) -> list[InputCase]:
    n = len(channel_names)
    present = [c for c in range(n) if c not in missing]
    by_case: dict[tuple[str, str], dict[int, Path]] = {}
    problems: list[str] = []
    for p in files:
        stem, ending = _stem_ending(p)
        m = CHANNEL_RE.match(stem)
        if m is None and len(present) == 1:
            case, ch = stem, present[0]
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
        lacking = [c for c in present if c not in chans]
        if lacking:
            names = " ".join(channel_names[c] for c in sorted({*missing, *lacking}))
            problems.append(f"case {case}: missing channel file(s) "
                            + ", ".join(f"{case}_{c:04d}{ending} ({channel_names[c]})" for c in lacking)
                            + "; every case needs all the channels the model was trained with (if this sequence "
                            f"was not acquired, pass --missing {names}).")
        if not extra and not lacking:
            cases.append(InputCase(case, tuple(chans[c] for c in present), ending, missing))
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


def check_cases(cases: Sequence[InputCase], ndim: int | None = None) -> list[CaseInfo]:
    """Read every header; channels of a case must agree in shape and spacing (and be ``ndim``-D if given).

    Args:
        cases: from :func:`collect_cases`.
        ndim: the dimensionality of the training images (3 for volumes); other files are refused, and
            files of more than 3 dimensions always.

    Returns:
        Per case its shape and spacing.

    Raises:
        PredictionInputError: unreadable files, or channels that do not line up (every problem listed).
    """
    problems: list[str] = []
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
            if len(h.shape) != (ndim or len(h.shape)) or len(h.shape) > 3:
                problems.append(f"{h.path}: a {len(h.shape)}D image (shape {h.shape}), but the model was trained on "
                                f"{ndim or '2D or 3'}D images; give {ndim or '2D or 3'}D files like the training "
                                "images (one file per channel).")
            elif h.n_components != 1:
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
        infos.append(CaseInfo(case, first.shape, tuple(first.geometry.array_spacing)))
    _fail(problems, "input images")
    return infos

