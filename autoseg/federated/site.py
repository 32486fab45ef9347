"""One site (hospital) of a federation: it plans nothing and shares no image. It answers the coordinator with
aggregate statistics (:mod:`autoseg.fingerprint.merge`), trains the global weights for a few local epochs with
autoseg's own trainer (:func:`autoseg.training.run.train_fold`) and returns weights and its training-case count, and
validates the global model on its own held-out cases, returning the mean Dice only.

Each round starts from the global weights: they replace the network in the site's own checkpoint (optimiser state
and position kept), which is then resumed for the round's epochs; a site's first round starts from them through the
trainer's ``init_from``. When the coordinator shares momentum, the global SGD momentum buffers replace the
optimiser's too, and the site returns its buffers with its weights (a site's first round starts from a fresh
optimiser, which equals the zero global momentum of round 1; a site that joins later starts that round fresh). Everything the site writes (preprocessed cases, checkpoints, validation predictions) stays
in its work folder.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.fingerprint.merge import site_statistics
from autoseg.io.atomic import write_text_atomic
from autoseg.io.dataset import Dataset, record_dataset_source
from autoseg.io.model_folder import fold_folder
from autoseg.networks.checkpoint import FINAL, LATEST, load_checkpoint, save_checkpoint
from autoseg.planner.plans import Plans
from autoseg.preprocessing.preprocess import preprocess_dataset
from autoseg.training.settings import TrainSettings

#: what a site adds to dataset.json's description for the coordinator (no names of files, no case ids)
DESCRIPTION_KEYS = ("channel_names", "labels", "file_ending", "regions_class_order")


@dataclass
class Site:
    """A site's local work: statistics, a round of training, a validation. Holds no Flower object.

    Args:
        dataset: the site's dataset (never leaves it).
        workdir: the site's work folder.
        fold: the site's cross-validation fold (its held-out cases validate the global model), or ``"all"``.
        settings: training settings (device, workers, ...); epochs and iterations come from the coordinator.
        jobs: worker processes for the statistics and preprocessing.
    """

    dataset: Dataset
    workdir: Path
    fold: int | str = 0
    settings: TrainSettings = TrainSettings(progress=False)
    jobs: int = 1

    def describe(self, *, statistics: bool = True) -> dict[str, Any]:
        """dataset.json's channels, labels and file ending, and (``statistics``) the aggregate statistics (JSON-safe)."""
        raw = self.dataset.spec.raw
        out: dict[str, Any] = {"dataset": {k: raw[k] for k in DESCRIPTION_KEYS if k in raw}}
        if statistics:
            out["statistics"] = site_statistics(self.dataset, jobs=self.jobs, progress=self.settings.progress).to_json()
        return out

    def _prepare(self, plans: Plans, configuration: str) -> None:
        """Save the coordinator's plans and preprocess the site's cases (idempotent)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "plans.json"
        if not path.is_file() or Plans.load(path).to_json() != plans.to_json():
            plans.save(path)
        write_text_atomic(self.workdir / "dataset.json",
                          (self.dataset.root / "dataset.json").read_text(encoding="utf-8"))
        record_dataset_source(self.workdir, self.dataset.root)  # for find-best at the site; it stays here
        preprocess_dataset(self.dataset, plans, configuration, self.workdir, jobs=self.jobs,
                           progress=self.settings.progress)
        if str(self.fold) != "all":
            from autoseg.training.splits import get_splits

            get_splits(self.workdir, [c.case_id for c in self.dataset.cases], seed=plans.seed)

    def _start_from(self, configuration: str, state: dict[str, Any], epoch: int,
                    momentum: list[np.ndarray] | None = None) -> bool:
        """Put the global weights (and ``momentum`` buffers) into the site's furthest checkpoint at ``epoch`` (False:
        none exists yet)."""
        folder = fold_folder(self.workdir, configuration, self.fold)
        found = [load_checkpoint(folder / n) for n in (FINAL, LATEST) if (folder / n).is_file()]
        if not found:
            return False
        ckpt = max(found, key=lambda s: int(s["epoch"]))
        for key in ("iteration", "train_losses"):
            ckpt.pop(key, None)
        if momentum is not None:
            ckpt["optimizer"] = _with_momentum(ckpt["optimizer"], momentum)
        save_checkpoint(folder / LATEST, {**ckpt, "network": state, "epoch": epoch})
        (folder / FINAL).unlink(missing_ok=True)
        return True

    def train_round(self, plans: Plans, configuration: str, state: dict[str, Any], *, round_: int, epochs: int,
                    iters_per_epoch: int | None, proximal_mu: float = 0.0, learning_rate: float | None = None,
                    momentum: list[np.ndarray] | None = None, sgd_momentum: float | None = None
                    ) -> tuple[dict[str, Any], list[np.ndarray] | None, int, float | None]:
        """``epochs`` local epochs from the global ``state`` and (shared) global ``momentum`` buffers (with FedProx's
        proximal term when ``proximal_mu > 0``: the ``fedprox`` optimiser, SGD with the term), at the coordinator's
        ``learning_rate`` held constant (None: the recipe's schedule over the epochs so far) and SGD momentum
        ``sgd_momentum`` (None: the site's training settings'); returns the new
        weights, the new momentum buffers (None when ``momentum`` is None), the training-case count and the last
        epoch's training loss."""
        from autoseg.training.run import train_fold

        self._prepare(plans, configuration)
        start = (round_ - 1) * epochs
        settings = dataclasses.replace(self.settings, epochs=start + epochs, iters_per_epoch=iters_per_epoch,
                                       validate=False, init_from=None)
        if sgd_momentum is not None:
            settings = dataclasses.replace(settings, momentum=sgd_momentum)
        if learning_rate is not None:
            settings = dataclasses.replace(settings, initial_lr=learning_rate,
                                           recipe=(*settings.recipe, "schedule=constant"))
        if proximal_mu > 0:
            settings = dataclasses.replace(settings, recipe=(*settings.recipe, f"optimizer=fedprox:mu={proximal_mu}"))
        if not self._start_from(configuration, state, start, momentum):
            init = self.workdir / "federated_global.pt"
            save_checkpoint(init, {"network": state})
            settings = dataclasses.replace(settings, epochs=epochs, init_from=str(init))
        result = train_fold(self.dataset, plans, configuration, self.fold, self.workdir, settings=settings,
                            resume=settings.init_from is None)
        ckpt = load_checkpoint(result.folder / FINAL)
        buffers = _momentum_of(ckpt["optimizer"], momentum) if momentum is not None else None
        return ckpt["network"], buffers, len(self._split(plans).train), _last_loss(result.folder / "log.jsonl")

    def _split(self, plans: Plans) -> Any:
        from autoseg.training.splits import Fold, fold_cases, get_splits

        ids = [c.case_id for c in self.dataset.cases]
        if str(self.fold) == "all":
            return Fold(train=tuple(ids), val=tuple(ids))
        return fold_cases(get_splits(self.workdir, ids, seed=plans.seed), self.fold)

    def validate(self, plans: Plans, configuration: str, state: dict[str, Any]) -> tuple[float, int]:
        """Mean foreground Dice of the global ``state`` on the site's held-out cases, and their count."""
        from autoseg.training.run import train_fold

        folder = fold_folder(self.workdir, configuration, self.fold)
        found = [load_checkpoint(folder / n) for n in (FINAL, LATEST) if (folder / n).is_file()]
        done = max((int(s["epoch"]) for s in found), default=0)
        if not done:  # joined after the round's training: a validation-only run needs a checkpoint to resume
            return float("nan"), 0
        self._prepare(plans, configuration)
        self._start_from(configuration, state, done)
        settings = dataclasses.replace(self.settings, epochs=done, validate=True, init_from=None)
        result = train_fold(self.dataset, plans, configuration, self.fold, self.workdir, settings=settings,
                            resume=True)
        if (folder / LATEST).is_file():  # the global model, validated: a finished fold (find-best at the site)
            (folder / LATEST).replace(folder / FINAL)
        summary = result.validation
        dice = summary.mean_foreground_dice if summary is not None else None
        return (float("nan") if dice is None else float(dice)), len(summary.cases) if summary is not None else 0


def _parameter_ids(optimizer: dict[str, Any]) -> list[Any]:
    return [i for group in optimizer["param_groups"] for i in group["params"]]


def _momentum_of(optimizer: dict[str, Any], like: list[np.ndarray]) -> list[np.ndarray]:
    """The SGD momentum buffers of an optimiser's state dict, in parameter order; a parameter that never had a
    gradient (a deep-supervision head the loss does not use) has none: zeros shaped like ``like``'s."""
    from autoseg.errors import FederationError

    state = optimizer["state"]
    ids = _parameter_ids(optimizer)
    if not any("momentum_buffer" in state.get(i, {}) for i in ids):
        raise FederationError("sharing momentum needs SGD with momentum at the sites (the recipe's optimiser has no "
                              "momentum buffers); turn it off with --no-share-momentum.")
    return [state[i]["momentum_buffer"].detach().cpu().numpy() if "momentum_buffer" in state.get(i, {})
            else np.zeros_like(ref) for i, ref in zip(ids, like, strict=True)]


def _with_momentum(optimizer: dict[str, Any], momentum: list[np.ndarray]) -> dict[str, Any]:
    """An optimiser state dict whose momentum buffers are ``momentum`` (parameter order)."""
    import torch

    ids = _parameter_ids(optimizer)
    if len(ids) != len(momentum):
        from autoseg.errors import FederationError

        raise FederationError(f"received {len(momentum)} momentum buffers for {len(ids)} parameters; every site and "
                              "the server must use the same plans and autoseg version.")
    state = {k: dict(v) for k, v in optimizer["state"].items()}
    for i, buf in zip(ids, momentum, strict=True):
        state.setdefault(i, {})["momentum_buffer"] = torch.as_tensor(np.array(buf, dtype=np.float32))
    return {**optimizer, "state": state}


def _last_loss(log: Path) -> float | None:
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    loss = json.loads(lines[-1]).get("train_loss") if lines else None
    return None if loss is None or not np.isfinite(loss) else float(loss)
