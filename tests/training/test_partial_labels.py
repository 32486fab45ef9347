"""Partial annotations: the marginal / masked loss, CV scores that skip unannotated classes, check's coverage,
and a tiny training run on a partially annotated dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from autoseg.errors import DatasetError
from autoseg.evaluation.evaluate import evaluate_pairs
from autoseg.io.annotations import annotated_outputs, read_annotations
from autoseg.io.dataset import load_dataset
from autoseg.io.image import Geometry, read_label, write_label
from autoseg.training.losses import DiceBCELoss, DiceCELoss
from autoseg.training.losses.partial import PartialLabelLoss

LABELS = {"background": 0, "liver": 1, "tumour": 2}


class _CE(torch.nn.Module):
    def forward(self, logits, target):
        return F.cross_entropy(logits, target[:, 0].long())


def test_softmax_marginal_loss_matches_the_hand_worked_formula():
    z = torch.tensor([[0.3, -0.2, 1.1], [0.5, 0.4, -0.7]], dtype=torch.float64)  # 2 samples, 1 voxel, 3 classes
    logits = z.reshape(2, 3, 1, 1, 1).clone().requires_grad_(True)
    target = torch.zeros(2, 1, 1, 1, 1)  # both voxels stored as background
    annotated = torch.tensor([annotated_outputs(LABELS, ["liver"]), annotated_outputs(LABELS, ["liver", "tumour"])])
    loss = PartialLabelLoss(_CE(), regions=False)(logits, target, annotated)
    loss.backward()
    p = torch.softmax(z, dim=1)
    # sample 0 did not annotate the tumour: its background voxel may be tumour, -log(p_bg + p_tumour)
    expected = (-torch.log(p[0, 0] + p[0, 2]) - torch.log(p[1, 0])) / 2
    assert torch.isclose(loss, expected)
    grad = logits.grad.reshape(2, 3)
    # d/dz_tumour of -log(p_bg + p_t) = p_t - p_t / (p_bg + p_t): the split between background and tumour is free
    assert torch.isclose(grad[0, 2], (p[0, 2] - p[0, 2] / (p[0, 0] + p[0, 2])) / 2)
    assert torch.isclose(grad[1, 2], p[1, 2] / 2)  # the annotated sample pushes the tumour down as usual


def test_softmax_dice_ce_never_learns_an_unannotated_class_as_background():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 4)
    target[:, :, :2] = 1  # liver everywhere in the first half, background elsewhere
    annotated = torch.tensor([[True, True, False], [True, True, False]])
    PartialLabelLoss(DiceCELoss(batch_dice=True), regions=False)(logits, target, annotated).backward()
    g = logits.grad
    p = torch.softmax(logits.detach(), dim=1)
    # at a background voxel the gradient wrt the tumour logit only rebalances background + tumour: the tumour's and
    # the background's gradients there are proportional to their shares, with no push away from the tumour
    bg, t = p[:, 0, 2:], p[:, 2, 2:]
    assert torch.allclose(g[:, 2, 2:] * bg, g[:, 0, 2:] * t, atol=1e-7)


def test_sigmoid_regions_are_masked_zero_gradient_from_the_unannotated_case():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    target = (torch.rand(2, 3, 4, 4, 4) > 0.5).float()
    annotated = torch.tensor([[True, True, False], [True, True, True]])
    loss = PartialLabelLoss(DiceBCELoss(batch_dice=False), regions=True)
    loss(logits, target, annotated).backward()
    assert torch.count_nonzero(logits.grad[0, 2]) == 0
    assert torch.count_nonzero(logits.grad[1, 2]) > 0 and torch.count_nonzero(logits.grad[0, 0]) > 0
    # deep-supervision lists and "everything annotated" pass through
    ds = PartialLabelLoss(DiceBCELoss(batch_dice=False), regions=True)
    full = torch.ones(2, 3, dtype=torch.bool)
    assert torch.isclose(ds(logits, target, full), DiceBCELoss(batch_dice=False)(logits, target))


def _dataset(tmp_path, annotated):
    root = tmp_path / "Dataset050_Partial"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    geo = Geometry.identity(3)
    for i in range(3):
        write_label(root / "imagesTr" / f"case_{i}_0000.nii.gz", np.zeros((6, 6, 6), np.uint8), geo)
        seg = np.zeros((6, 6, 6), np.uint8)
        seg[1:3] = 1
        if i == 0:
            seg[4] = 2
        write_label(root / "labelsTr" / f"case_{i}.nii.gz", seg, geo)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 3,
                                                   "file_ending": ".nii.gz", "annotated": annotated}))
    return root


def test_check_prints_annotation_coverage_and_refuses_bad_entries(tmp_path):
    from autoseg.io.check import check_dataset

    report = check_dataset(_dataset(tmp_path / "a", {"case_1": ["liver"], "case_2": ["liver"]}), progress=False)
    assert report.ok and report.coverage == {"liver": 3, "tumour": 1}
    assert "annotation coverage (cases annotated per class): liver 3/3, tumour 1/3" in report.format_table()
    bad = check_dataset(_dataset(tmp_path / "b", {"case_0": ["liver"]}), progress=False)  # case_0 holds tumour
    (p,) = bad.errors
    assert p.case_id == "case_0" and "'tumour'" in p.message
    typo = check_dataset(_dataset(tmp_path / "c", {"case_1": ["tumor"]}), progress=False)
    assert not typo.ok and "did you mean 'tumour'" in typo.errors[0].message


def test_annotations_from_a_sidecar_csv(tmp_path):
    root = _dataset(tmp_path, "annotated.csv")
    (root / "annotated.csv").write_text("case,annotated\ncase_1,liver\ncase_2,liver;tumour\n")
    ds = load_dataset(root)
    assert read_annotations(ds.spec, root, [c.case_id for c in ds.cases]) == {
        "case_1": ("liver",), "case_2": ("liver", "tumour")}
    (root / "annotated.csv").write_text("case,annotated\ncase_9,liver\n")
    with pytest.raises(DatasetError, match="case_9"):
        read_annotations(ds.spec, root, [c.case_id for c in ds.cases])


def test_evaluation_skips_unannotated_classes_instead_of_scoring_zero(tmp_path):
    root = _dataset(tmp_path, {})
    ref = root / "labelsTr" / "case_1.nii.gz"
    pairs = [("case_0", root / "labelsTr" / "case_0.nii.gz", root / "labelsTr" / "case_0.nii.gz"),
             ("case_1", ref, ref)]
    pred = tmp_path / "pred.nii.gz"
    arr = read_label(ref).array.copy()
    arr[5] = 2  # a tumour the reference of case_1 does not hold (not annotated there)
    write_label(pred, arr, read_label(ref).geometry)
    pairs[1] = ("case_1", pred, ref)
    classes = {"liver": 1, "tumour": 2}
    naive = evaluate_pairs(pairs, classes, lesion_wise=False, surface=False, progress=False)
    partial = evaluate_pairs(pairs, classes, lesion_wise=False, surface=False, progress=False,
                             annotated={"case_1": ("liver",)})
    assert naive.mean("dice", "tumour") == pytest.approx(0.5)
    assert partial.mean("dice", "tumour") == pytest.approx(1.0)
    assert np.isnan(partial.cases["case_1"]["tumour"]["dice"])
    assert partial.mean("dice", "liver") == pytest.approx(1.0)


def test_tiny_training_on_partial_labels_runs_end_to_end(tmp_path, monkeypatch):
    from autoseg.api import plan, preprocess, train
    from autoseg.data.synthetic import make_synthetic_dataset
    from tests.conftest import tiny_plans

    root = make_synthetic_dataset(tmp_path / "Dataset051_Brats", n_cases=2, shape=(20, 20, 20), n_channels=2,
                                  regions=True, seed=2)
    partial = ["case_001"]
    for cid in partial:  # the enhancing tumour was not delineated: painted as core
        img = read_label(root / "labelsTr" / f"{cid}.nii.gz")
        write_label(root / "labelsTr" / f"{cid}.nii.gz", np.where(img.array == 3, 2, img.array), img.geometry)
    spec = json.loads((root / "dataset.json").read_text())
    spec["annotated"] = {cid: ["whole_tumor", "tumor_core"] for cid in partial}
    (root / "dataset.json").write_text(json.dumps(spec))
    wd = tmp_path / "work"
    plans = tiny_plans(plan(root, workdir=wd, preset="cpu", progress=False))
    plans.save(wd / "plans.json")
    preprocess(root, ["3d_fullres"], workdir=wd, progress=False)
    seen = []
    forward = PartialLabelLoss.forward

    def spy(self, outputs, targets, annotated=None):
        seen.append(None if annotated is None else annotated.tolist())
        return forward(self, outputs, targets, annotated)

    monkeypatch.setattr(PartialLabelLoss, "forward", spy)
    (res,) = train(root, "3d_fullres", "all", workdir=wd, epochs=1, iters_per_epoch=1, val_iters=1, workers=0,
                   device="cpu", progress=False)
    cases = res.validation["cases"]
    assert all(cases[c]["enhancing_tumor"] is None for c in partial)
    assert cases["case_000"]["whole_tumor"] is not None
    # the mask travelled with the batches: one row per sample, [WT, TC, ET]
    assert seen and all(row in ([True, True, True], [True, True, False]) for batch in seen for row in batch)


def test_merge_example_turns_two_label_sets_into_one_partially_annotated_dataset(tmp_path):
    import runpy
    from pathlib import Path

    from autoseg.io.check import check_dataset

    example = runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "merge_datasets.py"))
    merged = example["merge"](example["_demo"](tmp_path), tmp_path / "Dataset023_Merged")
    spec = json.loads((merged / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "tumour": 1, "core": 2} and spec["numTraining"] == 6
    assert spec["annotated"] == {f"Dataset021_Whole_case_00{i}": ["tumour"] for i in range(3)}
    report = check_dataset(merged, progress=False)
    assert report.ok and report.coverage == {"tumour": 6, "core": 3}
