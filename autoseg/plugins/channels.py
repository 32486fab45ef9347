"""Channel plugins in the pipeline: fitted after preprocessing, appended for training, shipped with the models.

Where the files are::

    <workdir>/preprocessed/<data_identifier>/plugins/<name>/state.npz     fitted state (arrays; no pickle)
                                                          /<case>.npy     the case's extra channels (float32)
                                                          /fit.json       what it was fitted on (written last)
    <workdir>/models/<config>/plugins/<name>.npz                          copy made when a fold is trained
    <bundle>/models/<config>/plugins/<name>.npz                           copied and hashed by ``export``

The state is refitted (and every case's channels recomputed) when the plugin's parameters or any training case's
preprocessed data change (the fit signature covers the plugin choice and every case's plan hash). Channels
follow the image channels in the plans' order; a cascade's one-hot channels come after them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.io.atomic import atomic_path, read_json, remove_stale_temporaries, write_json_atomic
from autoseg.io.dataset import Dataset
from autoseg.io.model_folder import configuration_folder
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.plugins.base import CHANNEL, ChannelPlugin, PluginError
from autoseg.plugins.planning import chosen_plugins
from autoseg.preprocessing.preprocess import case_paths
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.storage import load_case_array

#: subfolder (of a preprocessed folder and of a model folder) holding plugin files
PLUGINS_DIR = "plugins"
STATE = "state.npz"
FIT = "fit.json"
_META = "__autoseg_plugin__"  # key of the JSON record inside a state file
_VERSION = 1


def channel_folder(workdir: str | os.PathLike[str], config: ConfigurationPlan, name: str) -> Path:
    """``<workdir>/preprocessed/<data_identifier>/plugins/<name>``."""
    return Path(workdir) / "preprocessed" / config.data_identifier / PLUGINS_DIR / name


def n_extra_channels(plans: Plans) -> int:
    """Input channels the plans' channel plugins add."""
    return sum(int(p.n_channels) for _, _, p in chosen_plugins(plans, CHANNEL))


