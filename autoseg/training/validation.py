"""Full-volume validation of a trained fold: sliding-window prediction of each held-out case (with
mirroring), export in the original geometry, Dice per class/region against the reference.

Each case's quality scores (:mod:`autoseg.inference.uncertainty`) are saved in ``quality.json`` next to the
predictions, so ``find-best`` can check them against the real errors and learn the flag threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from autoseg.device import Runtime
from autoseg.errors import FileFormatError
from autoseg.evaluation.dice import dice_scores
from autoseg.inference.export import (
    LabelLayout,
    export_map,
    export_segmentation,
    probabilities_path,
    probabilities_to_labels,
    save_probabilities_npz,
)
from autoseg.inference.sliding_window import inference_network
from autoseg.inference.uncertainty import (
    QUALITY_SCORES,
    combined_score,
    error_head_scores,
    predict_members,
    probability_scores,
)
from autoseg.io.annotations import dataset_annotations
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.dataset import Dataset
from autoseg.io.image import read_label, write_label
from autoseg.networks.error_head import ErrorOutput, error_head_of
from autoseg.planner.plans import ConfigurationPlan, Plans
from autoseg.plugins.channels import with_case_channels
from autoseg.preprocessing.cascade import one_hot
from autoseg.preprocessing.preprocess import case_paths
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.storage import load_case_array
from autoseg.training.settings import TrainSettings

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


#: version of :class:`ValidationSummary` written now
SUMMARY_VERSION = 1


@dataclass(frozen=True)
class ValidationSummary:
    """A fold's final validation (``val/summary.json``): Dice per class or region, per case and on average.

    Item access (``summary["mean"]``) reads the same fields, as the dictionary this record replaces did.

    Attributes:
        configuration: the configuration validated.
        classes: the evaluated classes or regions, by name.
        mean: mean Dice per class over the cases where it is defined (None: never defined).
        mean_foreground_dice: mean of ``mean`` over the defined classes.
        cases: per case, Dice per class (None where both masks are empty).
        metric: ``"dice"``.
        version: the file's version.
    """

    configuration: str
    classes: tuple[str, ...]
    mean: dict[str, float | None]
    mean_foreground_dice: float | None
    cases: dict[str, dict[str, float | None]]
    metric: str = "dice"
    version: int = SUMMARY_VERSION

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    @classmethod
    def from_cases(cls, configuration: str, classes: Sequence[str], cases: dict[str, dict[str, float | None]]
                   ) -> ValidationSummary:
        """The summary of per-case scores (means over the cases where a class is defined)."""
        mean = {}
        for n in classes:
            vals = [c[n] for c in cases.values() if c[n] is not None]
            mean[n] = float(np.mean(vals)) if vals else None
        fg = [v for v in mean.values() if v is not None]
        return cls(configuration, tuple(classes), mean, float(np.mean(fg)) if fg else None, cases)

    def to_json(self) -> dict[str, Any]:
        """The file's JSON, keys in the order written before this record existed; the version is written from
        version 2 on (a file without one is version 1), so version-1 files stay byte for byte what they were."""
        out = {"configuration": self.configuration, "metric": self.metric, "classes": list(self.classes),
               "mean": dict(self.mean), "mean_foreground_dice": self.mean_foreground_dice, "cases": self.cases}
        return out if self.version == 1 else {**out, "version": self.version}

    @classmethod
    def from_json(cls, d: Any, source: str | Path = "summary.json") -> ValidationSummary:
        """Read a summary (files from before versions load as version 1).

        Raises:
            FileFormatError: not a validation summary, or a newer version.
        """
        try:
            if int(d.get("version", 1)) > SUMMARY_VERSION:
                raise FileFormatError(f"{source}: version {d['version']} is newer than this autoseg reads; upgrade it.")
            return cls(str(d["configuration"]), tuple(d["classes"]), dict(d["mean"]), d.get("mean_foreground_dice"),
                       dict(d["cases"]), str(d.get("metric", "dice")), int(d.get("version", 1)))
        except (AttributeError, KeyError, TypeError) as err:
            raise FileFormatError(f"{source}: not a validation summary ({err}); rerun the validation with "
                                  "`autoseg train ... --validate-only`.") from err

    @classmethod
    def load(cls, path: str | Path) -> ValidationSummary:
        """Read ``val/summary.json``."""
        return cls.from_json(read_json(Path(path), FileFormatError, "rerun the validation"), path)

    def save(self, path: str | Path) -> None:
        """Write atomically."""
        write_json_atomic(Path(path), self.to_json())


@dataclass(frozen=True)
class ValidationInputs:
    """Where a fold's held-out cases and their extra channels are, and how they are laid out."""

    config: ConfigurationPlan
    layout: LabelLayout
    case_ids: tuple[str, ...]
    prev_folder: Path | None = None
    prev_labels: tuple[int, ...] = ()
    extra_folders: tuple[Path, ...] = ()


