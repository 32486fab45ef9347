"""Learnt postprocessing on tiny synthetic CV predictions: removals, sizes in mm3, regions, JSON, folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg.ensemble import learning
from autoseg.ensemble.learning import CasePair, learn_postprocessing
from autoseg.ensemble.postprocessing import PostprocessingRules, postprocess_folder
from autoseg.errors import DatasetError, FileFormatError, ImageReadError, ImageWriteError
from autoseg.io.image import Geometry, read_label, write_label

BRATS = {"whole": (1, 2, 3), "core": (1, 3), "enhancing": (3,)}


def cube(seg, corner, size, value):
    seg[tuple(slice(c, c + size) for c in corner)] = value
    return seg


def organ_case(i, blob=True, shape=(24, 24, 24)):
    """Reference: a 6^3 organ; prediction: the organ with a missed voxel plus (optionally) a detached 2^3 blob."""
    ref = cube(np.zeros(shape, np.uint8), (4 + i % 3, 5, 6), 6, 1)
    pred = ref.copy()
    pred[4 + i % 3, 5, 6] = 0
    if blob:
        cube(pred, (18, 18, 18 - i % 2), 2, 1)
    return pred, ref


def pairs(make, n=4):
    return [CasePair(f"case_{i}", pred=p, ref=r, spacing=(1.0, 1.0, 1.0)) for i, (p, r) in
            ((i, make(i)) for i in range(n))]


def tumour(seg, corner, whole, core, enh):
    """A BraTS-like tumour: edema cube (2) around a core cube (1) around an enhancing cube (3)."""
    cube(seg, corner, whole, 2)
    cube(seg, tuple(c + (whole - core) // 2 for c in corner), core, 1)
    return cube(seg, tuple(c + (whole - enh) // 2 for c in corner), enh, 3)


def test_planted_blobs_are_removed():
    rules = learn_postprocessing(pairs(organ_case), {"organ": (1,)})
    assert any(s["rule"] in ("largest_component_all", "largest_component", "min_size") for s in rules.steps)
    assert rules.after["mean"] > rules.before["mean"]
    assert rules.after["organ"] > rules.before["organ"]
    assert rules.describe() and "CV Dice" in rules.describe()[0]
    pred, ref = organ_case(7)
    out = rules.apply(pred, (1.0, 1.0, 1.0))
    assert out.dtype == pred.dtype and out is not pred
    assert out[18:20, 18:20, 17:19].sum() == 0  # blob gone
    np.testing.assert_array_equal(out[ref == 1][1:], 1)  # organ kept
    assert pred[18, 18, 18] == 1  # input untouched


def test_harmful_rule_is_rejected():
    def two_organs(i):
        ref = cube(cube(np.zeros((24, 24, 24), np.uint8), (2, 2, 2), 6, 1), (14, 14, 14 - i % 2), 4, 1)
        pred = ref.copy()
        pred[2, 2, 2] = 0
        return pred, ref

    rules = learn_postprocessing(pairs(two_organs), {"organ": (1,)})
    assert rules.is_empty
    rejected = [t for t in rules.tried if t["step"]["rule"] in ("largest_component_all", "largest_component")]
    assert len(rejected) == 2 and not any(t["accepted"] for t in rejected)
    assert rejected[0]["after"]["organ"] < rejected[0]["before"]["organ"]
    assert rules.before == rules.after
    assert any("rejected" in line for line in rules.describe(tried=True))
    seg = two_organs(0)[0]
    np.testing.assert_array_equal(rules.apply(seg, (1, 1, 1)), seg)


def test_min_size_threshold_is_in_mm3():
    def case(i):
        """A big and a small real component (so keeping only the largest hurts) plus a 2^3 false positive."""
        ref = cube(cube(np.zeros((24, 24, 24), np.uint8), (2, 2, 2), 6, 1), (14, 2, 2), 3, 1)
        pred = ref.copy()
        pred[2, 2, 2] = 0
        return cube(pred, (18, 18, 16 + i % 3), 2, 1), ref

    rules = learn_postprocessing(pairs(case), {"organ": (1,)})
    assert [s["rule"] for s in rules.steps] == ["min_size"]
    assert 8.0 <= rules.steps[0]["min_volume_mm3"] < 27.0
    # the same 2 mm blob at 0.5 mm spacing is 64 voxels, the 3 mm real component 216 voxels
    fine = cube(cube(np.zeros((48, 48, 48), np.uint8), (4, 4, 4), 6, 1), (36, 36, 36), 4, 1)
    out = rules.apply(fine, (0.5, 0.5, 0.5))
    assert out[36:40, 36:40, 36:40].sum() == 0
    assert (out[4:10, 4:10, 4:10] == 1).all()
    # a 2D image: area in mm2
    flat = cube(cube(np.zeros((1, 30, 30), np.uint8), (0, 2, 2), 9, 1), (0, 20, 20), 2, 1)[0]
    out2 = PostprocessingRules({"organ": (1,)}, ({"rule": "min_size", "class": "organ", "min_volume_mm3": 5.0},)) \
        .apply(flat, (1.0, 1.0))
    assert out2[20:22, 20:22].sum() == 0 and out2[2:11, 2:11].all()


def test_regions_relabel_to_parent():
    seg = tumour(np.zeros((20, 20, 20), np.uint8), (2, 2, 2), 12, 8, 2)
    seg[4, 4, 4] = 3  # a second, one-voxel enhancing component inside the core
    rules = PostprocessingRules(BRATS, ({"rule": "largest_component", "class": "enhancing"},))
    out = rules.apply(seg, (1, 1, 1))
    assert out[4, 4, 4] == 1  # core minus enhancing, not 0
    assert (out[7:9, 7:9, 7:9] == 3).all()
    core = PostprocessingRules(BRATS, ({"rule": "largest_component", "class": "core"},))
    seg2 = cube(seg.copy(), (15, 15, 15), 2, 3)  # a detached enhancing blob: a core component of its own
    assert (core.apply(seg2, (1, 1, 1))[15:17, 15:17, 15:17] == 2).all()
    whole = PostprocessingRules(BRATS, ({"rule": "largest_component", "class": "whole"},))
    assert whole.apply(seg2, (1, 1, 1))[15:17, 15:17, 15:17].sum() == 0


def test_nested_consistency_removes_isolated_enhancing():
    seg = tumour(np.zeros((24, 24, 24), np.uint8), (1, 1, 1), 10, 6, 2)
    cube(seg, (18, 18, 18), 3, 3)  # isolated enhancing blob, no tumour around it
    cube(seg, (14, 1, 1), 5, 2)
    seg[16, 3, 3] = 3  # enhancing inside edema only: leaves core, stays tumour (edema)
    rules = PostprocessingRules(BRATS, ({"rule": "nested_consistency", "class": "enhancing"},))
    out = rules.apply(seg, (1, 1, 1))
    assert out[18:21, 18:21, 18:21].sum() == 0
    assert out[16, 3, 3] == 2
    np.testing.assert_array_equal(out[:12], seg[:12])  # the consistent tumour is untouched


def test_nested_consistency_is_learnt():
    def case(i):
        """A tumour, two small but consistent tumours (so largest-component rules hurt) and an isolated 12-voxel
        enhancing blob, larger than each small tumour (so minimum sizes hurt)."""
        ref = tumour(np.zeros((32, 32, 32), np.uint8), (1, 1, 1), 10, 6, 2)
        for y in (2, 10):  # 8 enhancing voxels, then one core (1) and one edema (2) voxel: 10 voxels in all
            cube(ref, (20, y, 2), 2, 3)
            ref[22, y, 2], ref[23, y, 2] = 1, 2
        pred = ref.copy()
        pred[1, 1, 1] = 0
        pred[24:26, 24:26, 24 + i % 2:27 + i % 2] = 3
        return pred, ref

    rules = learn_postprocessing(pairs(case), BRATS)
    assert [s["rule"] for s in rules.steps] == ["nested_consistency"]
    assert all(rules.after[k] > rules.before[k] for k in BRATS)
    assert not any(t["accepted"] for t in rules.tried if t["step"]["rule"] != "nested_consistency")
    pred, ref = case(5)
    out = rules.apply(pred, (1, 1, 1))
    assert out[24:26, 24:26, 24:28].sum() == 0
    np.testing.assert_array_equal(out[:24], pred[:24])


def test_json_round_trip_and_validation(tmp_path):
    rules = learn_postprocessing(pairs(organ_case), {"organ": (1,)})
    path = tmp_path / "postprocessing.json"
    rules.save(path)
    assert PostprocessingRules.load(path) == rules
    assert PostprocessingRules.from_json(json.loads(json.dumps(rules.to_json()))) == rules
    identity = PostprocessingRules.identity({"organ": 1})
    assert identity.is_empty and PostprocessingRules.from_json(identity.to_json()) == identity
    assert identity.describe() == [] and identity.classes == {"organ": (1,)}
    hand = PostprocessingRules({"organ": [1]}, ({"rule": "min_size", "class": "organ", "min_volume_mm3": 5},))
    assert hand.describe() == ["remove components of organ smaller than 5 mm3"]
    bad = rules.to_json() | {"steps": [{"rule": "dilate", "class": "organ"}]}
    path.write_text(json.dumps(bad))
    with pytest.raises(FileFormatError, match="unknown postprocessing rule 'dilate'"):
        PostprocessingRules.load(path)
    with pytest.raises(FileFormatError, match="lacks min_volume_mm3"):
        PostprocessingRules.from_json(rules.to_json() | {"steps": [{"rule": "min_size", "class": "organ"}]})
    with pytest.raises(FileFormatError, match="not one of"):
        PostprocessingRules.from_json(rules.to_json() | {"steps": [{"rule": "largest_component", "class": "x"}]})
    path.write_text("{not json")
    with pytest.raises(FileFormatError, match="postprocessing.json"):
        PostprocessingRules.load(path)


def test_ignore_label_and_bad_cases():
    def case(i):
        pred, ref = organ_case(i)
        ref[16:22, 16:22, 14:22] = 9  # the blob lies in ignored voxels: it costs nothing
        return pred, ref

    rules = learn_postprocessing(pairs(case), {"organ": (1,)}, ignore_label=9)
    assert rules.is_empty and rules.before["organ"] == rules.after["organ"]
    with pytest.raises(DatasetError, match="case_x: prediction shape"):
        learn_postprocessing([CasePair("case_x", pred=np.zeros((4, 4)), ref=np.zeros((4, 5)))], {"organ": (1,)})
    with pytest.raises(DatasetError, match="no CV cases"):
        learn_postprocessing([], {"organ": (1,)})


def test_learning_from_files_in_parallel(tmp_path, monkeypatch):
    monkeypatch.setattr(learning, "CACHE_BYTES", 0)  # nothing cached: every pass re-reads the files
    cases = []
    for i in range(3):
        pred, ref = organ_case(i)
        geo = Geometry.from_array_spacing((2.0, 1.0, 1.0))
        write_label(tmp_path / f"p{i}.nii.gz", pred, geo)
        write_label(tmp_path / f"r{i}.nii.gz", ref, geo)
        cases.append(CasePair(f"case_{i}", tmp_path / f"p{i}.nii.gz", tmp_path / f"r{i}.nii.gz"))
    from_files = learn_postprocessing(cases, {"organ": (1,)}, jobs=2)
    in_memory = learn_postprocessing([CasePair(c.case_id, pred=read_label(c.pred_path).array,
                                               ref=read_label(c.ref_path).array, spacing=(2.0, 1.0, 1.0))
                                      for c in cases], {"organ": (1,)})
    assert from_files == in_memory and not from_files.is_empty


def test_postprocess_folder(tmp_path):
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    geo = Geometry(spacing=(0.8, 0.9, 2.5), origin=(10.0, -5.0, 3.0), direction=(0, 1, 0, 1, 0, 0, 0, 0, 1))
    for i in range(2):
        write_label(src / f"case_{i}.nii.gz", organ_case(i)[0], geo)
    geo = read_label(src / "case_0.nii.gz").geometry  # as stored (NIfTI keeps float32)
    (src / "notes.txt").write_text("not a segmentation")
    rules = PostprocessingRules({"organ": (1,)}, ({"rule": "largest_component", "class": "organ"},))
    written = postprocess_folder(src, dst, rules, progress=False)
    assert [p.name for p in written] == ["case_0.nii.gz", "case_1.nii.gz"]
    for p in written:
        img = read_label(p)
        assert img.geometry == geo
        assert img.array[18:20, 18:20, 16:20].sum() == 0 and img.array.sum() == 6**3 - 1
    with pytest.raises(ImageWriteError, match="output folder is the input folder"):
        postprocess_folder(src, src, rules, progress=False)
    before = written[0].stat().st_mtime_ns
    postprocess_folder(src, dst, rules, progress=False)
    assert written[0].stat().st_mtime_ns == before  # existing outputs are kept
    (src / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        postprocess_folder(src, dst, rules, progress=False, overwrite=True)
