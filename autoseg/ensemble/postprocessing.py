"""Postprocessing learnt on cross-validation predictions, kept rule by rule only where it raises the CV Dice.

Rules, tried in this order (the learnt order is the order of application):

1. ``largest_component_all``: keep the largest connected component of the foreground (``seg > 0``); kept when
   the foreground mean Dice strictly improves and no class's mean Dice decreases.
2. ``largest_component`` per class (declared order): kept when that class improves and the mean over classes
   does not decrease.
3. ``min_size`` per class (skipped where 2 was kept): remove components smaller than ``min_volume_mm3``
   (physical volume, mm2 for 2D images, so it transfers across resolutions). Candidates are the volumes of
   predicted components that miss the reference (false positives), at most 20; the best for the class is kept
   when it improves the class and the mean over classes does not decrease.
4. ``nested_consistency`` per class inside another class (regions such as BraTS): a component that touches
   no voxel of its parent class outside itself moves to the innermost ancestor it touches, or to 0 (an
   isolated enhancing blob with no tumour around it is removed). Kept when the foreground mean or the mean
   over classes strictly improves and no class decreases.

Removal semantics: voxels removed from class C get the label of C's parent P (the smallest other class whose
labels strictly contain C's): the smallest label of P not in C. BraTS (whole 1,2,3; core 1,3; enhancing 3):
a removed enhancing component becomes 1, a removed core component 2, a removed whole component 0. Without a
parent (plain label datasets) removed voxels become 0. Means over cases ignore NaN cases (class absent from
both prediction and reference), as ``np.nanmean`` does; undefined means are stored as None.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.ensemble.components import FIX, RULES, apply_step, bounding_box, check_classes, check_step, step_text
from autoseg.errors import FileFormatError, ImageReadError, ImageWriteError
from autoseg.io.atomic import read_json, write_json_atomic
from autoseg.io.image import SUPPORTED_ENDINGS, file_ending, read_label, write_label
from autoseg.parallel import imap_ordered

FORMAT, VERSION = "autoseg.postprocessing", 1


@dataclass(frozen=True)
class PostprocessingRules:
    """Learnt postprocessing: ``steps`` applied in order, plus the CV record of how they were chosen.

    Attributes:
        classes: class name -> label values (a region lists several).
        steps: the kept rules, e.g. ``{"rule": "min_size", "class": "enhancing", "min_volume_mm3": 12.5}``.
        metric: the CV metric the rules were chosen on.
        before: CV mean Dice per class and ``"mean"`` (over classes) without postprocessing (None: undefined).
        after: the same with the steps applied.
        tried: every candidate evaluated: ``step``, ``before``/``after`` (per class and ``"mean"``),
            ``foreground_before``/``foreground_after``, ``accepted`` and a ``reason``.
    """

    classes: dict[str, tuple[int, ...]]
    steps: tuple[dict[str, Any], ...] = ()
    metric: str = "dice"
    before: dict[str, float | None] = field(default_factory=dict)
    after: dict[str, float | None] = field(default_factory=dict)
    tried: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        classes = check_classes(self.classes, FileFormatError)
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "steps", tuple(check_step(s, classes, f"postprocessing step {i + 1}")
                                                for i, s in enumerate(self.steps)))
        for i, t in enumerate(self.tried):
            step = t.get("step") if isinstance(t, Mapping) else None
            if not isinstance(step, Mapping) or step.get("rule") not in RULES:
                raise FileFormatError(f"postprocessing rules: tried entry {i + 1} lacks a known 'step'. {FIX}")
        object.__setattr__(self, "tried", tuple(dict(t) for t in self.tried))

    @classmethod
    def identity(cls, classes: Mapping[str, Sequence[int] | int]) -> PostprocessingRules:
        """Rules that change nothing."""
        return cls(dict(classes))  # type: ignore[arg-type]

    @property
    def is_empty(self) -> bool:
        """True when no step was kept (applying is a copy)."""
        return not self.steps

    def apply(self, seg: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """Apply the steps to a label map.

        Args:
            seg: label map in numpy axis order (``z, y, x`` or ``y, x``).
            spacing: voxel spacing in the same axis order (mm), used by ``min_size``.

        Returns:
            A new array of the same shape and dtype.

        Raises:
            ValueError: ``spacing`` does not have one value per axis.
        """
        seg = np.asarray(seg)
        if len(spacing) != seg.ndim:
            raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {seg.ndim}D label map; "
                             "give one per array axis (numpy order).")
        out = seg.copy()
        if self.steps:
            view = out[bounding_box(out != 0)]  # nothing outside the foreground's box can change
            for step in self.steps:
                apply_step(view, step, self.classes, spacing)
        return out

    def describe(self, *, tried: bool = False) -> list[str]:
        """One line per kept step with its CV effect (``tried``: one per candidate, kept or not, with why)."""
        entries = self.tried if tried else [
            next((t for t in self.tried if t.get("accepted") and t["step"] == s), {"step": s}) for s in self.steps]
        lines = []
        for entry in entries:
            text = step_text(entry["step"])
            if "before" not in entry:
                lines.append(f"{text}: not tried ({entry.get('reason', '')})" if tried else text)
                continue
            key = "foreground" if entry["step"]["rule"] in ("largest_component_all", "nested_consistency") \
                else entry["step"]["class"]
            b, a = ((entry[f"foreground_{x}"] for x in ("before", "after")) if key == "foreground"
                    else (entry[x].get(key) for x in ("before", "after")))
            line = f"{text}: CV Dice {'(foreground) ' if key == 'foreground' else ''}{_fmt(b)} -> {_fmt(a)}"
            verdict = f" [{'kept' if entry.get('accepted') else 'rejected'}: {entry.get('reason', '')}]"
            lines.append(line + (verdict if tried else ""))
        return lines

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (see :meth:`from_json`)."""
        return {"format": FORMAT, "version": VERSION, "metric": self.metric,
                "classes": {k: list(v) for k, v in self.classes.items()}, "steps": [dict(s) for s in self.steps],
                "before": dict(self.before), "after": dict(self.after), "tried": [dict(t) for t in self.tried]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PostprocessingRules:
        """Rules from :meth:`to_json`'s dict.

        Raises:
            FileFormatError: not a rules object, another version, unknown rule, missing or invalid field.
        """
        if not isinstance(d, Mapping) or "classes" not in d or "steps" not in d:
            raise FileFormatError(f"postprocessing rules must be a JSON object with 'classes' and 'steps'. {FIX}")
        if d.get("version", VERSION) != VERSION:
            raise FileFormatError(f"postprocessing rules of version {d.get('version')!r}; this autoseg reads "
                                  f"version {VERSION}. {FIX}")
        if not isinstance(d["steps"], list) or not isinstance(d.get("tried", []), list) or \
                not all(isinstance(d.get(k, {}), Mapping) for k in ("before", "after")):
            raise FileFormatError(f"postprocessing rules: 'steps' and 'tried' must be lists, 'before' and 'after' "
                                  f"objects. {FIX}")
        return cls(check_classes(d["classes"], FileFormatError), tuple(d["steps"]), str(d.get("metric", "dice")),
                   dict(d.get("before", {})), dict(d.get("after", {})), tuple(d.get("tried", [])))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the rules as JSON, atomically."""
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PostprocessingRules:
        """Read rules written by :meth:`save`.

        Raises:
            FileFormatError: missing, unreadable or malformed file (the message names it).
        """
        d = read_json(path, FileFormatError, FIX)
        try:
            return cls.from_json(d)
        except FileFormatError as err:
            raise FileFormatError(f"{path}: {err}") from err


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


# ---------------------------------------------------------------------------------------------- folders


def postprocess_job(job: tuple[Path, Path, dict[str, Any]]) -> Path:
    """Worker: apply rules (as JSON) to the file ``src`` and write ``dst`` with the same geometry."""
    src, dst, rules = job
    img = read_label(src)
    write_label(dst, PostprocessingRules.from_json(rules).apply(img.array, img.geometry.array_spacing), img.geometry)
    return dst


def postprocess_folder(input_dir: str | os.PathLike[str], output_dir: str | os.PathLike[str],
                       rules: PostprocessingRules, *, jobs: int = 1, progress: bool = True,
                       overwrite: bool = False) -> list[Path]:
    """Apply ``rules`` to every segmentation file of a folder, writing same-named files with the same geometry.

    Args:
        input_dir: folder of label maps (any supported ending; hidden files and other files are skipped).
        output_dir: where the results go (created; must differ from ``input_dir``).
        rules: the rules to apply.
        jobs: processes in parallel.
        progress: show a progress bar.
        overwrite: rewrite outputs that exist already (default: keep them).

    Returns:
        The output path of every input file, in name order (written now or already present).

    Raises:
        ImageReadError: the input folder is missing, holds no segmentation, or a file cannot be read.
        ImageWriteError: the output folder is the input folder, or a file cannot be written.
    """
    src_dir, dst_dir = Path(input_dir), Path(output_dir)
    if not src_dir.is_dir():
        raise ImageReadError(f"{src_dir}: input folder not found. Give the folder holding the segmentations.")
    if dst_dir.resolve() == src_dir.resolve():
        raise ImageWriteError(f"{dst_dir}: the output folder is the input folder; postprocessing never overwrites "
                              "its inputs. Choose another output folder.")
    files = sorted(p for p in src_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and file_ending(p) in SUPPORTED_ENDINGS)
    if not files:
        raise ImageReadError(f"{src_dir}: no segmentation files ({', '.join(SUPPORTED_ENDINGS)}) found. Check the "
                             "input folder.")
    dst_dir.mkdir(parents=True, exist_ok=True)
    outputs = [dst_dir / p.name for p in files]
    todo = [(s, d, rules.to_json()) for s, d in zip(files, outputs) if overwrite or not d.exists()]
    list(imap_ordered(postprocess_job, todo, jobs=jobs, desc="postprocess", progress=progress,
                      label=lambda j: str(j[0])))
    return outputs


__all__ = ["PostprocessingRules", "RULES", "postprocess_folder", "postprocess_job"]
