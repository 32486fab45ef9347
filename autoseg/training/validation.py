"""Full-volume validation of a trained fold: sliding-window prediction of each held-out case (with
mirroring), export in the original geometry, Dice per class/region against the reference.

Each case's quality scores (:mod:`autoseg.inference.uncertainty`) are saved in ``quality.json`` next to the
predictions, so ``find-best`` can check them against the real errors and learn the flag threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.evaluation.dice import dice_scores
from autoseg.inference.export import LabelLayout, export_segmentation, probabilities_path, save_probabilities_npz
from autoseg.inference.sliding_window import inference_network
from autoseg.inference.uncertainty import QUALITY_SCORES, combined_score, predict_members, probability_scores
from autoseg.io.atomic import write_json_atomic
from autoseg.io.dataset import Dataset
from autoseg.io.image import read_label, write_label
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.plugins.channels import with_case_channels
from autoseg.preprocessing.cascade import one_hot
from autoseg.preprocessing.properties import CaseProperties

#: per-case quality scores of the validation cases, next to summary.json
QUALITY = "quality.json"


def class_names(plans: Plans, layout: LabelLayout) -> list[str]:
    """Name of each evaluated class: foreground labels, or the regions."""
    entries = [(k, v) for k, v in plans.labels.items() if k != "ignore"]
    if layout.regions is not None:
        return [k for k, v in entries if tuple(v if isinstance(v, (list, tuple)) else [v]) != (0,)]
    by_value = {int(v): k for k, v in entries if not isinstance(v, (list, tuple))}
    return [by_value.get(i, f"label_{i}") for i in range(1, layout.num_outputs)]


def eval_classes(layout: LabelLayout) -> list[Any]:
    """What :func:`dice_scores` compares: foreground label values, or region tuples."""
    return list(layout.regions) if layout.regions is not None else list(range(1, layout.num_outputs))


def validate_fold(network: torch.nn.Module, dataset: Dataset, plans: Plans, config: ConfigurationPlan,
                  layout: LabelLayout, case_ids: Sequence[str], workdir: Path, out_dir: Path, *,
                  mirror_axes: Sequence[int], device: torch.device, amp: bool, step_size: float = 0.5,
                  save_probabilities: bool = False, prev_folder: Path | None = None,
                  prev_labels: Sequence[int] = (), extra_folders: Sequence[Path] = (), progress: bool = True
                  ) -> dict[str, Any]:
    """Predict every held-out case, write it to ``out_dir`` and return (and save) the Dice summary.

    The network's inputs are the preprocessed images, the channel plugins' stored channels (``extra_folders``)
    and the cascade's one-hot channels, in that order (as in training and prediction)."""
    folder = Path(workdir) / "preprocessed" / config.data_identifier
    refs = {c.case_id: c for c in dataset.cases}
    names = class_names(plans, layout)
    classes = eval_classes(layout)
    ending = dataset.spec.file_ending
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_flag = getattr(network, "deep_supervision", False)
    run = inference_network(network, in_channels=network.in_channels, patch_size=config.patch_size, device=device,
                            amp=amp)  # the same graph `autoseg predict` uses, so both give the same labels
    per_case: dict[str, dict[str, float | None]] = {}
    quality: dict[str, dict[str, float | None]] = {}
    try:
        for cid in tqdm(case_ids, desc="validation", leave=False, disable=not progress):
            data = with_case_channels(np.load(folder / f"{cid}.npy"), cid, extra_folders)
            if prev_folder is not None:
                data = np.concatenate([data, one_hot(np.load(prev_folder / f"{cid}_prev.npy"), prev_labels)])
            props = CaseProperties.load(folder / f"{cid}.json")
            outs = predict_members([run], data, patch_size=config.patch_size, layout=layout,
                                   mirror_axes=mirror_axes, step_size=step_size, device=device, amp=amp)
            tta = outs.tta_agreement
            seg, probs = export_segmentation(outs.logits, props, plans, config, layout, return_probabilities=True)
            del outs
            target = out_dir / f"{cid}{ending}"
            if save_probabilities:
                save_probabilities_npz(probabilities_path(target), probs, layout)
            write_label(target, seg, props.geometry)
            quality[cid] = {"tta_agreement": tta, **probability_scores(probs, layout)}
            quality[cid]["combined"] = combined_score(quality[cid])
            del probs
            case = refs.get(cid)
            if case is not None and case.label is not None:
                ref = read_label(case.label).array
                scores = dice_scores(seg, ref, classes, ignore_label=dataset.spec.ignore_label)
                per_case[cid] = {n: (None if math.isnan(s) else s) for n, s in zip(names, scores, strict=True)}
    finally:
        network.deep_supervision = ds_flag
    mean = {}
    for n in names:
        vals = [c[n] for c in per_case.values() if c[n] is not None]
        mean[n] = float(np.mean(vals)) if vals else None
    fg = [v for v in mean.values() if v is not None]
    summary = {"configuration": config.name, "metric": "dice", "classes": names, "mean": mean,
               "mean_foreground_dice": float(np.mean(fg)) if fg else None, "cases": per_case}
    write_json_atomic(out_dir / "summary.json", summary)
    write_json_atomic(out_dir / QUALITY, {"scores": list(QUALITY_SCORES), "cases": quality})
    return summary
