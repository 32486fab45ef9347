"""``predict`` with uncertainty maps, quality scores, drift checks and missing channels, on trained models."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import shutil

import numpy as np
import pytest
import torch

from autoseg.api import predict
from autoseg.cli import main
from autoseg.ensemble.models import ModelEnsemble
from autoseg.inference.predictor import Predictor
from autoseg.io.dataset import load_dataset
from autoseg.io.image import read_image, read_label, write_image
from autoseg.preprocessing.preprocess import read_case


def _rows(folder):
    with open(folder / "quality.csv", newline="") as fh:
        return {r["case"]: r for r in csv.DictReader(fh)}


def test_uncertainty_maps_have_the_input_geometry(trained, tmp_path):
    ds, wd, _ = trained
    plain = predict(ds.root / "imagesTs", tmp_path / "plain", workdir=wd, progress=False, drift=False)
    out = tmp_path / "unc"
    summary = predict(ds.root / "imagesTs", out, workdir=wd, progress=False, uncertainty=True)
    assert summary.quality_table == out / "quality.csv"
    rows = _rows(out)
    for cid in summary.written:
        image = read_image(next((ds.root / "imagesTs").glob(f"{cid}_0000.*")))
        for name in ("entropy", "disagreement"):
            m = read_image(out / "uncertainty" / f"{cid}_{name}{ds.spec.file_ending}")
            assert m.array.shape == image.array.shape
            assert m.geometry.differences(image.geometry) == []
            assert 0 <= m.array.min() and m.array.max() <= 1
        # the segmentation is the usual one (the same network passes, averaged in another order)
        same = read_label(out / f"{cid}{ds.spec.file_ending}").array == read_label(plain.outputs[cid]).array
        assert same.mean() > 0.999
        row = rows[cid]
        assert 0 <= float(row["tta_agreement"]) <= 1 and 0 <= float(row["expected_dice"]) <= 1
        assert row["quality_score"] == row["combined"]  # no learnt rule yet: the default score
        assert float(row["combined"]) == pytest.approx(float(row["expected_dice"]) * float(row["tta_agreement"]),
                                                       abs=1e-3)
    # a rerun skips finished cases, including their maps
    again = predict(ds.root / "imagesTs", out, workdir=wd, progress=False, uncertainty=True)
    assert again.written == [] and len(again.skipped) == len(summary.written)


def test_drift_warning_fires_on_rescaled_intensities_only(trained, tmp_path):
    ds, wd, _ = trained
    src = ds.root / "imagesTs"
    odd = tmp_path / "rescaled"
    odd.mkdir()
    for p in src.iterdir():
        img = read_image(p)
        write_image(odd / p.name, img.array[0] * (10.0 if p.name.startswith("test_000") else 1.0), img.geometry)
    notes: list[str] = []
    predict(src, tmp_path / "normal", workdir=wd, progress=False, on_warning=notes.append)
    assert notes == []
    assert not any(r["flagged"] == "True" for r in _rows(tmp_path / "normal").values())
    predict(odd, tmp_path / "odd", workdir=wd, progress=False, on_warning=notes.append)
    assert notes and all("test_000" in n for n in notes)
    assert any("intensity" in n for n in notes)
    rows = _rows(tmp_path / "odd")
    assert rows["test_000"]["flagged"] == "True" and "intensity" in rows["test_000"]["drift"]
    assert rows["test_001"]["flagged"] == "False"


def test_missing_channel_prediction_runs_for_every_subset(trained, tmp_path):
    ds, wd, plans = trained
    names = list(plans.channel_names)
    src = ds.root / "imagesTs"
    for r in range(1, len(names)):
        for absent in itertools.combinations(range(len(names)), r):
            folder = tmp_path / ("in_" + "_".join(map(str, absent)))
            folder.mkdir()
            for p in src.iterdir():  # the absent channels' files are not there at all
                if not any(p.name.endswith(f"_{i:04d}{ds.spec.file_ending}") for i in absent):
                    shutil.copy(p, folder / p.name)
            out = tmp_path / ("out_" + "_".join(map(str, absent)))
            s = predict(folder, out, workdir=wd, progress=False, missing=[names[i] for i in absent], drift=False)
            assert len(s.written) == 2
            for cid in s.written:
                assert read_label(s.outputs[cid]).array.shape == read_image(next(src.glob(f"{cid}_0000*"))).array.shape[1:]


class Thresholds(torch.nn.Module):
    """A stand-in model that works on clean images: regions where smoothed FLAIR exceeds rising levels.

    The smoothing window is off-centre, so mirrored variants differ where the image is ambiguous.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.nn.functional.avg_pool3d(torch.nn.functional.pad(x[:, :1], (0, 1, 0, 1, 0, 1)), 2, stride=1)
        return torch.cat([20 * (s - 0.3), 20 * (s - 0.9), 20 * (s - 1.5)], 1)


