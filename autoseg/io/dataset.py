"""The nnU-Net v2 raw dataset layout: ``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``.

Datasets prepared for nnU-Net load unchanged: images are ``{CASE}_{XXXX}{file_ending}`` (XXXX = 4-digit
channel index), labels ``{CASE}{file_ending}``; a channel may also be a folder ``{CASE}_{XXXX}/`` holding one
DICOM series (the label stays a ``{CASE}{file_ending}`` file); alternatively dataset.json lists the files of each case under
a ``"dataset"`` key. Loading never reads voxels; problems with the files themselves are the integrity
check's job (:mod:`autoseg.io.check`).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetError
from autoseg.io.atomic import read_json

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class DatasetSpec:
    """The parsed ``dataset.json``.

    ``labels`` maps a name to an integer label, or to a tuple of labels for a region (BraTS style:
    ``whole_tumor: [1, 2, 3]``). ``ignore_label`` is the value of the label named ``ignore``, if any.
    """

    channel_names: tuple[str, ...]
    labels: dict[str, int | tuple[int, ...]]
    num_training: int
    file_ending: str
    regions_class_order: tuple[int, ...] | None = None
    name: str = ""
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def n_channels(self) -> int:
        return len(self.channel_names)

    @property
    def has_regions(self) -> bool:
        return any(isinstance(v, tuple) and len(v) > 1 for k, v in self.labels.items() if k != "ignore")

    @property
    def ignore_label(self) -> int | None:
        v = self.labels.get("ignore")
        return int(v) if isinstance(v, int) else None

    @property
    def label_values(self) -> tuple[int, ...]:
        """Every integer that may appear in a label file (background and ignore included), sorted."""
        vals: set[int] = set()
        for v in self.labels.values():
            vals.update(v if isinstance(v, tuple) else (v,))
        return tuple(sorted(vals))

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        """Label values other than background (0) and the ignore label."""
        return tuple(v for v in self.label_values if v != 0 and v != self.ignore_label)

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "dataset.json") -> DatasetSpec:
        """Parse a dataset.json dictionary.

        Raises:
            DatasetError: a required key is missing or a value has the wrong type; the message names
                the key, the value and the fix.
        """
        if not isinstance(d, dict):
            raise DatasetError(f"{source}: must hold a JSON object, found {type(d).__name__}.")
        d = dict(d)
        if "channel_names" not in d and "modality" in d:
            warnings.warn(f"{source}: 'modality' is the old name of 'channel_names'; rename it.", stacklevel=2)
            d["channel_names"] = d["modality"]
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise DatasetError(
                f"{source}: missing required key(s) {', '.join(missing)}. A dataset.json needs "
                '"channel_names" (e.g. {"0": "T1"}), "labels" (e.g. {"background": 0, "tumour": 1}), '
                '"numTraining" and "file_ending" (e.g. ".nii.gz").'
            )
        return cls(
            channel_names=_parse_channels(d["channel_names"], source),
            labels=_parse_labels(d["labels"], source),
            num_training=_parse_int(d["numTraining"], "numTraining", source),
            file_ending=_parse_ending(d["file_ending"], source),
            regions_class_order=_parse_region_order(d.get("regions_class_order"), source),
            name=str(d.get("name", "")),
            raw=d,
        )


def _parse_int(v: Any, key: str, source: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int | str) or not str(v).strip().isdigit():
        raise DatasetError(f"{source}: '{key}' must be a non-negative integer (the number of training "
                           f"cases, e.g. 8), found {v!r}.")
    return int(v)


def _parse_channels(v: Any, source: str) -> tuple[str, ...]:
    if not isinstance(v, dict) or not v:
        raise DatasetError(f"{source}: 'channel_names' must be a non-empty object like "
                           f'{{"0": "T1", "1": "T2"}}, found {v!r}.')
    try:
        by_index = {int(k): name for k, name in v.items()}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{source}: 'channel_names' keys must be channel indices \"0\", \"1\", ...; "
                           f"found {list(v)}. Number the channels from \"0\".") from err
    keys = sorted(by_index)
    if len(by_index) != len(v) or keys != list(range(len(keys))):
        raise DatasetError(f"{source}: 'channel_names' keys must be \"0\"..\"{len(v) - 1}\" without gaps or "
                           f"repeats, found {list(v)}. Number the channels 0, 1, ... as in the file names "
                           "CASE_0000, CASE_0001, ...")
    return tuple(str(by_index[k]) for k in keys)


def _parse_labels(v: Any, source: str) -> dict[str, int | tuple[int, ...]]:
    if not isinstance(v, dict) or not v:
        raise DatasetError(f"{source}: 'labels' must be an object like {{\"background\": 0, \"tumour\": 1}}, "
                           f"found {v!r}.")
    out: dict[str, int | tuple[int, ...]] = {}
    for name, val in v.items():
        if isinstance(val, list | tuple):
            if not val or not all(isinstance(x, int) and not isinstance(x, bool) for x in val):
                raise DatasetError(f"{source}: region label '{name}' must be a list of integers, found {val!r}.")
            out[name] = tuple(int(x) for x in val) if len(val) > 1 else int(val[0])
        elif isinstance(val, int) and not isinstance(val, bool):
            out[name] = int(val)
        elif isinstance(val, str) and val.strip().lstrip("-").isdigit():
            out[name] = int(val)
        else:
            raise DatasetError(f"{source}: label '{name}' must be an integer (or a list for a region), "
                               f"found {val!r}.")
    if out.get("background") != 0:
        raise DatasetError(f"{source}: 'labels' must contain \"background\": 0 (found "
                           f"{out.get('background', 'no background entry')!r}). Add it; background is label 0.")
    return out


def _parse_ending(v: Any, source: str) -> str:
    if not isinstance(v, str) or not v.startswith("."):
        raise DatasetError(f"{source}: 'file_ending' must be a string starting with '.', like \".nii.gz\"; "
                           f"found {v!r}.")
    return v


def _parse_region_order(v: Any, source: str) -> tuple[int, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not all(isinstance(x, int) for x in v):
        raise DatasetError(f"{source}: 'regions_class_order' must be a list of integers, found {v!r}.")
    return tuple(v)


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case. ``images`` are the expected channel files (they may not exist)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass(frozen=True)
class Dataset:
    """A raw dataset folder. Building it reads file names only, never voxels."""

    root: Path
    spec: DatasetSpec
    cases: tuple[CaseFiles, ...]
    stray_files: tuple[Path, ...] = ()  # files in imagesTr/labelsTr that belong to no case

    @property
    def name(self) -> str:
        return self.spec.name or self.root.name

    def test_cases(self) -> tuple[CaseFiles, ...]:
        """Cases in ``imagesTs/`` (no labels), if the folder exists."""
        folder = self.root / "imagesTs"
        if not folder.is_dir():
            return ()
        return find_cases(folder, self.spec.file_ending, self.spec.n_channels)[0]


#: ``{CASE}_{XXXX}``: a case id and a 4-digit channel index (nnU-Net file names, without the ending)
CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def channel_path(folder: Path, case_id: str, channel: int, file_ending: str) -> Path:
    """A case's channel: the DICOM series folder ``{CASE}_{XXXX}/`` when there is one, else the file
    ``{CASE}_{XXXX}{file_ending}`` (which may not exist)."""
    series = folder / f"{case_id}_{channel:04d}"
    return series if series.is_dir() else folder / f"{case_id}_{channel:04d}{file_ending}"


def find_cases(folder: Path, file_ending: str, n_channels: int,
               label_folder: Path | None = None) -> tuple[tuple[CaseFiles, ...], tuple[Path, ...]]:
    """Group ``{CASE}_{XXXX}{file_ending}`` files (or ``{CASE}_{XXXX}/`` DICOM series folders) in ``folder``
    into cases.

    Returns:
        The cases sorted by id (expected channel paths ``_0000`` .. ``_{n-1}``; the label path if
        ``label_folder`` is given) and the files that fit no case (wrong ending, no channel suffix, or a
        channel index of ``n_channels`` or more).
    """
    ids: set[str] = set()
    stray: list[Path] = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else []:
        if p.name.startswith("."):
            continue
        if p.is_dir():
            m = CHANNEL_RE.match(p.name)
            if m is None:  # not a channel's series: another folder, as before DICOM
                continue
        else:
            m = CHANNEL_RE.match(p.name[: -len(file_ending)]) if p.name.endswith(file_ending) else None
        if m is None or int(m["ch"]) >= n_channels:  # no channel suffix, or a channel dataset.json does not declare
            stray.append(p)
        else:
            ids.add(m["case"])
    cases = tuple(
        CaseFiles(cid, tuple(channel_path(folder, cid, c, file_ending) for c in range(n_channels)),
                  (label_folder / f"{cid}{file_ending}") if label_folder is not None else None)
        for cid in sorted(ids)
    )
    return cases, tuple(stray)


def read_dataset_json(path: Path) -> DatasetSpec:
    """Read and parse ``dataset.json``.

    Raises:
        DatasetError: the file is missing, not valid JSON, or malformed.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: not found. A dataset folder needs a dataset.json (nnU-Net v2 format); "
                           "for a Medical Segmentation Decathlon folder run `autoseg convert-msd` first.")
    d = read_json(path, DatasetError, "Fix the syntax (a JSON validator shows the line).")
    return DatasetSpec.from_json(d, source=str(path))


