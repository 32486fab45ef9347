"""Channel-subset evaluation: how well a model segments when some input channels (modalities) are missing.

The model is reached through one *predict function* per case, :data:`PredictFn`: given the set of channel
indices that are present, it returns the label map predicted with the other channels absent (however the
model copes with absence: zero-filled inputs, a model trained with channel dropout, a synthesis step). It
must accept the empty set (every channel absent) when used for attribution.

* :func:`subset_values` -- per-class Dice of several channel subsets of one case (each predicted once);
* :func:`evaluate_missing` -- every non-empty subset over many cases -> :class:`MissingModalitySummary`
  (text table, JSON, CSV, and the Dice drop when one channel is missing).

NaN convention: a class empty in both the reference and the prediction has Dice NaN (the evaluation
convention of :mod:`autoseg.evaluation.dice`: left out of means) unless ``both_empty`` says otherwise;
attribution (:mod:`autoseg.evaluation.attribution`) passes ``both_empty=1.0`` (nothing to find and nothing
found is perfect) so that every coalition has a value. Means over cases leave NaN out; the foreground mean
(mean of the class means) is NaN when a class mean is NaN, as in :class:`~autoseg.evaluation.summary.EvaluationSummary`.
"""

from __future__ import annotations

import csv
import io
import math
import operator
import os
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any

import numpy as np
from tqdm import tqdm

from autoseg.evaluation.dice import dice_scores
from autoseg.evaluation.metrics import EvaluationError, class_values
from autoseg.evaluation.summary import to_json_value
from autoseg.io.atomic import write_json_atomic, write_text_atomic

PredictFn = Callable[[frozenset[int]], np.ndarray]
"""Present channel indices -> label map predicted with the other channels absent."""

MISSING_VERSION = 1


def subset_name(subset: Iterable[int], channel_names: Sequence[str]) -> str:
    """``{0, 2}`` with names ``("T1", "T2", "FLAIR")`` -> ``"T1+FLAIR"`` (index order); empty -> ``"none"``."""
    idx = sorted(subset)
    return "+".join(channel_names[i] for i in idx) if idx else "none"


def all_subsets(n_channels: int, *, include_empty: bool = False) -> list[frozenset[int]]:
    """Every subset of ``range(n_channels)``: more channels first, then in index order.

    Example:
        >>> [sorted(s) for s in all_subsets(2, include_empty=True)]
        [[0, 1], [0], [1], []]
    """
    stop = -1 if include_empty else 0
    return [frozenset(c) for k in range(n_channels, stop, -1) for c in combinations(range(n_channels), k)]


def as_subset(subset: Iterable[int]) -> frozenset[int]:
    """A frozenset of non-negative channel indices, or :class:`EvaluationError` naming the bad subset."""
    try:
        out = frozenset(operator.index(i) for i in subset)
    except TypeError as err:
        raise EvaluationError(f"channel subset {subset!r} is not a set of channel indices; "
                              "give integers, e.g. frozenset({0, 2}).") from err
    if any(i < 0 for i in out):
        raise EvaluationError(f"channel subset {sorted(out)} holds a negative index; channels count from 0.")
    return out


def check_setup(n_channels: int, channel_names: Sequence[str], class_names: Sequence[str],
                classes: Sequence[int | Sequence[int]]) -> tuple[tuple[str, ...], tuple[str, ...],
                                                                tuple[tuple[int, ...], ...]]:
    """Validated ``(channel_names, class_names, classes)``; classes become tuples of label values.

    Raises:
        EvaluationError: no channel, a name count that differs from ``n_channels`` or from the classes,
            duplicated names, or a class that is not a label value / tuple of label values.
    """
    if isinstance(n_channels, bool) or not isinstance(n_channels, int) or n_channels < 1:
        raise EvaluationError(f"n_channels={n_channels!r}: give the number of input channels (>= 1).")
    ch, cl = tuple(str(c) for c in channel_names), tuple(str(c) for c in class_names)
    if len(ch) != n_channels:
        raise EvaluationError(f"{len(ch)} channel names {list(ch)} for n_channels={n_channels}; "
                              "give one name per channel, in channel order (dataset.json 'channel_names').")
    if not cl or len(cl) != len(classes):
        raise EvaluationError(f"{len(cl)} class names {list(cl)} for {len(classes)} classes; give one name per "
                              "class (label value or region tuple), in the same order.")
    for kind, names in (("channel", ch), ("class", cl)):
        if len(set(names)) != len(names):
            raise EvaluationError(f"duplicated {kind} names {list(names)}; every {kind} needs its own name.")
    try:
        specs = tuple(class_values(c) for c in classes)
    except (TypeError, ValueError) as err:
        raise EvaluationError(f"classes {list(classes)!r}: each class must be a label value or a tuple of "
                              "label values (a region).") from err
    return ch, cl, specs


