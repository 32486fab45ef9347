"""Convert a Medical Segmentation Decathlon (MSD) task folder to the nnU-Net v2 raw layout.

MSD tasks (``Task01_BrainTumour`` ...) store one 4D NIfTI per case, channels on the 4th axis, and a
dataset.json whose ``labels`` map value -> name and whose ``modality`` names the channels. nnU-Net v2 wants
one 3D file per channel (``CASE_0000.nii.gz`` ...), labels as name -> value, and ``channel_names``. The
converter splits the channels keeping the geometry of the first three axes, copies the label files
unchanged, and writes the new dataset.json. macOS resource-fork files (``._*``), which the MSD archives
contain, are skipped.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from pathlib import Path
from typing import Any

from autoseg.errors import DatasetError
from autoseg.io.atomic import atomic_path, read_json, write_json_atomic
from autoseg.io.image import read_image, write_image

_ENDING = ".nii.gz"
_OUTPUTS = ("imagesTr", "labelsTr", "imagesTs", "dataset.json")


def convert_msd(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, dataset_id: int | None = None,
                overwrite: bool = False, progress: bool = True) -> Path:
    """Convert an MSD task folder into an nnU-Net v2 raw dataset folder.

    Args:
        src: the MSD task folder (holds dataset.json, imagesTr/, labelsTr/, imagesTs/).
        dst: the dataset folder to write. With ``dataset_id``, the parent folder instead: the dataset is
            written to ``dst/DatasetXXX_Name`` (``Name`` from the task folder, ``Task01_BrainTumour`` ->
            ``BrainTumour``).
        dataset_id: optional nnU-Net dataset number (1-999) used to name the output folder.
        overwrite: replace imagesTr/, labelsTr/, imagesTs/ and dataset.json of an existing, non-empty
            destination (other files there are left alone).
        progress: show a progress bar.

    Returns:
        The written dataset folder.

    Raises:
        DatasetError: ``src`` or its dataset.json is missing or malformed, a listed file is absent, an
            image has the wrong number of channels, or ``dst`` is not empty and ``overwrite`` is False.
        ImageReadError, ImageWriteError: an image cannot be read or written.

    Example:
        >>> out = convert_msd("Task01_BrainTumour", "raw", dataset_id=1)  # doctest: +SKIP
        >>> out.name  # doctest: +SKIP
        'Dataset001_BrainTumour'
    """
    src, dst = Path(src), Path(dst)
    meta = _read_msd_json(src)
    if dataset_id is not None:
        if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
            raise DatasetError(f"dataset_id={dataset_id!r}: must be an integer from 1 to 999 "
                               "(nnU-Net names folders DatasetXXX_Name).")
        dst = dst / f"Dataset{dataset_id:03d}_{_task_name(src)}"
    _prepare_destination(dst, overwrite)
    channels = _channel_names(meta, src)
    labels = _labels(meta, src)
    training = [_training_entry(e, src, i) for i, e in enumerate(meta["training"])]
    training = [(img, lab) for img, lab in training if not img.name.startswith("._")]
    tests = [_resolve(e, src, f"'test'[{i}]") for i, e in enumerate(meta.get("test") or [])]
    tests = [p for p in tests if not p.name.startswith("._")]
    for img, lab in training:
        _require(img, src)
        _require(lab, src)
    for img in tests:
        _require(img, src)

    jobs: list[tuple[Path, Path | None, str]] = [(img, lab, "Tr") for img, lab in training]
    jobs += [(img, None, "Ts") for img in tests]
    for img, lab, split in _progress(jobs, progress):
        case_id = _case_id(img)
        _split_channels(img, dst / f"images{split}", case_id, len(channels))
        if lab is not None:
            _copy_atomic(lab, dst / "labelsTr" / f"{case_id}{_ENDING}")

    out: dict[str, Any] = {"name": str(meta.get("name") or _task_name(src))}
    for key in ("description", "reference", "licence", "release", "tensorImageSize"):
        if key in meta:
            out[key] = meta[key]
    out["channel_names"] = {str(i): name for i, name in enumerate(channels)}
    out["labels"] = labels
    out["numTraining"] = len(training)
    out["file_ending"] = _ENDING
    out["converted_by"] = f"autoseg convert-msd from {src.name}"
    write_json_atomic(dst / "dataset.json", out)
    return dst


def _read_msd_json(src: Path) -> dict[str, Any]:
    if not src.is_dir():
        raise DatasetError(f"{src}: MSD task folder not found. Pass the folder that holds dataset.json, "
                           "imagesTr/ and labelsTr/ (e.g. Task01_BrainTumour).")
    path = src / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found. An MSD task folder has a dataset.json; re-extract the task "
                           "archive (e.g. Task01_BrainTumour.tar).")
    meta = read_json(path, DatasetError, "Re-extract the task archive.")
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must hold a JSON object, found {type(meta).__name__}.")
    for key, kind in (("modality", dict), ("labels", dict), ("training", list)):
        if not isinstance(meta.get(key), kind) or not meta[key]:
            raise DatasetError(f"{path}: needs a non-empty '{key}' {kind.__name__} as in the MSD format "
                               f"(found {meta.get(key)!r}). Is this an MSD task folder? An nnU-Net v2 "
                               "dataset needs no conversion.")
    return meta


def _task_name(src: Path) -> str:
    name = re.sub(r"^Task\d+_", "", src.resolve().name)
    return re.sub(r"[^A-Za-z0-9_-]", "_", name) or "Dataset"


def _prepare_destination(dst: Path, overwrite: bool) -> None:
    if dst.exists() and not dst.is_dir():
        raise DatasetError(f"{dst}: exists and is not a folder. Choose another destination.")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise DatasetError(f"{dst}: destination exists and is not empty. Choose an empty or new folder, "
                               "or pass overwrite=True (CLI: --overwrite) to replace the converted dataset.")
        for name in _OUTPUTS:
            target = dst / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    dst.mkdir(parents=True, exist_ok=True)


def _channel_names(meta: dict[str, Any], src: Path) -> list[str]:
    modality = meta["modality"]
    try:
        by_index = {int(k): str(v) for k, v in modality.items()}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{src / 'dataset.json'}: 'modality' keys must be channel indices \"0\", \"1\", "
                           f"...; found {list(modality)}.") from err
    if sorted(by_index) != list(range(len(modality))):
        raise DatasetError(f"{src / 'dataset.json'}: 'modality' keys must be 0..{len(modality) - 1} without "
                           f"gaps, found {list(modality)}.")
    return [by_index[i] for i in range(len(by_index))]


def _labels(meta: dict[str, Any], src: Path) -> dict[str, int]:
    """MSD's value -> name becomes nnU-Net's name -> value, sorted by value, background named 'background'."""
    source = src / "dataset.json"
    try:
        by_value = {int(k): str(v) for k, v in meta["labels"].items()}
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{source}: 'labels' keys must be label values \"0\", \"1\", ...; "
                           f"found {list(meta['labels'])}.") from err
    if 0 not in by_value:
        raise DatasetError(f"{source}: 'labels' has no entry \"0\" (background). Add \"0\": \"background\".")
    out: dict[str, int] = {}
    for value in sorted(by_value):
        name = "background" if value == 0 else by_value[value]
        if name in out:
            raise DatasetError(f"{source}: label name {name!r} is used for values {out[name]} and {value}. "
                               "Give each label value its own name.")
        out[name] = value
    return out


def _resolve(entry: Any, src: Path, where: str) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DatasetError(f"{src / 'dataset.json'}: {where} must be a path like \"./imagesTr/case.nii.gz\", "
                           f"found {entry!r}.")
    return src / os.path.normpath(entry)


def _training_entry(entry: Any, src: Path, i: int) -> tuple[Path, Path]:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DatasetError(f"{src / 'dataset.json'}: 'training'[{i}] must be an object with \"image\" and "
                           f"\"label\" paths, found {entry!r}.")
    return (_resolve(entry["image"], src, f"'training'[{i}].image"),
            _resolve(entry["label"], src, f"'training'[{i}].label"))


def _require(path: Path, src: Path) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: listed in {src / 'dataset.json'} but not found. Re-extract the task "
                           "archive, or remove the entry from dataset.json.")


def _case_id(path: Path) -> str:
    name = path.name
    for ending in (".nii.gz", ".nii"):
        if name.endswith(ending):
            return name[: -len(ending)]
    return path.stem


def _split_channels(image: Path, folder: Path, case_id: str, n_channels: int) -> None:
    img = read_image(image, dtype=None)
    if img.array.shape[0] != n_channels:
        raise DatasetError(f"{image}: holds {img.array.shape[0]} channel(s) but dataset.json's 'modality' "
                           f"names {n_channels}. Fix 'modality' or replace the file.")
    for c in range(n_channels):
        write_image(folder / f"{case_id}_{c:04d}{_ENDING}", img.array[c], img.geometry)


def _copy_atomic(source: Path, target: Path) -> None:
    """Copy a label file unchanged (an uncompressed .nii is gzipped, which makes a valid .nii.gz)."""
    with atomic_path(target) as tmp:
        if source.name.endswith(".nii"):
            with source.open("rb") as fin, gzip.open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            shutil.copyfile(source, tmp)


def _progress(items: list[Any], show: bool) -> Any:
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc="convert-msd", unit="case")