def _inside(root: Path, rel: Any, source: str) -> Path:
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise DatasetError(f"{source}: file entries in 'dataset' must be path strings relative to the dataset "
                           f"folder, found {rel!r}.")
    # Normalise lexically (no symlink resolution): the text of dataset.json ('..', absolute paths, variables) may not
    # leave the folder, but links inside it are the folder owner's choice and are followed, as in the imagesTr
    # layout (imagesTr on a larger disk, files linked instead of copied: common for nnU-Net datasets).
    base = Path(os.path.normpath(root.absolute()))
    p = Path(os.path.normpath(base / os.path.expandvars(rel)))
    if not p.is_relative_to(base):
        raise DatasetError(f"{source}: path {rel!r} points outside the dataset folder {root}. "
                           "List files inside the dataset folder only.")
    return p


def _explicit_cases(root: Path, spec: DatasetSpec, listing: Any, source: str) -> tuple[CaseFiles, ...]:
    if not isinstance(listing, dict):
        raise DatasetError(f"{source}: 'dataset' must map case ids to {{\"images\": [...], \"label\": ...}}.")
    cases = []
    for cid, entry in sorted(listing.items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("images"), list):
            raise DatasetError(f"{source}: case {cid!r} in 'dataset' needs an 'images' list and a 'label'.")
        label = entry.get("label")
        cases.append(CaseFiles(str(cid), tuple(_inside(root, p, source) for p in entry["images"]),
                               _inside(root, label, source) if label else None))
    return tuple(cases)