def iter_cases(cases: Iterable[Any], *, reference_required: bool) -> Iterator[tuple[str, PredictFn, Any]]:
    """``(case_id, predict, reference)`` items checked one by one (``cases`` may be a lazy generator)."""
    seen: set[str] = set()
    for item in cases:
        try:
            case_id, predict, reference = item
        except (TypeError, ValueError) as err:
            raise EvaluationError(f"case item {item!r:.80} is not a (case_id, predict, reference) triple.") from err
        case_id = str(case_id)
        if case_id in seen:
            raise EvaluationError(f"case {case_id!r} is given twice; case ids must be unique.")
        seen.add(case_id)
        if not callable(predict):
            raise EvaluationError(f"case {case_id!r}: predict is {type(predict).__name__}, not a callable "
                                  "taking the frozenset of present channels.")
        if reference is None and reference_required:
            raise EvaluationError(f"case {case_id!r}: no reference label map; missing-channel evaluation "
                                  "needs one (attribution with explain_cases works without).")
        yield case_id, predict, (None if reference is None else np.asarray(reference))


def progress_bar(cases: Iterable[Any], per_case: int, desc: str, progress: bool) -> tqdm:
    """A bar counting predictions (the total is known when ``cases`` has a length)."""
    total = len(cases) * per_case if isinstance(cases, Sized) else None
    return tqdm(total=total, desc=desc, unit="prediction", disable=not progress)


def counting(predict: PredictFn, bar: tqdm) -> PredictFn:
    """``predict`` that advances ``bar`` after each call."""
    def wrapped(subset: frozenset[int]) -> np.ndarray:
        out = predict(subset)
        bar.update(1)
        return out
    return wrapped


def subset_values(predict: PredictFn, reference: np.ndarray, classes: Sequence[int | Sequence[int]],
                  subsets: Iterable[Iterable[int]], *, ignore_label: int | None = None,
                  both_empty: float = math.nan) -> dict[frozenset[int], np.ndarray]:
    """Per-class Dice of the prediction made with each channel subset, against ``reference``.

    Each distinct subset is predicted exactly once, in the order given.

    Args:
        predict: present channel indices -> predicted label map (same shape as ``reference``).
        reference: reference label map.
        classes: per class, a label value or a tuple of label values (a region, evaluated as their union).
        subsets: channel subsets to evaluate (any iterables of indices; the empty one is allowed).
        ignore_label: reference value whose voxels are left out of both masks.
        both_empty: Dice of a class absent from both reference and prediction: NaN (the evaluation
            convention, left out of means) or 1.0 (perfect; what attribution needs).

    Returns:
        subset (frozenset) -> float64 array of one Dice per class.

    Raises:
        EvaluationError: a subset is not a set of indices, or a prediction's shape differs from the reference.

    Example:
        >>> ref = np.array([0, 1, 1, 2])
        >>> predict = lambda s: ref if 0 in s else np.zeros_like(ref)
        >>> v = subset_values(predict, ref, [1, 2], [{0}, set()], both_empty=1.0)
        >>> v[frozenset({0})].tolist(), v[frozenset()].tolist()
        ([1.0, 1.0], [0.0, 0.0])
    """
    ref = np.asarray(reference)
    specs = [class_values(c) for c in classes]
    out: dict[frozenset[int], np.ndarray] = {}
    for raw in subsets:
        subset = as_subset(raw)
        if subset in out:
            continue
        pred = np.asarray(predict(subset))
        if pred.shape != ref.shape:
            raise EvaluationError(f"prediction with channels {sorted(subset)} has shape {pred.shape}, the "
                                  f"reference {ref.shape}; predict on the reference grid.")
        dice = np.asarray(dice_scores(pred, ref, specs, ignore_label=ignore_label), dtype=np.float64)
        out[subset] = np.where(np.isnan(dice), both_empty, dice)
    return out


