"""Load what ``predict`` runs from a work folder or bundle: the chosen configurations, folds and postprocessing.

With no configuration named, the choice of ``find-best`` (``selection/best.json``) is used with its
postprocessing; without one, the only trained configuration. Naming configurations (``-c``) gives exactly those,
and postprocessing only when asked for (a rules file, or ``True`` for the learnt one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from autoseg.ensemble.postprocessing import PostprocessingRules
from autoseg.ensemble.selection import POSTPROCESSING, QUALITY_RULE, SELECTION, load_best
from autoseg.inference.ensemble import ModelEnsemble, parse_label_map
from autoseg.inference.predictor import ModelNotFoundError, Predictor, trained_configurations
from autoseg.inference.quality import QualityRule

PostprocessingChoice = bool | str | os.PathLike[str] | PostprocessingRules | None


def _rules(choice: PostprocessingChoice, wd: Path, default: Path | None) -> PostprocessingRules | None:
    if choice is None or choice is True:
        path = default if choice is None else (default or wd / SELECTION / POSTPROCESSING)
        if path is None:
            return None
        if not path.is_file():
            if choice is True:
                raise ModelNotFoundError(f"{path}: no learnt postprocessing; run `autoseg find-best --workdir {wd}` "
                                         "first, or pass a rules file.")
            return None
        return PostprocessingRules.load(path)
    if choice is False or (isinstance(choice, str) and choice.lower() == "none"):
        return None
    if isinstance(choice, PostprocessingRules):
        return choice
    return PostprocessingRules.load(Path(choice))


def load_ensemble(workdir: str | os.PathLike[str], *, configurations: str | Sequence[str] | None = None,
                  folds: Sequence[int | str] | None = None, postprocessing: PostprocessingChoice = None,
                  label_map: Mapping[int, int] | str | Sequence[str] | None = None, device: str = "auto",
                  tta: bool = True, step_size: float = 0.5, amp: bool | None = None, backend: str = "torch"
                  ) -> tuple[ModelEnsemble, dict[str, Any]]:
    """The models, postprocessing and label map ``predict`` applies, and a record of the choice.

    Args:
        workdir: a work folder or an exported bundle.
        configurations: configuration name(s); several are ensembled (probabilities averaged). Default: the
            ``find-best`` choice, else the only trained configuration.
        folds: folds per configuration (default: the chosen ones, else every trained fold).
        postprocessing: None = the learnt rules when following ``find-best``'s choice; True = the learnt rules;
            False or ``"none"`` = none; a path = that rules file.
        label_map: relabel outputs ``{old: new}`` (default: the one stored in a bundle, if any).
        device, tta, step_size, amp, backend: see :meth:`Predictor.from_workdir`.

    Raises:
        ModelNotFoundError: nothing trained, or several configurations and no ``find-best`` choice.
    """
    wd = Path(workdir)
    best = load_best(wd) if configurations is None else None
    default_rules = None
    if best is not None:
        names = [str(m["configuration"]) for m in best["members"]]
        member_folds = {str(m["configuration"]): [str(f) for f in m.get("folds", [])] or None for m in best["members"]}
        if best.get("postprocessing"):
            default_rules = wd / SELECTION / str(best["postprocessing"])
        if label_map is None:
            label_map = best.get("label_map")
    else:
        if configurations is None:
            trained = trained_configurations(wd)
            if len(trained) != 1:
                raise ModelNotFoundError(
                    f"{wd}: " + (f"several configurations are trained ({', '.join(trained)}); choose with -c, or run "
                                 f"`autoseg find-best --workdir {wd}` to pick the best one (or ensemble) on "
                                 "cross-validation." if trained else
                                 "no trained model found (models/<configuration>/fold_*/checkpoint_final.pt). Train "
                                 "one with `autoseg train`, or pass the right --workdir."))
            names = trained
        else:
            names = [configurations] if isinstance(configurations, str) else list(configurations)
        member_folds = {n: None for n in names}
    members = [Predictor.from_workdir(wd, n, folds=folds if folds is not None else member_folds[n], device=device,
                                      tta=tta, step_size=step_size, amp=amp, backend=backend) for n in names]
    rules = _rules(postprocessing, wd, default_rules)
    mapping = parse_label_map(label_map)
    ensemble = ModelEnsemble(members, postprocess=rules.apply if rules is not None and not rules.is_empty else None,
                             label_map=mapping)
    record = {"configurations": names, "folds": {m.config.name: list(m.folds) for m in members},
              "selection": best.get("name") if best is not None else None,
              "postprocessing": rules.describe() if rules is not None else None,
              "label_map": {str(k): v for k, v in mapping.items()} if mapping else None}
    return ensemble, record


def load_quality_rule(workdir: str | os.PathLike[str], names: Sequence[str]) -> QualityRule | None:
    """The quality threshold ``find-best`` learnt (``selection/quality.json``), if it was learnt for the pipeline
    made of the configurations ``names``; None otherwise (cases are then flagged for input drift only)."""
    path = Path(workdir) / SELECTION / QUALITY_RULE
    if not path.is_file():
        return None
    rule = QualityRule.load(path)
    learnt = rule.candidate.removeprefix("ensemble__").removesuffix("__postprocessed").split("__")
    return rule if sorted(learnt) == sorted(names) else None
