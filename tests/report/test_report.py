"""``autoseg report``: the page of a trained work folder, its embedded figures, escaping, robustness against bad
files, degradation before training, determinism and the command line (no browser needed)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from autoseg.cli.report import COMMANDS, add_parsers
from autoseg.data.synthetic import make_synthetic_dataset
from autoseg.io.dataset import load_dataset
from autoseg.io.image import Geometry, write_image, write_label
from autoseg.report import ReportError, render_report, write_report
from autoseg.report.build import CONTENTS
from autoseg.report.cases import load_case_view

IMG = re.compile(r"<img\b[^>]*>")
SRC = re.compile(r'\bsrc="([^"]*)"')


def _section(page: str, anchor: str) -> str:
    return page.split(f'<section id="{anchor}">', 1)[1].split("</section>", 1)[0]


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def _unavailable(page: str, anchor: str) -> bool:
    return "Not available yet" in _section(page, anchor)


def test_trained_work_folder_gives_every_section_with_its_figures(trained_work):
    ds, wd = trained_work
    path = write_report(wd)
    assert path == wd / "report.html"
    page = path.read_text(encoding="utf-8")
    for anchor, title in CONTENTS:
        assert f'<section id="{anchor}">' in page and f'href="#{anchor}"' in page
        assert not _unavailable(page, anchor), f"{title} says it is not available"
    best = json.loads((wd / "selection" / "best.json").read_text())
    cv_cases = json.loads((wd / "selection" / "cv_summary.json").read_text())["cases"]
    chosen = best["name"] + (" + postprocessing" if best["postprocessing"] else "")
    assert f"<td>{chosen} \u2190 chosen</td>" in page
    assert all(c in _section(page, "worst") for c in cv_cases)
    assert "whole_tumor" in page and "enhancing_tumor" in page  # the region classes of the fingerprint and CV
    # training curves (one configuration), Dice box plots, one overlay per worst case (3 CV cases) and the
    # quality scatter plot
    assert len(IMG.findall(page)) == 1 + 1 + len(cv_cases) + 1
    assert page.count("<figcaption>case_") == len(cv_cases)


def test_every_image_is_an_embedded_png_and_nothing_is_external(trained_work):
    _, wd = trained_work
    page = render_report(wd, generated="now")
    tags = IMG.findall(page)
    assert tags
    for t in tags:
        src = SRC.search(t).group(1)
        assert src.startswith("data:image/png;base64,")
        raw = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(io.BytesIO(raw)) as im:
            im.verify()
        with Image.open(io.BytesIO(raw)) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    lowered = page.lower()
    for bad in ("<script", "<link", "<iframe", "<object", "<embed", "@import", "url(", "http://", "https://"):
        assert bad not in lowered, bad
    refs = re.findall(r'\b(?:src|href|action|poster)\s*=\s*"([^"]*)"', page)
    assert refs and all(r.startswith(("data:", "#")) for r in refs)


def test_text_from_files_is_html_escaped(work_copy):
    _, wd = work_copy
    plans = json.loads((wd / "plans.json").read_text())
    plans["decisions"].append('<script>alert("x")</script> & <b>bold</b>')
    (wd / "plans.json").write_text(json.dumps(plans))
    page = render_report(wd)
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page


def test_malformed_files_give_a_note_in_their_section_not_a_failure(work_copy):
    _, wd = work_copy
    (wd / "fingerprint.json").write_text('{"dataset_name": "x", ')  # truncated
    (wd / "selection" / "cv_summary.json").write_text("not json")
    (wd / "selection" / "best.json").write_text("[1, 2]")
    (wd / "selection" / "quality.json").write_text('{"score": "combined"}')
    log = wd / "models" / "3d_fullres" / "fold_0" / "log.jsonl"
    log.write_text(log.read_text() + '{"epoch": 7, "train_lo\n')
    (wd / "models" / "3d_fullres" / "fold_1" / "val" / "quality.json").write_text('{"cases": [1]}')
    page = render_report(wd)
    for anchor, _ in CONTENTS:
        assert f'<section id="{anchor}">' in page
    notes = re.findall(r'<p class="note">(.*?)</p>', page)
    for name in ("fingerprint.json", "selection/cv_summary.json", "selection/best.json", "selection/quality.json",
                 "fold_0/log.jsonl", "fold_1/val/quality.json"):
        assert any(name in n for n in notes), name
    # with find-best's summary unreadable, cross-validation falls back to the folds' validation summaries
    cv = _section(page, "cv")
    assert "3d_fullres (folds 0, 1)" in cv and "Not available yet" in cv and "autoseg find-best" in _text(cv)


def test_work_folder_with_only_plans_says_what_to_run_next(work_copy, tmp_path):
    _, full = work_copy
    wd = tmp_path / "planned"
    wd.mkdir()
    for name in ("fingerprint.json", "plans.json", "source.json", "dataset.json"):
        shutil.copy(full / name, wd / name)
    page = render_report(wd)
    assert not _unavailable(page, "fingerprint") and not _unavailable(page, "plans")
    for anchor in ("training", "cv", "selection", "worst", "quality"):
        assert _unavailable(page, anchor), anchor
    assert "autoseg train" in _text(_section(page, "training"))
    assert "autoseg find-best" in _text(_section(page, "selection"))
    assert "Next step: autoseg train" in _text(page)
    assert '<p class="note">' not in page
    assert IMG.findall(page) == []


def test_report_is_deterministic_apart_from_the_timestamp(trained_work, tmp_path):
    _, wd = trained_work
    a = write_report(wd, tmp_path / "a.html").read_text(encoding="utf-8")
    b = write_report(wd, tmp_path / "b.html").read_text(encoding="utf-8")
    stamp = re.compile(r'<span id="generated">[^<]*</span>')
    assert len(stamp.findall(a)) == 1
    assert stamp.sub("", a) == stamp.sub("", b)


def test_images_come_from_the_dataset_named_by_source_json_or_dataset(work_copy, tmp_path):
    ds, wd = work_copy
    (wd / "source.json").write_text(json.dumps({"dataset": str(tmp_path / "moved")}))
    page = render_report(wd)
    worst = _section(page, "worst")
    assert "<img" not in worst and "pass --dataset" in worst
    assert _section(render_report(wd, dataset=ds.root), "worst").count("<img") == 3
    assert _section(render_report(wd, dataset=ds.root, max_cases=1), "worst").count("<img") == 1


def test_bad_arguments_raise_a_clear_error(trained_work, tmp_path):
    _, wd = trained_work
    with pytest.raises(ReportError, match="work folder not found"):
        write_report(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not an autoseg work folder"):
        write_report(tmp_path / "empty")
    with pytest.raises(ReportError, match="--dataset"):
        write_report(wd, tmp_path / "r.html", dataset=tmp_path / "nowhere")
    with pytest.raises(ReportError, match="max_cases"):
        write_report(wd, tmp_path / "r.html", max_cases=-1)


def test_cli_writes_the_page_and_prints_its_path(trained_work, tmp_path, capsys):
    _, wd = trained_work
    parser = argparse.ArgumentParser(prog="autoseg")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "page.html"
    args = parser.parse_args(["report", "--workdir", str(wd), "-o", str(out), "--max-cases", "1"])
    assert COMMANDS[args.command](args) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text(encoding="utf-8").count("<figcaption>case_") == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["report", "--workdir", str(wd), "--bogus"])


def test_case_view_cuts_the_slice_with_most_foreground_across_the_coarsest_axis(tmp_path):
    image = np.random.default_rng(0).normal(100, 10, (12, 40, 40)).astype(np.float32)
    ref = np.zeros((12, 40, 40), np.uint8)
    ref[3:6, 10:20, 10:20] = 1
    ref[4, 8:22, 8:22] = 1  # the largest cross-section is slice 4
    pred = np.zeros_like(ref)
    pred[4, 12:18, 12:18] = 1
    geometry = Geometry.from_array_spacing((3.0, 0.8, 0.8))
    write_image(tmp_path / "c_0000.nii.gz", image[None], geometry)
    write_label(tmp_path / "ref.nii.gz", ref, geometry)
    write_label(tmp_path / "pred.nii.gz", pred, geometry)
    view = load_case_view("c", tmp_path / "c_0000.nii.gz", tmp_path / "ref.nii.gz", tmp_path / "pred.nii.gz",
                          {"lesion": 1})
    assert view.where == "slice 5 of 12 along axis 0" and not view.problems
    assert view.reference["lesion"].sum() == 14 * 14 and view.prediction["lesion"].sum() == 36
    assert view.image.shape == view.reference["lesion"].shape and view.aspect == pytest.approx(1.0)
    # a missing prediction is reported, the rest still shown
    view = load_case_view("c", tmp_path / "c_0000.nii.gz", tmp_path / "ref.nii.gz", tmp_path / "none.nii.gz",
                          {"lesion": 1})
    assert view.prediction is None and view.problems == ["no prediction file for c"]


def test_case_view_of_a_2d_dataset(tmp_path):
    root = make_synthetic_dataset(tmp_path / "Dataset002_Flat", n_cases=1, shape=(1, 48, 48), ndim=2,
                                  kind="binary", seed=3)
    case = load_dataset(root).cases[0]
    view = load_case_view(case.case_id, case.images[0], case.label, case.label, {"lesion": 1})
    assert view.where == "2D image" and view.image.ndim == 2
    assert np.array_equal(view.reference["lesion"], view.prediction["lesion"])