def nanmean_rows(a: np.ndarray) -> np.ndarray:
    """Mean over axis 0 leaving NaN out; NaN where a column has no value (no warning)."""
    ok = ~np.isnan(a)
    n = ok.sum(axis=0)
    return np.where(n > 0, np.where(ok, a, 0.0).sum(axis=0) / np.maximum(n, 1), math.nan)


def class_to_json(spec: tuple[int, ...]) -> int | list[int]:
    """A class for JSON: one label -> ``int``, a region -> list of labels."""
    return spec[0] if len(spec) == 1 else list(spec)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.3f}"


@dataclass
class MissingModalitySummary:
    """Dice of every non-empty channel subset, per case and class.

    Attributes:
        channel_names: one name per input channel, in channel order.
        class_names: one name per class.
        classes: per class, its label values (a region has several).
        cases: case id -> subset -> per-class Dice (NaN where the class is absent from both maps).
        settings: options that produced the values (ignore label, convention).
    """

    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    cases: dict[str, dict[frozenset[int], np.ndarray]]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def full(self) -> frozenset[int]:
        """The set of every channel."""
        return frozenset(range(len(self.channel_names)))

    def _evaluated(self) -> set[frozenset[int]]:
        return {s for per_subset in self.cases.values() for s in per_subset}

    def per_case(self, subset: Iterable[int]) -> np.ndarray:
        """Dice of ``subset``, shape (cases, classes), in case order (NaN where undefined).

        Raises:
            KeyError: the subset was not evaluated.
        """
        s = as_subset(subset)
        if s not in self._evaluated():
            raise KeyError(f"channel subset {subset_name(s, self.channel_names)!r} ({sorted(s)}) was not "
                           "evaluated; see subsets().")
        nan = np.full(len(self.classes), math.nan)
        return np.array([per.get(s, nan) for per in self.cases.values()], dtype=np.float64)

    def mean(self, subset: Iterable[int]) -> np.ndarray:
        """Per-class mean Dice of ``subset`` over cases, NaN left out (NaN when no case has a value)."""
        return nanmean_rows(self.per_case(subset))

    def foreground_mean(self, subset: Iterable[int]) -> float:
        """Mean of the class means; NaN when one of them is NaN (nnU-Net convention)."""
        return float(np.mean(self.mean(subset)))

    def class_drop(self, subset: Iterable[int]) -> np.ndarray:
        """Per-class mean Dice with all channels minus with ``subset`` (positive: the subset does worse)."""
        return self.mean(self.full) - self.mean(subset)

    def drop(self, subset: Iterable[int]) -> float:
        """Foreground mean Dice with all channels minus with ``subset`` (positive: the subset does worse)."""
        return self.foreground_mean(self.full) - self.foreground_mean(subset)

    def subsets(self) -> list[frozenset[int]]:
        """Evaluated subsets in table order: more channels first, then higher foreground Dice (NaN last)."""
        def key(s: frozenset[int]) -> tuple[Any, ...]:
            fg = self.foreground_mean(s)
            return (-len(s), math.isnan(fg), 0.0 if math.isnan(fg) else -fg, sorted(s))
        return sorted(self._evaluated(), key=key)

    def one_missing_drop(self) -> dict[str, float]:
        """For each channel, the foreground Dice drop when only that channel is missing.

        Compare these between a model trained with channel dropout and a normal one: smaller drops mean
        more robustness to a missing sequence. With a single channel the drop is NaN (nothing is left).

        Example:
            >>> summary.one_missing_drop()  # doctest: +SKIP
            {'T1': 0.012, 'T2': 0.031, 'FLAIR': 0.254}
        """
        evaluated = self._evaluated()
        return {name: self.drop(self.full - {i}) if self.full - {i} in evaluated else math.nan
                for i, name in enumerate(self.channel_names)}

    def to_json(self) -> dict[str, Any]:
        """The JSON object: settings, per-subset means and drops, one-missing drops, per-case Dice (NaN -> null)."""
        names = self.channel_names
        rows = []
        for s in self.subsets():
            rows.append({"name": subset_name(s, names), "channels": sorted(s), "n_channels": len(s),
                         "mean_dice": dict(zip(self.class_names, self.mean(s).tolist(), strict=True)),
                         "foreground_mean": self.foreground_mean(s), "drop": self.drop(s),
                         "class_drop": dict(zip(self.class_names, self.class_drop(s).tolist(), strict=True))})
        d = {"version": MISSING_VERSION, "channel_names": list(names), "class_names": list(self.class_names),
             "classes": {n: class_to_json(c) for n, c in zip(self.class_names, self.classes, strict=True)},
             "settings": self.settings, "subsets": rows, "one_missing_drop": self.one_missing_drop(),
             "cases": {case: {subset_name(s, names): dict(zip(self.class_names, v.tolist(), strict=True))
                              for s, v in per.items()} for case, per in self.cases.items()}}
        return to_json_value(d, "missing_modalities")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        write_json_atomic(path, self.to_json())

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per case, subset and class: ``case, subset, n_channels, class, dice`` (NaN as ``nan``)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case", "subset", "n_channels", "class", "dice"])
        order = self.subsets()
        for case, per in self.cases.items():
            for s in (s for s in order if s in per):
                for cls, v in zip(self.class_names, per[s].tolist(), strict=True):
                    writer.writerow([case, subset_name(s, self.channel_names), len(s), cls, repr(float(v))])
        write_text_atomic(path, buf.getvalue())

    def format_table(self) -> str:
        """A text table: one row per subset (more channels first, then higher Dice); per-class mean Dice,
        foreground ``mean`` and ``drop`` (mean with all channels minus mean with the subset)."""
        rows = [["channels", *self.class_names, "mean", "drop"]]
        for s in self.subsets():
            rows.append([subset_name(s, self.channel_names), *(_fmt(v) for v in self.mean(s)),
                         _fmt(self.foreground_mean(s)), _fmt(self.drop(s))])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        header = (f"{len(self.cases)} cases; mean Dice over cases (NaN left out); drop = mean Dice with all "
                  "channels minus mean Dice with the subset")
        return "\n".join([header, *lines])


