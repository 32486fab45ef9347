"""The report's figures, drawn with matplotlib's Agg canvas and returned as ``data:image/png;base64`` URIs.

Figures are built on :class:`matplotlib.figure.Figure` objects (no pyplot, so no global figure state and no
backend switch) and saved without a timestamp or software tag, so the same inputs give the same bytes.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from autoseg.report.cases import CaseView
from autoseg.report.collect import FoldRun
from autoseg.report.cv import CVEntry

#: colours of folds, candidates and classes (colour-blind safe, after Okabe and Ito)
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
FALSE_POSITIVE, FALSE_NEGATIVE = "#FF2DA0", "#00C8FF"
DPI = 100


def _new(width: float, height: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def to_data_uri(fig: Figure) -> str:
    """The figure as an embedded PNG (no metadata, so identical figures give identical bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _style(ax, title: str, xlabel: str | None = None, ylabel: str | None = None) -> None:  # noqa: ANN001
    ax.set_title(title, fontsize=10.5)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8.5)
    ax.grid(True, color="#e3e7ee", linewidth=0.7)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def training_curves(runs: Sequence[FoldRun]) -> str:
    """Loss (train solid, validation dashed), pseudo Dice (EMA solid, per epoch dotted) and learning rate
    against epoch, one colour per fold, for the folds of one configuration."""
    fig = _new(11.5, 3.3)
    loss_ax, dice_ax, lr_ax = fig.subplots(1, 3)
    _style(loss_ax, "loss", "epoch")
    _style(dice_ax, "pseudo Dice (mean over classes)", "epoch")
    _style(lr_ax, "learning rate", "epoch")
    for i, run in enumerate(runs):
        c, epochs = colour(i), run.series("epoch")
        dots = {"marker": "o", "markersize": 3} if len(epochs) < 12 else {}  # a run of one epoch is one point
        loss_ax.plot(epochs, run.series("train_loss"), color=c, linewidth=1.4, **dots)
        loss_ax.plot(epochs, run.series("val_loss"), color=c, linewidth=1.4, linestyle="--", **dots)
        dice_ax.plot(epochs, run.series("mean_fg_dice"), color=c, linewidth=1.0, linestyle=":", alpha=0.9)
        dice_ax.plot(epochs, run.series("ema_fg_dice"), color=c, linewidth=1.6, **dots)
        lr_ax.plot(epochs, run.series("lr"), color=c, linewidth=1.4, **dots)
    for ax in (loss_ax, dice_ax, lr_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    dice_ax.set_ylim(0, 1.02)
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_ax.yaxis.get_offset_text().set_fontsize(8)
    folds = [Line2D([], [], color=colour(i), linewidth=2, label=f"fold {r.fold}") for i, r in enumerate(runs)]
    styles = [Line2D([], [], color="#555", linewidth=1.4, label="train loss / Dice EMA"),
              Line2D([], [], color="#555", linewidth=1.4, linestyle="--", label="validation loss"),
              Line2D([], [], color="#555", linewidth=1.0, linestyle=":", label="pseudo Dice per epoch")]
    fig.legend(handles=folds + styles, loc="lower center", ncol=min(len(folds) + 3, 8), fontsize=8.5,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return to_data_uri(fig)


def dice_boxes(entries: Sequence[CVEntry], classes: Sequence[str]) -> str:
    """Per class, a box of the per-case Dice of each configuration or ensemble, with the cases as dots."""
    per_row = min(len(classes), 3)
    rows = math.ceil(len(classes) / per_row)
    width = min(max(3.2 + 0.9 * len(entries), 4.0) * per_row, 11.5)
    fig = _new(width, 3.4 * rows + 0.5)
    axes = np.atleast_1d(fig.subplots(rows, per_row, squeeze=False).ravel())
    for ax, cls in zip(axes, classes, strict=False):
        _style(ax, cls, ylabel="Dice")
        data = [[v for v in e.class_values(cls) if not math.isnan(v)] for e in entries]
        positions = list(range(1, len(entries) + 1))
        kept = [(p, d) for p, d in zip(positions, data, strict=True) if d]
        if kept:
            box = ax.boxplot([d for _, d in kept], positions=[p for p, _ in kept], widths=0.55, patch_artist=True,
                             showfliers=False, medianprops={"color": "#222", "linewidth": 1.4})
            for patch, (p, _) in zip(box["boxes"], kept, strict=True):
                patch.set_facecolor(colour(p - 1))
                patch.set_alpha(0.35)
        for p, d in kept:
            offsets = np.linspace(-0.16, 0.16, len(d)) if len(d) > 1 else np.zeros(1)
            ax.scatter(p + offsets, d, s=22, color=colour(p - 1), edgecolor="#222", linewidth=0.6, zorder=3)
        ax.set_xticks(positions)
        ax.set_xticklabels([_wrap(e.label) for e in entries], fontsize=8)
        ax.set_xlim(0.4, len(entries) + 0.6)
        low = min((min(d) for d in data if d), default=0.0)
        ax.set_ylim(max(0.0, min(low - 0.05, 0.9)) if low > 0.5 else 0.0, 1.01)
    for ax in axes[len(classes):]:
        ax.set_visible(False)
    fig.tight_layout()
    return to_data_uri(fig)


def _wrap(label: str) -> str:
    return label.replace(" + ", " +\n")


def _window(image: np.ndarray) -> tuple[float, float]:
    values = image[image != 0] if np.count_nonzero(image) > 16 else image.ravel()
    lo, hi = (float(v) for v in np.percentile(values, (0.5, 99.5))) if values.size else (0.0, 1.0)
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _overlay(ax, view: CaseView, masks: Mapping[str, np.ndarray], classes: Sequence[str]) -> None:  # noqa: ANN001
    for i, name in enumerate(classes):
        m = masks.get(name)
        if m is None or not m.any():
            continue
        rgba = np.zeros((*m.shape, 4), dtype=np.float32)
        rgba[m] = (*_rgb(colour(i)), 0.28)
        ax.imshow(rgba, aspect=view.aspect, interpolation="nearest")
        if min(m.shape) >= 2:
            ax.contour(m.astype(np.float32), levels=[0.5], colors=[colour(i)], linewidths=1.3)


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]


def case_panels(view: CaseView, classes: Sequence[str], channel: str, dice: Mapping[str, float]) -> str:
    """Image, reference, prediction and the foreground errors of one case, side by side."""
    fig = _new(11.5, 3.7, layout="constrained")
    axes = fig.subplots(1, 4)
    height, width = view.image.shape
    lo, hi = _window(view.image)
    titles = (f"image ({channel})", "reference", "prediction", "errors (foreground)")
    for ax, title in zip(axes, titles, strict=True):
        ax.imshow(view.image, cmap="gray", vmin=lo, vmax=hi, aspect=view.aspect, interpolation="bilinear")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, masks in ((axes[1], view.reference), (axes[2], view.prediction)):
        if masks is not None:
            _overlay(ax, view, masks, classes)
    both = view.reference is not None and view.prediction is not None
    if both:
        shape = view.image.shape
        ref = np.logical_or.reduce([*view.reference.values(), np.zeros(shape, dtype=bool)])
        pred = np.logical_or.reduce([*view.prediction.values(), np.zeros(shape, dtype=bool)])
        err = np.zeros((*shape, 4), dtype=np.float32)
        err[pred & ~ref] = (*_rgb(FALSE_POSITIVE), 0.85)
        err[ref & ~pred] = (*_rgb(FALSE_NEGATIVE), 0.85)
        axes[3].imshow(err, aspect=view.aspect, interpolation="nearest")
    for ax, shown in ((axes[1], view.reference is not None), (axes[2], view.prediction is not None), (axes[3], both)):
        if not shown:
            ax.text(0.5, 0.5, "not available", transform=ax.transAxes, ha="center", va="center", color="white",
                    fontsize=10, bbox={"facecolor": "#333", "alpha": 0.7, "edgecolor": "none"})
    for ax in axes:  # contours widen the limits to the pixel centres: keep the image's extent
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
    handles = [Patch(facecolor=colour(i), edgecolor=colour(i), alpha=0.6,
                     label=f"{name} (Dice {dice[name]:.3f})" if name in dice and not math.isnan(dice[name])
                     else name) for i, name in enumerate(classes)]
    handles += [Patch(color=FALSE_POSITIVE, label="predicted, not in reference"),
                Patch(color=FALSE_NEGATIVE, label="in reference, missed")]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5), fontsize=8.5, frameon=False)
    return to_data_uri(fig)


def quality_scatter(points: Mapping[str, tuple[list[float], list[float]]], score: str,
                    threshold: float | None) -> str:
    """Per configuration, each CV case's quality ``score`` against its mean Dice; the flag threshold as a line."""
    fig = _new(6.2, 3.8)
    ax = fig.subplots()
    _style(ax, f"{score} vs Dice on the CV cases", score, "mean Dice over classes")
    for i, (name, (x, y)) in enumerate(points.items()):
        ax.scatter(x, y, s=22, color=colour(i), label=name, edgecolor="white", linewidth=0.5)
    if threshold is not None and math.isfinite(threshold):
        ax.axvline(threshold, color="#C0392B", linestyle="--", linewidth=1.2, label=f"flag threshold {threshold:.3f}")
    ax.legend(fontsize=8, frameon=False, loc="lower right")
    fig.tight_layout()
    return to_data_uri(fig)