def validate_fold(network: torch.nn.Module, dataset: Dataset, plans: Plans, inputs: ValidationInputs,
                  workdir: Path, out_dir: Path, *, mirror_axes: Sequence[int], runtime: Runtime,
                  settings: TrainSettings) -> ValidationSummary:
    """Predict every held-out case, write it to ``out_dir`` and return (and save) the Dice summary.

    The network's inputs are the preprocessed images, the channel plugins' stored channels and the cascade's
    one-hot channels, in that order (as in training and prediction). ``settings`` gives the window step, whether
    probabilities are saved and whether a progress bar shows.
    """
    names = class_names(plans, inputs.layout)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds_flag = getattr(network, "deep_supervision", False)
    kw = {"in_channels": network.in_channels, "patch_size": inputs.config.patch_size, "device": runtime.device,
          "amp": runtime.amp}
    run = inference_network(network, **kw)  # the graph `autoseg predict` uses: same labels
    if error_head_of(network) is not None:
        run = (run, inference_network(ErrorOutput(network), **kw))
    per_case: dict[str, dict[str, float | None]] = {}
    quality: dict[str, dict[str, float | None]] = {}
    refs = {c.case_id: c for c in dataset.cases}
    partial = dataset_annotations(dataset)  # a class not annotated in a case is not scored there
    try:
        for cid in tqdm(inputs.case_ids, desc="validation", leave=False, disable=not settings.progress):
            seg, quality[cid] = _validate_case(run, cid, plans, inputs, workdir, out_dir / f"{cid}"
                                               f"{dataset.spec.file_ending}", mirror_axes, runtime, settings)
            case = refs.get(cid)
            if case is not None and case.label is not None:
                scores = dice_scores(seg, read_label(case.label).array, eval_classes(inputs.layout),
                                     ignore_label=dataset.spec.ignore_label)
                per_case[cid] = {n: (None if math.isnan(v) or (cid in partial and n not in partial[cid]) else v)
                                 for n, v in zip(names, scores, strict=True)}
    finally:
        network.deep_supervision = ds_flag
    summary = ValidationSummary.from_cases(inputs.config.name, names, per_case)
    summary.save(out_dir / "summary.json")
    write_json_atomic(out_dir / QUALITY, {"scores": list(QUALITY_SCORES), "cases": quality})
    return summary


def _validate_case(run: Any, cid: str, plans: Plans, inputs: ValidationInputs, workdir: Path, target: Path,
                   mirror_axes: Sequence[int], runtime: Runtime, settings: TrainSettings
                   ) -> tuple[np.ndarray, dict[str, float | None]]:
    """Predict one preprocessed case, write its segmentation (and probabilities), return it and its quality."""
    config, layout = inputs.config, inputs.layout
    folder = Path(workdir) / "preprocessed" / config.data_identifier
    data = with_case_channels(np.asarray(load_case_array(case_paths(folder, cid)["data"], mmap=False)), cid,
                              inputs.extra_folders)
    if inputs.prev_folder is not None:
        data = np.concatenate([data, one_hot(np.load(inputs.prev_folder / f"{cid}_prev.npy"), inputs.prev_labels)])
    props = CaseProperties.load(folder / f"{cid}.json")
    net, error_net = run if isinstance(run, tuple) else (run, None)
    outs = predict_members([net], data, patch_size=config.patch_size, layout=layout, mirror_axes=mirror_axes,
                           step_size=settings.step_size, device=runtime.device, amp=runtime.amp,
                           error_networks=[error_net])
    tta, error = outs.tta_agreement, outs.error
    seg, probs = export_segmentation(outs.logits, props, plans, config, layout, return_probabilities=True)
    del outs
    if settings.save_probabilities:
        save_probabilities_npz(probabilities_path(target), probs, layout)
    write_label(target, seg, props.geometry)
    quality = {"tta_agreement": tta, **probability_scores(probs, layout)}
    quality["combined"] = combined_score(quality)
    if error is not None:
        quality.update(error_head_scores(probabilities_to_labels(probs, layout),
                                         export_map(error, props, plans, config), tta))
    return seg, quality
