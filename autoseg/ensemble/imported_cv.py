"""Cross-validation results of an imported nnU-Net model, in the layout ``find-best`` reads.

nnU-Net v2 ends the training of fold ``k`` by predicting the fold's held-out cases into
``fold_k/validation/``: ``<case><ending>`` segmentations and, when trained with ``--npz``, ``<case>.npz``
probabilities (``probabilities``: one map per network output, in the image file's array order, like autoseg's).
:func:`import_cv_results` writes them where autoseg's own validation writes its results::

    <workdir>/models/<configuration>/fold_<k>/val/<case><ending>   (nnU-Net's segmentation, copied)
    <workdir>/models/<configuration>/fold_<k>/val/<case>.npz       (its probabilities, autoseg's self-describing npz)
    <workdir>/models/<configuration>/fold_<k>/val/quality.json     (probability-based quality scores, per case)
    <workdir>/splits.json                                          (fold k's held-out cases: its validation/ files)

``find-best --dataset DATASET`` then scores them against ``labelsTr`` with the evaluator every configuration
goes through. nnU-Net's ``summary.json`` and its ``.pkl`` files are never read. Without probabilities a
configuration is still evaluated and can be chosen, but it cannot be ensembled (see :func:`missing_probabilities`).
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.errors import FileFormatError, ModelImportError
from autoseg.inference.export import LabelLayout, probabilities_path, save_probabilities_npz
from autoseg.inference.uncertainty import QUALITY_SCORES, combined_score, probability_scores
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.model_folder import IMPORTED_FROM, configuration_folder, fold_folder
from autoseg.training.splits import SPLITS_FILE, Fold, load_splits, save_splits
from autoseg.training.validation import QUALITY

#: nnU-Net's per-fold folder of CV predictions
VALIDATION = "validation"


@dataclass(frozen=True)
class ImportedCV:
    """What :func:`import_cv_results` wrote: per fold the held-out cases, and the folds without probabilities."""

    workdir: Path
    cases: dict[str, tuple[str, ...]]
    without_probabilities: tuple[str, ...]

    def summary(self) -> str:
        """One line for the CLI: what was imported and what find-best can do with it."""
        if not self.cases:
            return "no fold_<k>/validation/ in the model folder: find-best cannot score this model."
        n = sum(len(c) for c in self.cases.values())
        text = f"CV results of fold(s) {', '.join(self.cases)} imported ({n} case(s)); next: autoseg find-best " \
               f"--workdir {self.workdir} --dataset DATASET_WITH_LABELSTR"
        if self.without_probabilities:
            text += (f"; fold(s) {', '.join(self.without_probabilities)} have no probabilities (nnU-Net trained "
                     "without --npz): find-best can score and choose this model but not ensemble it")
        return text


def import_cv_results(model_folder: str | Path, workdir: str | Path, configuration: str, folds: Sequence[str]
                      ) -> ImportedCV:
    """Copy nnU-Net's ``fold_<k>/validation/`` of ``folds`` into ``workdir``, where ``autoseg import-nnunet`` has
    imported the model (see the module docstring).

    Raises:
        ModelImportError: the work folder's ``splits.json`` puts other cases in one of these folds.
    """
    source, wd = Path(model_folder), Path(workdir)
    dataset = read_json(configuration_folder(wd, configuration) / "dataset.json", FileFormatError, "import again")
    layout = LabelLayout.from_labels(dataset["labels"], dataset.get("regions_class_order"))
    file_ending = str(dataset.get("file_ending", ".nii.gz"))
    cases: dict[str, tuple[str, ...]] = {}
    bare = []
    for f in folds:
        val = source / f"fold_{f}" / VALIDATION
        segs = sorted(val.glob(f"*{file_ending}")) if val.is_dir() else []
        if not segs:
            continue
        out = fold_folder(wd, configuration, f) / "val"
        out.mkdir(parents=True, exist_ok=True)
        quality = {}
        for seg in segs:
            cid = seg.name[: -len(file_ending)]
            shutil.copyfile(seg, out / seg.name)
            quality[cid] = _probabilities(probabilities_path(seg), probabilities_path(out / seg.name), layout)
        if any(q is None for q in quality.values()):
            bare.append(f)
        write_json_atomic(out / QUALITY, {"scores": list(QUALITY_SCORES),
                                          "cases": {c: q for c, q in quality.items() if q is not None}})
        cases[f] = tuple(sorted(quality))
    if cases:
        _merge_splits(wd / SPLITS_FILE, cases)
    return ImportedCV(wd, cases, tuple(bare))


def _probabilities(source: Path, target: Path, layout: LabelLayout) -> dict[str, float | None] | None:
    """Rewrite nnU-Net's probabilities as autoseg's npz and return the case's quality scores (None: no file)."""
    target.unlink(missing_ok=True)  # an earlier import's file must not stand for a fold without probabilities
    if not source.is_file():
        return None
    try:
        with np.load(source, allow_pickle=False) as z:
            probs = np.asarray(z["probabilities"], np.float32)
    except (OSError, KeyError, ValueError, EOFError) as err:
        raise ModelImportError(f"{source}: not readable as nnU-Net probabilities ({err}); rerun nnU-Net's "
                               "validation with --npz or delete the file.") from err
    if probs.shape[0] != layout.num_outputs:
        raise ModelImportError(f"{source}: {probs.shape[0]} probability maps, the model has {layout.num_outputs} "
                               "outputs; this validation/ folder belongs to another model.")
    save_probabilities_npz(target, probs, layout)
    scores: dict[str, float | None] = {"tta_agreement": None, **probability_scores(probs, layout)}
    scores["combined"] = combined_score(scores)
    return scores


def _merge_splits(path: Path, cases: dict[str, tuple[str, ...]]) -> None:
    """``splits.json`` with fold k's held-out cases (its training cases: the other imported folds' held-out
    cases); folds without results are empty. A fold an earlier import wrote must hold the same cases."""
    earlier = load_splits(path) if path.is_file() else []
    n = max(len(earlier), max(int(f) for f in cases) + 1)
    val = [earlier[k].val if k < len(earlier) else () for k in range(n)]
    for f, ids in cases.items():
        k = int(f)
        if val[k] and set(val[k]) != set(ids):
            raise ModelImportError(f"{path}: fold {k} holds other cases than {f'fold_{k}'}/{VALIDATION}/ of the "
                                   "model imported now (another split); import into a new --workdir.")
        val[k] = ids
    everyone = sorted({c for v in val for c in v})
    save_splits(path, [Fold(tuple(c for c in everyone if c not in v), tuple(v)) for v in val])


def missing_probabilities(workdir: str | Path, configuration: str, files: dict[str, Path]) -> list[str]:
    """Cases of an imported configuration whose CV prediction has no probabilities ([] for trained ones: autoseg
    computes those)."""
    if not (configuration_folder(workdir, configuration) / IMPORTED_FROM).is_file():
        return []
    return sorted(cid for cid, seg in files.items() if not probabilities_path(seg).is_file())