def test_quality_scores_rank_corrupted_inputs_below_clean_ones(trained):
    ds, wd, _ = trained
    base = Predictor.from_workdir(wd, "3d_fullres", folds=[0], device="cpu", amp=False)
    model = ModelEnsemble([dataclasses.replace(base, networks=[Thresholds().eval()])])
    rng = np.random.default_rng(0)

    def scores(images, geometry):
        pre = model.preprocess(images, geometry)
        outputs = model.member_outputs(pre)
        props = [p.properties for p in pre]
        _, probs = model.export([o.logits for o in outputs], props, probabilities=True)
        return model.uncertainty(outputs, props, probs)[0]

    clean, corrupted = [], []
    for case in load_dataset(ds.root).cases:
        images, _, geometry = read_case(case)
        noisy = images + rng.normal(0, 1.0, images.shape).astype(np.float32) * images[images > 0].mean()
        clean.append(scores(images, geometry))
        corrupted.append(scores(np.clip(noisy, 0, None), geometry))
    for name in ("combined", "tta_agreement"):  # the default quality score, and the variants' agreement
        c, b = [s[name] for s in clean], [s[name] for s in corrupted]
        assert np.mean(b) < np.mean(c) - 0.05 and sum(x < y for x, y in zip(b, c, strict=True)) >= len(c) - 1


def test_cli_evaluate_missing_explain_and_measure(trained, tmp_path, capsys):
    ds, wd, plans = trained
    n = len(plans.channel_names)
    assert main(["-q", "evaluate-missing", "--workdir", str(wd), "-i", str(ds.root / "imagesTs"),
                 "-r", str(ds.root / "labelsTs"), "--max-cases", "1", "-o", str(tmp_path / "miss")]) == 0
    saved = json.loads((tmp_path / "miss" / "missing_channels.json").read_text())
    assert "+".join(plans.channel_names) in capsys.readouterr().out
    assert len(saved["subsets"]) == 2 ** n - 1
    assert main(["-q", "explain", "--workdir", str(wd), "-i", str(ds.root / "imagesTs"), "-r",
                 str(ds.root / "labelsTs"), "--max-cases", "1", "-o", str(tmp_path / "why")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "why" / "attribution.csv", newline="")))
    assert len(rows) == n * 3  # channels x classes (3 regions), one case
    for cls in {r["class"] for r in rows}:  # efficiency: the values add up to full minus empty
        mine = [r for r in rows if r["class"] == cls]
        total = sum(float(r["shapley"]) for r in mine)
        assert total == pytest.approx(float(mine[0]["value_full"]) - float(mine[0]["value_empty"]), abs=1e-6)
    assert (tmp_path / "why" / "attribution.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["-q", "measure", str(wd / "models" / "3d_fullres" / "fold_0" / "val"), "--workdir", str(wd),
                 "-o", str(tmp_path / "tables")]) == 0
    volumes = list(csv.DictReader(open(tmp_path / "tables" / "volumes.csv", newline="")))
    assert {r["class"] for r in volumes} == set(json.loads((wd / "dataset.json").read_text())["labels"]) - {
        "background"}