def evaluate_missing(cases: Iterable[tuple[str, PredictFn, np.ndarray]], n_channels: int,
                     channel_names: Sequence[str], class_names: Sequence[str],
                     classes: Sequence[int | Sequence[int]], *, ignore_label: int | None = None,
                     progress: bool = True) -> MissingModalitySummary:
    """Dice of every non-empty channel subset on every case (2^n - 1 predictions per case).

    Args:
        cases: ``(case_id, predict, reference)`` per case; may be a generator (one case in memory at a time).
        n_channels: number of input channels.
        channel_names: one name per channel, e.g. ``("T1", "T1ce", "T2", "FLAIR")``.
        class_names: one name per class.
        classes: per class, a label value or a tuple of label values (region).
        ignore_label: reference value left out of the Dice.
        progress: show a tqdm bar counting predictions.

    Returns:
        The summary; a class absent from both reference and prediction has Dice NaN (left out of means).

    Raises:
        EvaluationError: inconsistent names, a malformed or duplicated case, a missing reference, a
            prediction of the wrong shape, or no case at all.

    Example:
        >>> cases = [("c1", lambda s: ref if 0 in s else 0 * ref, ref)]  # doctest: +SKIP
        >>> s = evaluate_missing(cases, 2, ["T1", "FLAIR"], ["tumour"], [1], progress=False)  # doctest: +SKIP
        >>> print(s.format_table()); s.one_missing_drop()  # doctest: +SKIP
    """
    names, cls_names, specs = check_setup(n_channels, channel_names, class_names, classes)
    subsets = all_subsets(n_channels)
    per_case: dict[str, dict[frozenset[int], np.ndarray]] = {}
    with progress_bar(cases, len(subsets), "missing channels", progress) as bar:
        for case_id, predict, reference in iter_cases(cases, reference_required=True):
            bar.set_postfix_str(case_id)
            try:
                per_case[case_id] = subset_values(counting(predict, bar), reference, specs, subsets,
                                                  ignore_label=ignore_label)
            except EvaluationError as err:
                raise EvaluationError(f"case {case_id!r}: {err}") from err
    if not per_case:
        raise EvaluationError("evaluate_missing got no case; give at least one (case_id, predict, reference).")
    settings = {"ignore_label": ignore_label, "both_empty": "NaN (left out of means)"}
    return MissingModalitySummary(names, cls_names, specs, per_case, settings)
