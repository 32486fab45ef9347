"""Reading an nnU-Net v2 model folder, without nnU-Net and without running pickles, and refusing what autoseg
cannot run.

A model folder is ``nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIG`` (``plans.json``, ``dataset.json``,
``fold_<k>/checkpoint_final.pth``). Each checkpoint is loaded with ``torch.load(weights_only=True)``; the numpy
scalars nnU-Net stores in its training log are the only non-tensor objects allowed (nothing else is ever
unpickled; ``postprocessing.pkl`` is never read). Cascade stages, other architectures, image readers that
reorient, other preprocessors or resampling functions, dropout, norms other than affine instance norm and
nonlinearities other than LeakyReLU(0.01) are refused in one line naming what was found.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from autoseg.errors import ModelImportError
from autoseg.io.model_folder import sha256

CHECKPOINT = "checkpoint_final.pth"
ARCHITECTURES = {"PlainConvUNet": "plain", "ResidualEncoderUNet": "residual"}
RESAMPLING_FN = "resample_data_or_seg_to_shape"


def _safe_globals() -> list[Any]:
    """The numpy objects nnU-Net's training log pickles (scalars, their dtypes), and nothing else."""
    scalar = np._core.multiarray.scalar
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Float32DType,
            np.dtypes.Float64DType]


def load_nnunet_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, loaded with ``weights_only=True`` (a file that needs code to load is refused).

    Raises:
        ModelImportError: missing, corrupt, or holding objects other than tensors, containers and numpy scalars.
    """
    if not path.is_file():
        raise ModelImportError(f"{path}: not found; the model folder needs fold_<k>/{CHECKPOINT}.")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for corrupt or unsafe files
        first = str(err).strip().splitlines()
        unsafe = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if
                      first else type(err).__name__)
        raise ModelImportError(f"{path}: refused, it cannot be loaded safely ({unsafe}); nothing in it was run. "
                               "Only checkpoints holding tensors, plain containers and numpy scalars are "
                               "imported.") from err
    if not isinstance(state, dict) or not isinstance(state.get("network_weights"), dict):
        raise ModelImportError(f"{path}: not an nnU-Net v2 checkpoint (no 'network_weights').")
    return state


@dataclass(frozen=True)
class NNUNetModel:
    """The readable facts of one nnU-Net model folder."""

    folder: Path
    plans: dict[str, Any]
    dataset: dict[str, Any]
    configuration: str
    trainer: str
    folds: tuple[str, ...]


def read_model_folder(folder: str | os.PathLike[str], folds: Sequence[int | str] | None = None) -> NNUNetModel:
    """Read ``plans.json``, ``dataset.json`` and find the folds of ``TRAINER__PLANS__CONFIG``.

    Raises:
        ModelImportError: files missing or malformed, a requested fold not trained, a cascade stage.
    """
    folder = Path(folder)
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelImportError(f"{folder}: not an nnU-Net v2 model folder; give nnUNet_results/DatasetXXX_Name/"
                               "TRAINER__PLANS__CONFIGURATION.")
    plans, dataset = (_read_json(folder / name) for name in ("plans.json", "dataset.json"))
    found = sorted(p.parent.name[len("fold_"):] for p in folder.glob(f"fold_*/{CHECKPOINT}"))
    wanted = [str(f) for f in folds] if folds else found
    missing = [f for f in wanted if f not in found]
    if not wanted or missing:
        raise ModelImportError(f"{folder}: no fold_{'/'.join(missing) or '<k>'}/{CHECKPOINT}; trained folds: "
                               f"{', '.join(found) or 'none'}.")
    configuration = parts[2]
    if configuration not in plans.get("configurations", {}):
        raise ModelImportError(f"{folder / 'plans.json'}: has no configuration {configuration!r}.")
    return NNUNetModel(folder, plans, dataset, configuration, parts[0], tuple(wanted))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ModelImportError(f"{path}: cannot be read as JSON ({err}); the nnU-Net model folder is "
                               "incomplete.") from err
    if not isinstance(data, dict):
        raise ModelImportError(f"{path}: not a JSON object.")
    return data


def configuration_entry(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration of nnU-Net's plans with its ``inherits_from`` chain resolved."""
    configs, seen = plans["configurations"], []
    entry = dict(configs[name])
    while "inherits_from" in entry:
        parent = entry.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise ModelImportError(f"plans.json: configuration {name!r} inherits from {parent!r}, which is missing "
                                   "or circular.")
        seen.append(parent)
        entry = {**configs[parent], **entry}
    return entry


