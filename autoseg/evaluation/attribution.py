"""Exact Shapley attribution of input channels (modalities): how much of the Dice each channel brings.

For one case the *value* of a coalition S of channels is the per-class Dice of the prediction made with
only the channels of S present (:data:`~autoseg.evaluation.modalities.PredictFn`). The Shapley value of
channel i is its average marginal contribution over every order of adding channels::

    phi_i = sum over S in N \\ {i} of |S|! (n - |S| - 1)! / n! * (v(S + {i}) - v(S))

so, per class, the values sum to v(all) - v(none) (efficiency), interchangeable channels get equal values
(symmetry) and a channel that never changes the prediction gets 0 (null player). Exact values need all
2^n coalitions, hence 2^n predictions per case: at most 5 channels (32 predictions).

Conventions:

* a class absent from both the reference and the prediction counts as Dice 1 (nothing to find, nothing
  found), so every coalition has a defined value;
* without a reference (``None``), the full-channel prediction is the reference: the values then say how
  much each channel is needed to reproduce the model's own output, and v(all) = 1 for every class.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.evaluation.metrics import EvaluationError
from autoseg.evaluation.modalities import (
    PredictFn,
    all_subsets,
    as_subset,
    check_setup,
    class_to_json,
    counting,
    iter_cases,
    progress_bar,
    subset_values,
)
from autoseg.evaluation.summary import to_json_value
from autoseg.io.atomic import atomic_path, write_json_atomic, write_text_atomic

MAX_EXACT_PLAYERS = 5
ATTRIBUTION_VERSION = 1


def check_players(n_players: int) -> None:
    """Refuse fewer than one player or more than :data:`MAX_EXACT_PLAYERS`."""
    if isinstance(n_players, bool) or not isinstance(n_players, int) or n_players < 1:
        raise EvaluationError(f"n_players={n_players!r}: exact Shapley needs at least one channel.")
    if n_players > MAX_EXACT_PLAYERS:
        raise EvaluationError(f"{n_players} channels: exact Shapley needs 2^n predictions per case "
                              f"({2 ** n_players} here); at most {MAX_EXACT_PLAYERS} channels. Group channels "
                              "into at most 5 sets, or use evaluate_missing for selected subsets.")


def _coalition(mask: int, names: Sequence[str]) -> str:
    members = [i for i in range(len(names)) if mask >> i & 1]
    return "{" + ", ".join(f"{i} ({names[i]})" for i in members) + "}" if members else "{} (no channel)"


def shapley_values(values: Mapping[frozenset[int], np.ndarray], n_players: int, *,
                   player_names: Sequence[str] | None = None) -> np.ndarray:
    """Exact Shapley value of each player (channel) for each class from a full table of coalition values.

    ``phi_i = sum over S in N \\ {i} of |S|! (n - |S| - 1)! / n! * (v(S + {i}) - v(S))``.

    Args:
        values: coalition (frozenset of player indices) -> value per class (1-D array, or a scalar for one
            class); all 2^n coalitions, the empty one and the full one included.
        n_players: number of players n (1 to 5).
        player_names: names used in error messages (default: the indices).

    Returns:
        float64 array of shape (n_players, n_classes); each column sums to v(all) - v(none).

    Raises:
        EvaluationError: n_players < 1 or > 5, a missing coalition (named), a coalition with a player
            index >= n_players, values of differing shapes, or a NaN value.

    Example:
        >>> v = {frozenset(): 0.0, frozenset({0}): 0.2, frozenset({1}): 0.4, frozenset({0, 1}): 1.0}
        >>> shapley_values(v, 2)[:, 0].round(6).tolist()
        [0.4, 0.6]
    """
    check_players(n_players)
    n = n_players
    names = [str(i) for i in range(n)] if player_names is None else [str(p) for p in player_names]
    if len(names) != n:
        raise EvaluationError(f"{len(names)} player names for n_players={n}; give one name per player.")
    table: dict[int, np.ndarray] = {}
    for key, value in values.items():
        subset = as_subset(key)
        if any(i >= n for i in subset):
            raise EvaluationError(f"coalition {sorted(subset)} names a player >= n_players={n}; players are "
                                  f"0..{n - 1}: check n_players.")
        table[sum(1 << i for i in subset)] = np.atleast_1d(np.asarray(value, dtype=np.float64))
    rows = []
    for mask in range(1 << n):
        if mask not in table:
            raise EvaluationError(f"coalition {_coalition(mask, names)} is missing: exact Shapley needs all "
                                  f"2^{n} = {1 << n} coalitions, the empty and the full one included; "
                                  "predict it and add its value.")
        row = table[mask]
        if row.ndim != 1 or (rows and row.shape != rows[0].shape):
            raise EvaluationError(f"coalition {_coalition(mask, names)} has values of shape {row.shape}, "
                                  f"expected {rows[0].shape if rows else '(n_classes,)'}: one value per class.")
        if np.isnan(row).any():
            raise EvaluationError(f"coalition {_coalition(mask, names)} has a NaN value {row.tolist()}; Shapley "
                                  "values need defined values (for Dice, count a class absent from both maps "
                                  "as 1: subset_values(..., both_empty=1.0)).")
        rows.append(row)
    v = np.stack(rows)
    weights = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    phi = np.zeros((n, v.shape[1]), dtype=np.float64)
    for i in range(n):
        bit = 1 << i
        for mask in range(1 << n):
            if not mask & bit:
                phi[i] += weights[mask.bit_count()] * (v[mask | bit] - v[mask])
    return phi


@dataclass(frozen=True)
class CaseAttribution:
    """Attribution of one case.

    Attributes:
        case_id: the case.
        shapley: Shapley values, shape (channels, classes).
        value_full: per-class Dice with every channel present, v(all).
        value_empty: per-class Dice with every channel absent, v(none).
        reference: ``"reference"``, or ``"full prediction"`` when no reference was given.
    """

    case_id: str
    shapley: np.ndarray
    value_full: np.ndarray
    value_empty: np.ndarray
    reference: str


@dataclass
class Attribution:
    """Shapley attribution of channels for several cases.

    Attributes:
        channel_names: one name per channel.
        class_names: one name per class.
        classes: per class, its label values.
        cases: per case attribution, in input order.
        settings: options and conventions that produced the values.
    """

    channel_names: tuple[str, ...]
    class_names: tuple[str, ...]
    classes: tuple[tuple[int, ...], ...]
    cases: list[CaseAttribution]
    settings: dict[str, Any] = field(default_factory=dict)

    def shapley(self) -> np.ndarray:
        """Every case's values, shape (cases, channels, classes)."""
        return np.stack([c.shapley for c in self.cases])

    def mean(self) -> np.ndarray:
        """Mean Shapley value over cases, shape (channels, classes)."""
        return self.shapley().mean(axis=0)

    def std(self) -> np.ndarray:
        """Sample standard deviation (ddof=1) over cases, shape (channels, classes); NaN with one case."""
        phi = self.shapley()
        return phi.std(axis=0, ddof=1) if len(phi) > 1 else np.full(phi.shape[1:], math.nan)

    def _by_class(self, a: np.ndarray) -> dict[str, float]:
        return dict(zip(self.class_names, a.tolist(), strict=True))

    def _matrix(self, a: np.ndarray) -> dict[str, dict[str, float]]:
        return {cls: dict(zip(self.channel_names, a[:, j].tolist(), strict=True))
                for j, cls in enumerate(self.class_names)}

    def to_json(self) -> dict[str, Any]:
        """The JSON object: settings, mean and std (class -> channel -> value), per-case values (NaN -> null)."""
        d = {"version": ATTRIBUTION_VERSION, "channel_names": list(self.channel_names),
             "class_names": list(self.class_names),
             "classes": {n: class_to_json(c) for n, c in zip(self.class_names, self.classes, strict=True)},
             "settings": self.settings, "mean": self._matrix(self.mean()), "std": self._matrix(self.std()),
             "cases": {c.case_id: {"reference": c.reference, "value_full": self._by_class(c.value_full),
                                   "value_empty": self._by_class(c.value_empty),
                                   "shapley": self._matrix(c.shapley)} for c in self.cases}}
        return to_json_value(d, "attribution")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` atomically."""
        write_json_atomic(path, self.to_json())

    def write_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per case, class and channel: ``case, class, channel, shapley, value_full, value_empty``."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["case", "class", "channel", "shapley", "value_full", "value_empty"])
        for c in self.cases:
            for j, cls in enumerate(self.class_names):
                for i, ch in enumerate(self.channel_names):
                    writer.writerow([c.case_id, cls, ch, repr(float(c.shapley[i, j])),
                                     repr(float(c.value_full[j])), repr(float(c.value_empty[j]))])
        write_text_atomic(path, buf.getvalue())

    def format_table(self) -> str:
        """A text table: one row per channel, one column per class (mean Shapley, ``± std`` with several
        cases), then the column sums and the mean v(all) and v(none)."""
        mean, std, many = self.mean(), self.std(), len(self.cases) > 1

        def cell(m: float, s: float) -> str:
            return f"{m:+.3f} ± {s:.3f}" if many else f"{m:+.3f}"

        rows = [["channel", *self.class_names]]
        for i, ch in enumerate(self.channel_names):
            rows.append([ch, *(cell(mean[i, j], std[i, j]) for j in range(len(self.class_names)))])
        full = np.mean([c.value_full for c in self.cases], axis=0)
        empty = np.mean([c.value_empty for c in self.cases], axis=0)
        rows.append(["sum", *(f"{v:+.3f}" for v in mean.sum(axis=0))])
        rows.append(["v(all)", *(f"{v:.3f}" for v in full)])
        rows.append(["v(none)", *(f"{v:.3f}" for v in empty)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(2 + len(self.channel_names), "-" * len(lines[0]))
        own = sum(c.reference == "full prediction" for c in self.cases)
        header = (f"Exact Shapley value of each channel for the Dice of each class, mean{' ± std' * many} over "
                  f"{len(self.cases)} cases; each column sums to v(all) - v(none).")
        if own:
            header += f"\n{own} case(s) without reference: scored against the model's own full-channel output."
        return "\n".join([header, *lines])

    def plot(self, path: str | os.PathLike[str]) -> None:
        """Write a PNG bar chart: one group per class, one bar per channel (mean Shapley value over cases,
        error bar = std when there are several cases). Uses matplotlib's Agg canvas without pyplot, so no
        global backend is changed; the file is written atomically."""
        from matplotlib.figure import Figure

        mean, many = self.mean(), len(self.cases) > 1
        std = self.std() if many else None
        n_ch, n_cls = mean.shape
        fig = Figure(figsize=(max(6.0, 1.5 + 0.4 * n_ch * n_cls), 4.5))
        ax = fig.add_subplot()
        x = np.arange(n_cls, dtype=np.float64)
        width = 0.8 / n_ch
        for i, ch in enumerate(self.channel_names):
            ax.bar(x - 0.4 + width * (i + 0.5), mean[i], width, label=ch,
                   yerr=None if std is None else std[i], capsize=3 if many else 0)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(self.class_names)
        ax.set_xlabel("class")
        ax.set_ylabel("Shapley value (Dice), mean ± std over cases" if many else "Shapley value (Dice)")
        ax.set_title(f"Channel attribution (exact Shapley), {len(self.cases)} case(s)")
        ax.legend(title="channel", fontsize=8)
        fig.tight_layout()
        with atomic_path(Path(path)) as tmp:
            fig.savefig(tmp, format="png", dpi=100)


def _known(predict: PredictFn, subset: frozenset[int], prediction: np.ndarray) -> PredictFn:
    """``predict`` that returns the already computed ``prediction`` for ``subset`` instead of predicting again."""
    def wrapped(s: frozenset[int]) -> np.ndarray:
        return prediction if s == subset else predict(s)
    return wrapped


def explain_cases(cases: Iterable[tuple[str, PredictFn, np.ndarray | None]], n_channels: int,
                  channel_names: Sequence[str], class_names: Sequence[str],
                  classes: Sequence[int | Sequence[int]], *, ignore_label: int | None = None,
                  progress: bool = True) -> Attribution:
    """Exact Shapley attribution of the channels on each case (2^n predictions per case, each once).

    Args:
        cases: ``(case_id, predict, reference)`` per case; ``predict`` must accept the empty set. With
            ``reference=None`` the full-channel prediction is the reference: how much each channel is
            needed to reproduce the model's own output.
        n_channels: number of input channels (1 to 5).
        channel_names: one name per channel.
        class_names: one name per class.
        classes: per class, a label value or a tuple of label values (region).
        ignore_label: reference value left out of the Dice.
        progress: show a tqdm bar counting predictions.

    Returns:
        The attribution; a class absent from both reference and prediction counts as Dice 1.

    Raises:
        EvaluationError: more than 5 channels (checked before any prediction), inconsistent names, a
            malformed or duplicated case, a prediction of the wrong shape, or no case at all.

    Example:
        >>> att = explain_cases([("c1", predict, None)], 4, ["T1", "T1ce", "T2", "FLAIR"],
        ...                     ["WT", "TC", "ET"], [(1, 2, 3), (2, 3), 3], progress=False)  # doctest: +SKIP
        >>> print(att.format_table()); att.plot("attribution.png")  # doctest: +SKIP
    """
    check_players(n_channels)
    names, cls_names, specs = check_setup(n_channels, channel_names, class_names, classes)
    coalitions = all_subsets(n_channels, include_empty=True)
    full = frozenset(range(n_channels))
    results: list[CaseAttribution] = []
    with progress_bar(cases, len(coalitions), "attribution", progress) as bar:
        for case_id, predict, reference in iter_cases(cases, reference_required=False):
            bar.set_postfix_str(case_id)
            fn, kind = counting(predict, bar), "reference"
            if reference is None:  # predict the full set first; it is the reference and its own value
                reference, kind = np.asarray(fn(full)), "full prediction"
                fn = _known(fn, full, reference)
            try:
                values = subset_values(fn, reference, specs, coalitions, ignore_label=ignore_label,
                                       both_empty=1.0)
            except EvaluationError as err:
                raise EvaluationError(f"case {case_id!r}: {err}") from err
            phi = shapley_values(values, n_channels, player_names=names)
            results.append(CaseAttribution(case_id, phi, values[full], values[frozenset()], kind))
    if not results:
        raise EvaluationError("explain_cases got no case; give at least one (case_id, predict, reference).")
    settings = {"ignore_label": ignore_label, "both_empty": 1.0, "method": "exact Shapley",
                "reference_none": "the full-channel prediction is the reference"}
    return Attribution(names, cls_names, specs, results, settings)
