"""Work folders: one per dataset, chosen by the user; nothing else is global.

``workdir_for(dataset)`` is ``--workdir`` when given, else ``$AUTOSEG_HOME/<dataset name>`` when that optional
variable is set, else ``./autoseg_work/<dataset name>``.
"""

from __future__ import annotations

import os
from pathlib import Path

from autoseg.io.dataset import Dataset, load_dataset

DatasetLike = Dataset | str | os.PathLike[str]


def as_dataset(dataset: DatasetLike) -> Dataset:
    """A loaded dataset as is; a folder loaded (see :func:`autoseg.io.dataset.load_dataset`)."""
    return dataset if isinstance(dataset, Dataset) else load_dataset(dataset)


def workdir_for(dataset: DatasetLike, workdir: str | os.PathLike[str] | None = None) -> Path:
    """The work folder of a dataset: ``workdir`` if given, else ``$AUTOSEG_HOME/<name>`` when that
    variable is set, else ``./autoseg_work/<name>``. The folder is created."""
    if workdir is None:
        ds = as_dataset(dataset)
        home = os.environ.get("AUTOSEG_HOME")
        workdir = Path(home) / ds.name if home else Path("autoseg_work") / ds.name
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    return path