def check_supported(model: NNUNetModel, entry: dict[str, Any]) -> str:
    """The block type of a supported model; otherwise a one-line refusal naming what was found.

    Raises:
        ModelImportError: a cascade stage, another architecture, reader, preprocessor or resampling function.
    """
    where = model.folder / "plans.json"
    if entry.get("previous_stage"):
        raise ModelImportError(f"{where}: {model.configuration!r} is the second stage of a cascade (previous stage "
                               f"{entry['previous_stage']!r}); cascades are not imported yet, import 3d_fullres.")
    arch = entry.get("architecture", {})
    cls = str(arch.get("network_class_name", "")).rsplit(".", 1)[-1]
    if cls not in ARCHITECTURES:
        raise ModelImportError(f"{where}: architecture {cls or '(none)'!r} is not supported; only "
                               f"{', '.join(ARCHITECTURES)} are imported.")
    reader = model.plans.get("image_reader_writer", "SimpleITKIO")
    if "Reorient" in str(reader):
        raise ModelImportError(f"{where}: image reader {reader!r} reorients images; only readers that keep the "
                               "file's orientation (SimpleITKIO, NibabelIO, ...) are supported.")
    if entry.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise ModelImportError(f"{where}: preprocessor {entry['preprocessor_name']!r} is not supported.")
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        if entry.get(key, RESAMPLING_FN) != RESAMPLING_FN:
            raise ModelImportError(f"{where}: {key} {entry[key]!r} is not supported (only {RESAMPLING_FN}).")
    return ARCHITECTURES[cls]


def check_layers(arch_kwargs: dict[str, Any], source: Path) -> None:
    """Refuse dropout, norms other than affine instance norm, nonlinearities other than LeakyReLU(0.01)."""
    norm, nonlin = str(arch_kwargs.get("norm_op", "")), str(arch_kwargs.get("nonlin", ""))
    problems = []
    if arch_kwargs.get("dropout_op"):
        problems.append(f"dropout {arch_kwargs['dropout_op']}")
    if "InstanceNorm" not in norm or not (arch_kwargs.get("norm_op_kwargs") or {}).get("affine", False):
        problems.append(f"norm {norm or '(none)'}")
    slope = (arch_kwargs.get("nonlin_kwargs") or {}).get("negative_slope", 0.01)
    if not nonlin.endswith("LeakyReLU") or slope != 0.01:
        problems.append(f"nonlinearity {nonlin or '(none)'} (slope {slope})")
    if not arch_kwargs.get("conv_bias", False):
        problems.append("convolutions without bias")
    if problems:
        raise ModelImportError(f"{source}: {', '.join(problems)} not supported; only instance norm, LeakyReLU(0.01), "
                               "biased convolutions and no dropout are imported.")


def provenance(model: NNUNetModel) -> dict[str, Any]:
    """The source: trainer, plans, configuration, every file used with its SHA-256, the dataset's licence text."""
    files = ["plans.json", "dataset.json", *[f"fold_{f}/{CHECKPOINT}" for f in model.folds]]
    if (model.folder / "dataset_fingerprint.json").is_file():
        files.append("dataset_fingerprint.json")
    out = {"framework": "nnU-Net v2", "model_folder": f"{model.folder.parent.name}/{model.folder.name}",
           "trainer": model.trainer, "plans": model.plans.get("plans_name"), "configuration": model.configuration,
           "folds": list(model.folds), "files": {name: sha256(model.folder / name) for name in files}}
    for key in ("licence", "license", "reference", "citation", "release"):
        if key in model.dataset:
            out[key] = model.dataset[key]
    for name in ("LICENSE", "LICENSE.txt", "LICENCE", "license.txt"):
        for base in (model.folder, model.folder.parent):
            if (base / name).is_file():
                out["licence_text"] = (base / name).read_text(errors="replace")
    return out