def load_dataset(root: str | os.PathLike[str]) -> Dataset:
    """Load a dataset folder in the nnU-Net v2 raw layout.

    Args:
        root: the folder holding dataset.json, imagesTr/ and labelsTr/.

    Returns:
        The dataset; ``dataset.cases`` lists the training cases found in imagesTr/.

    Raises:
        DatasetError: the folder, dataset.json or imagesTr/ is missing or malformed.

    Example:
        >>> ds = load_dataset("Dataset001_BrainTumour")  # doctest: +SKIP
        >>> [c.case_id for c in ds.cases][:3]  # doctest: +SKIP
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found. Pass the folder that holds dataset.json.")
    spec = read_dataset_json(root / "dataset.json")
    source = str(root / "dataset.json")
    if "dataset" in spec.raw:
        return Dataset(root, spec, _explicit_cases(root, spec, spec.raw["dataset"], source))
    images = root / "imagesTr"
    if not images.is_dir():
        raise DatasetError(f"{images}: folder not found. Put training images there as "
                           f"CASE_0000{spec.file_ending} (one file per channel).")
    cases, image_strays = find_cases(images, spec.file_ending, spec.n_channels, root / "labelsTr")
    stray = list(image_strays)
    ids = {c.case_id for c in cases}
    labels = root / "labelsTr"
    for p in sorted(labels.iterdir()) if labels.is_dir() else []:
        if p.is_file() and not p.name.startswith(".") and (
                not p.name.endswith(spec.file_ending) or p.name[: -len(spec.file_ending)] not in ids):
            stray.append(p)
    return Dataset(root, spec, cases, tuple(stray))


#: work-folder file naming the dataset it was planned from (so later stages find the reference labels)
SOURCE = "source.json"


def record_dataset_source(workdir: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Remember in ``workdir/source.json`` which dataset folder the work folder belongs to."""
    from autoseg.io.atomic import write_json_atomic

    write_json_atomic(Path(workdir) / SOURCE, {"dataset": str(Path(root).resolve())})


def dataset_source(workdir: str | os.PathLike[str]) -> Path | None:
    """The dataset folder recorded by :func:`record_dataset_source`, or None."""
    path = Path(workdir) / SOURCE
    try:
        value = read_json(path, DatasetError, "").get("dataset") if path.is_file() else None
    except (DatasetError, AttributeError):
        return None
    return Path(value) if isinstance(value, str) else None
