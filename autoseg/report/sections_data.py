"""Report sections about the data and the plans: the dataset fingerprint and the planner's decisions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from autoseg.evaluation.metrics import class_values, classes_from_labels
from autoseg.fingerprint.model import DatasetFingerprint
from autoseg.planner.plans import Plans
from autoseg.report.collect import Loaded
from autoseg.report.html import (
    Markup,
    bullets,
    esc,
    fmt,
    fmt_g,
    key_values,
    note,
    section,
    shape_text,
    table,
    unavailable,
)


def labels_text(labels: dict) -> str:
    """``background 0, whole_tumor 1+2+3, enhancing_tumor 3``."""
    parts = []
    for name, value in labels.items():
        vals = value if isinstance(value, (list, tuple)) else [value]
        parts.append(f"{name} {'+'.join(str(v) for v in vals)}")
    return ", ".join(parts)


def _stats_rows(name: str, values: np.ndarray, digits: int) -> list[str]:
    pct = [np.percentile(values, q, axis=0) for q in (50, 10, 90)]
    return [name, *(shape_text(p, digits) for p in pct), shape_text(values.min(0), digits),
            shape_text(values.max(0), digits)]


def fingerprint_section(fp: Loaded, plan_command: str) -> Markup:
    """Section 1: cases, channels, geometry, intensities and classes of the dataset."""
    title = "1. Dataset fingerprint"
    if not fp.ok:
        body = [note(fp.note)] if fp.note else []
        return section("fingerprint", title, body + [unavailable("the dataset fingerprint (fingerprint.json)",
                                                                 plan_command)])
    f: DatasetFingerprint = fp.value
    if not f.cases:
        return section("fingerprint", title, [note("fingerprint.json lists no cases; rerun `autoseg plan`.")])
    keep = slice(1, None) if f.is_2d else slice(None)  # a 2D dataset is stored with a dummy first axis
    body: list = [key_values([
        ("dataset", f.dataset_name), ("training cases", f"{len(f.cases)}"),
        ("channels", ", ".join(f"{i}: {c}" for i, c in enumerate(f.channel_names))),
        ("dimensionality", "2D" if f.is_2d else "3D"), ("labels", labels_text(f.labels)),
    ])]
    spacing = np.array([c.spacing for c in f.cases], dtype=float)[:, keep]
    shape = np.array([c.shape for c in f.cases], dtype=float)[:, keep]
    crop = np.array([c.shape_after_crop for c in f.cases], dtype=float)[:, keep]
    body.append(Markup("<h3>Geometry</h3>"))
    body.append(table(["", "median", "10th percentile", "90th percentile", "min", "max"],
                      [_stats_rows("spacing (mm)", spacing, 4), _stats_rows("shape (voxels)", shape, 5),
                       _stats_rows("shape after cropping", crop, 5)],
                      caption="Axes in array order (z, y, x). Cropping removes the all-zero border of each case; "
                              f"it keeps {f.median_relative_size_after_cropping:.0%} of a median case's voxels."))
    if f.intensity:
        body.append(Markup("<h3>Intensities</h3>"))
        rows = [[name, *(fmt_g(v, 5) for v in (s.mean, s.std, s.median, s.percentile_00_5, s.percentile_99_5,
                                                 s.min, s.max))]
                for name, s in zip(f.channel_names, f.intensity, strict=False)]
        body.append(table(["channel", "mean", "std", "median", "0.5th pct", "99.5th pct", "min", "max"], rows,
                          numeric=range(1, 8), caption="Over the foreground voxels (label > 0) of all cases, every "
                                                       "case weighted equally; these set CT clipping and "
                                                       "normalisation."))
    body.append(Markup("<h3>Classes</h3>"))
    body.append(_classes_table(f))
    return section("fingerprint", title, body,
                   intro="What the planner knows about the dataset (fingerprint.json, made by `autoseg plan`).")


def _classes_table(f: DatasetFingerprint) -> Markup:
    try:
        classes = classes_from_labels(f.labels)
    except ValueError as err:
        return note(f"fingerprint.json: the labels cannot be read as classes ({err}).")
    total = sum(sum(c.class_voxels.values()) for c in f.cases) or 1
    unit = "pixels" if f.is_2d else "ml"
    rows = []
    for name, spec in classes.items():
        vals = class_values(spec)
        voxels = np.array([sum(c.class_voxels.get(v, 0) for v in vals) for c in f.cases], dtype=float)
        size = voxels if f.is_2d else voxels * np.array([np.prod(c.spacing) for c in f.cases]) / 1000.0
        present = size[voxels > 0]
        comps = [len(c.component_sizes.get(vals[0], ())) for c in f.cases] if len(vals) == 1 else []
        rows.append([name, "+".join(map(str, vals)), f"{int((voxels > 0).sum())} / {len(f.cases)}",
                     fmt_g(float(np.median(present)), 4) if present.size else "\u2013",
                     f"{fmt_g(float(present.min()), 4)} \u2013 {fmt_g(float(present.max()), 4)}" if present.size
                     else "\u2013", f"{voxels.sum() / total:.3%}",
                     fmt_g(float(np.median(comps)), 3) if comps else "\u2013"])
    return table(["class", "labels", "cases with it", f"median size ({unit})", f"range ({unit})", "share of voxels",
                  "components per case (median)"], rows, numeric=range(2, 7),
                 caption="Sizes over the cases that contain the class; a region (several labels) counts their union.")


def _normalisation_text(plan_norm: Sequence) -> str:
    counts = Counter(f"{n.scheme}{' (nonzero mask)' if n.use_mask else ''}" for n in plan_norm)
    return ", ".join(f"{k} \u00d7{v}" if v > 1 else k for k, v in counts.items())


def plans_section(plans: Loaded, plan_command: str) -> Markup:
    """Section 2: one row per configuration, then every planning decision and why."""
    title = "2. Plans and why"
    if not plans.ok:
        body = [note(plans.note)] if plans.note else []
        return section("plans", title, body + [unavailable("the plans (plans.json)", plan_command)])
    p: Plans = plans.value
    plugins = getattr(p, "plugins", ())  # extra input channels or derived labels chosen at planning
    body: list = [key_values([
        ("preset", p.preset), ("GPU memory target", f"{p.gpu_memory_gb:g} GB"), ("seed", str(p.seed)),
        ("axis order", f"{tuple(p.transpose_forward)} (coarsest target spacing first)"),
        ("median spacing", shape_text(p.original_median_spacing, 4)),
        ("median shape after cropping", shape_text(p.original_median_shape, 5)),
        *([("plugins", ", ".join(f"{e.get('name')} ({e.get('kind') or 'plugin'})" for e in plugins))]
          if plugins else []),
    ])]
    rows = []
    for c in p.configurations.values():
        feats = c.topology.features_per_stage
        net = f"{c.topology.n_stages} stages, {feats[0]}\u2192{feats[-1]} features, {c.topology.block}"
        cascade = f"after {c.previous_stage}" if c.previous_stage else (f"feeds {c.next_stage}" if c.next_stage else "")
        rows.append([c.name, shape_text(c.spacing, 4), shape_text(c.median_shape, 5), shape_text(c.patch_size, 5),
                     fmt(c.batch_size), net, _normalisation_text(c.normalization),
                     f"{c.estimated_feature_map_elements / 1e6:.1f}M",
                     f"{c.num_epochs} \u00d7 {c.iterations_per_epoch}", cascade])
    body.append(table(["configuration", "spacing (mm)", "median shape", "patch", "batch", "network", "normalisation",
                       "est. feature maps", "epochs \u00d7 iterations", "cascade"], rows, numeric=(1, 2, 3, 4, 7, 8),
                      caption="Spacings, shapes and patches in the planning axis order. Feature maps: estimated "
                              "elements of one sample, the quantity the patch was fitted to."))
    body.append(Markup("<h3>Dataset-level decisions</h3>"))
    body.append(bullets(p.decisions) or Markup('<p class="na">none recorded</p>'))
    for c in p.configurations.values():
        body.append(Markup(f"<h3>{esc(c.name)}</h3>"))
        body.append(bullets(c.decisions) or Markup('<p class="na">none recorded</p>'))
    return section("plans", title, body,
                   intro=f"Plans for {p.dataset_name} (plans.json): every number the planner chose, then its "
                         "reasons, as `autoseg plan --explain` prints them.")