def save_state(path: Path, state: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write a plugin state atomically as ``.npz`` (``meta`` is stored as a JSON string array)."""
    arrays = {k: np.asarray(v) for k, v in state.items()}
    if any(a.dtype == object for a in arrays.values()) or _META in arrays:
        raise PluginError(f"{path}: a plugin state holds only numeric or string arrays (no objects, no key {_META}).")
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, **{_META: np.array(json.dumps(meta, sort_keys=True))})


def load_state(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A state written by :func:`save_state` (loaded without pickle): arrays and meta.

    Raises:
        PluginError: missing, unreadable or not a plugin state.
    """
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(str(arrays.pop(_META)))
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise PluginError(f"{path}: not a readable plugin state ({type(err).__name__}: {err}); preprocess again "
                          "(`autoseg preprocess`) and retrain, or copy an intact file.") from err
    return arrays, meta


def _signature(spec: dict[str, Any], config: ConfigurationPlan, folder: Path, case_ids: Sequence[str]) -> str:
    hashes = []
    for cid in sorted(case_ids):
        try:
            hashes.append((cid, CaseProperties.load(case_paths(folder, cid)["props"]).plan_hash))
        except Exception as err:  # noqa: BLE001 - a case that is not preprocessed cannot be fitted on
            raise PluginError(f"{folder}: case {cid} is not preprocessed; run `autoseg preprocess` first.") from err
    blob = json.dumps([spec, config.ndim, hashes, _VERSION], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _up_to_date(folder: Path, signature: str, case_ids: Sequence[str]) -> bool:
    try:
        fit = read_json(folder / FIT, PluginError, "")
    except PluginError:
        return False
    return isinstance(fit, dict) and fit.get("signature") == signature and (folder / STATE).is_file() and all(
        (folder / f"{cid}.npy").is_file() for cid in case_ids)


def prepare_channels(dataset: Dataset, plans: Plans, config_name: str, workdir: str | os.PathLike[str], *,
                     progress: bool = True) -> list[Path]:
    """Fit each channel plugin on the preprocessed training cases and store every case's channels (idempotent).

    Runs after :func:`~autoseg.preprocessing.preprocess.preprocess_dataset`; does nothing without channel plugins.

    Returns:
        The channel folders, in the plans' order.

    Raises:
        PluginError: a plugin is not installed, a case is not preprocessed, or the fit fails.
    """
    from tqdm import tqdm

    config = plans.configuration(config_name)
    data_folder = Path(workdir) / "preprocessed" / config.data_identifier
    case_ids = sorted(c.case_id for c in dataset.cases)
    folders = []
    for spec, info, plugin in chosen_plugins(plans, CHANNEL):
        assert isinstance(plugin, ChannelPlugin)
        folder = channel_folder(workdir, config, info.name)
        folders.append(folder)
        signature = _signature(spec, config, data_folder, case_ids)
        if _up_to_date(folder, signature, case_ids):
            continue
        (folder / FIT).unlink(missing_ok=True)  # the marker goes first: a crash below means "not fitted"
        remove_stale_temporaries(folder / STATE, *(folder / f"{cid}.npy" for cid in case_ids))  # a killed run's
        cases = [load_case_array(case_paths(data_folder, cid)["data"]) for cid in case_ids]
        state = plugin.fit(cases, config.ndim)
        save_state(folder / STATE, state, {"plugin": info.name, "params": spec["params"], "signature": signature,
                                           "configuration": config.data_identifier, "ndim": config.ndim})
        done = set()
        for i, extra in tqdm(plugin.training_channels(state, cases, config.ndim), total=len(cases),
                             desc=f"{info.name} {config.data_identifier}", leave=False, disable=not progress):
            extra = _checked(extra, plugin, cases[i], info.name)
            with atomic_path(folder / f"{case_ids[i]}.npy") as tmp, open(tmp, "wb") as fh:
                np.save(fh, extra)
            done.add(int(i))
        if len(done) != len(case_ids):
            raise PluginError(f"plugin {info.name!r} gave the channels of {len(done)} of {len(case_ids)} training "
                              "cases; its training_channels must yield every case once. Fix the plugin.")
        write_json_atomic(folder / FIT, {"signature": signature, "plugin": info.name, "params": spec["params"],
                                         "cases": case_ids})
    return folders


def _checked(extra: np.ndarray, plugin: ChannelPlugin, data: np.ndarray, name: str) -> np.ndarray:
    extra = np.asarray(extra, dtype=np.float32)
    if extra.shape != (plugin.n_channels, *data.shape[1:]):
        raise PluginError(f"plugin {name!r} returned channels of shape {extra.shape}; expected "
                          f"{(plugin.n_channels, *data.shape[1:])}. Fix the plugin.")
    return extra


@dataclass(frozen=True)
class TrainingChannels:
    """The extra channels of a training run: per-case folders and the number of channels they add."""

    folders: tuple[Path, ...] = ()
    n_channels: int = 0


def training_channels(dataset: Dataset, plans: Plans, config_name: str, workdir: str | os.PathLike[str], *,
                      install: bool = True) -> TrainingChannels:
    """Check the fitted channels are current and (``install``) copy their states to ``models/<config>/plugins/``.

    Raises:
        PluginError: the channels are missing or stale (run ``autoseg preprocess``; ``autoseg train`` does).
    """
    config = plans.configuration(config_name)
    chosen = chosen_plugins(plans, CHANNEL)
    if not chosen:
        return TrainingChannels()
    data_folder = Path(workdir) / "preprocessed" / config.data_identifier
    case_ids = sorted(c.case_id for c in dataset.cases)
    folders = []
    for spec, info, _ in chosen:
        folder = channel_folder(workdir, config, info.name)
        if not _up_to_date(folder, _signature(spec, config, data_folder, case_ids), case_ids):
            raise PluginError(f"{folder}: the {info.name} channels are missing or older than the preprocessed data; "
                              f"run `autoseg preprocess {dataset.root} {config_name} --workdir {workdir}`.")
        folders.append(folder)
        if install:
            target = configuration_folder(Path(workdir), config_name) / PLUGINS_DIR / f"{info.name}.npz"
            with atomic_path(target) as tmp:
                shutil.copyfile(folder / STATE, tmp)
    return TrainingChannels(tuple(folders), sum(int(p.n_channels) for _, _, p in chosen))


def with_case_channels(data: np.ndarray, case_id: str, folders: Sequence[Path]) -> np.ndarray:
    """``data`` with the case's stored extra channels appended (read into memory)."""
    if not folders:
        return data
    return np.concatenate([data, *(np.load(f / f"{case_id}.npy") for f in folders)])


class ChannelStack:
    """Several ``(C_i, *spatial)`` arrays (memory-mapped) seen as one ``(sum C_i, *spatial)`` array.

    Indexing with a full first axis (``stack[:, z]``, ``stack[:, a:b, c:d]``) reads only the indexed part of each.
    """

    def __init__(self, parts: Sequence[np.ndarray]) -> None:
        self.parts = tuple(parts)
        spatial = {tuple(p.shape[1:]) for p in self.parts}
        if len(spatial) != 1:
            raise PluginError(f"extra channels of shapes {[p.shape for p in self.parts]} do not fit the case's grid; "
                              "preprocess again (`autoseg preprocess`).")
        self.shape = (sum(int(p.shape[0]) for p in self.parts), *spatial.pop())
        self.ndim = len(self.shape)
        self.dtype = np.result_type(*(p.dtype for p in self.parts))

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if not key or key[0] != slice(None):
            raise IndexError("ChannelStack is indexed with ':' on the channel axis first (stack[:, ...]).")
        return np.concatenate([np.asarray(p[key]) for p in self.parts]).astype(self.dtype, copy=False)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


@dataclass(frozen=True)
class ChannelAppender:
    """Computes a new case's extra channels from the states shipped with a model (what prediction uses)."""

    plugins: tuple[tuple[ChannelPlugin, dict[str, np.ndarray]], ...]
    ndim: int

    @classmethod
    def load(cls, plans: Plans, config: ConfigurationPlan, model_dir: str | os.PathLike[str]) -> ChannelAppender | None:
        """The appender of a model folder (``models/<config>``), or None when the plans add no channel.

        Raises:
            PluginError: a state file is missing, unreadable, or was fitted with other parameters.
        """
        chosen = chosen_plugins(plans, CHANNEL)
        if not chosen:
            return None
        loaded = []
        for spec, info, plugin in chosen:
            path = Path(model_dir) / PLUGINS_DIR / f"{info.name}.npz"
            if not path.is_file():
                raise PluginError(f"{path}: missing. The plans ({Path(model_dir) / 'plans.json'}) add the {info.name} "
                                  "channel, whose fitted state is saved there when a fold is trained; train the "
                                  "configuration again (or export the bundle again).")
            state, meta = load_state(path)
            if meta.get("plugin") != info.name or meta.get("params") != spec["params"]:
                raise PluginError(f"{path}: fitted for {meta.get('plugin')!r} with {meta.get('params')}, but the plans "
                                  f"choose {info.name!r} with {spec['params']}; train the configuration again.")
            assert isinstance(plugin, ChannelPlugin)
            loaded.append((plugin, state))
        return cls(tuple(loaded), config.ndim)

    def append(self, data: np.ndarray) -> np.ndarray:
        """``data`` (preprocessed ``(C, *spatial)``) with every plugin's channels appended."""
        extra = [_checked(p.compute(s, data, self.ndim), p, data, type(p).__name__) for p, s in self.plugins]
        return np.concatenate([data, *extra])
