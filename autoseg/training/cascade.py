"""Inputs of a cascade's second stage: the first stage's cross-validation predictions, brought onto the
full-resolution preprocessed grid of each case (transpose, crop, label-safe resampling), stored as
``<workdir>/preprocessed/<config>_prev/<case>_prev.npy``. Training turns them into one-hot input channels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from autoseg.errors import CascadeInputError
from autoseg.io.atomic import atomic_path
from autoseg.io.dataset import Dataset
from autoseg.io.image import read_label
from autoseg.io.model_folder import configuration_folder
from autoseg.planner.plans import Plans
from autoseg.preprocessing.cascade import previous_stage_to_grid
from autoseg.preprocessing.properties import CaseProperties


def cascade_input_folder(workdir: str | os.PathLike[str], config_name: str) -> Path:
    """Where the previous stage's predictions are stored on this configuration's grid."""
    return Path(workdir) / "preprocessed" / f"{config_name}_prev"


def prepare_cascade_inputs(dataset: Dataset, plans: Plans, config_name: str, workdir: str | os.PathLike[str], *,
                           progress: bool = True) -> Path:
    """Bring every case's previous-stage CV prediction onto this configuration's grid (skips up-to-date ones).

    Raises:
        CascadeInputError: some cases have no prediction from the previous stage (the message lists them and
            gives the command that produces them).
    """
    workdir = Path(workdir)
    config = plans.configuration(config_name)
    prev = config.previous_stage
    ending = dataset.spec.file_ending
    preds: dict[str, Path] = {}
    for val_dir in sorted(configuration_folder(workdir, str(prev)).glob("fold_*/val")):
        if val_dir.parent.name == "fold_all":
            continue  # a model trained on every case has no held-out predictions
        for p in val_dir.glob(f"*{ending}"):
            preds.setdefault(p.name[: -len(ending)], p)
    missing = [c.case_id for c in dataset.cases if c.case_id not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CascadeInputError(
            f"{config_name} takes the {prev} cross-validation predictions as input, but {len(missing)} case(s) have "
            f"none ({shown}) in {workdir / 'models' / str(prev)}/fold_*/val. Train every {prev} fold first: "
            f"`autoseg train {dataset.root} {prev} cv --workdir {workdir}`.")
    out = cascade_input_folder(workdir, config_name)
    out.mkdir(parents=True, exist_ok=True)
    data_folder = workdir / "preprocessed" / config.data_identifier
    for case in dataset.cases:
        target = out / f"{case.case_id}_prev.npy"
        src = preds[case.case_id]
        if target.is_file() and target.stat().st_mtime_ns >= src.stat().st_mtime_ns:
            continue
        props = CaseProperties.load(data_folder / f"{case.case_id}.json")
        grid = previous_stage_to_grid(read_label(src).array, props, plans, config.resampling.order_seg,
                                      config.resampling.order_z)
        with atomic_path(target) as tmp, open(tmp, "wb") as fh:
            np.save(fh, grid)
    return out
