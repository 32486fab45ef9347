"""Cross-validation splits: reproducible, balanced, group-aware; user files are checked."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from autoseg.errors import AutosegError
from autoseg.training.splits import (
    Fold,
    SplitsError,
    fold_cases,
    get_splits,
    load_splits,
    make_splits,
    read_groups,
    save_splits,
)

CASES = [f"case_{i:03d}" for i in range(23)]


def test_same_seed_same_bytes_different_seed_different(tmp_path):
    save_splits(tmp_path / "a.json", make_splits(CASES, seed=7))
    save_splits(tmp_path / "b.json", make_splits(CASES, seed=7))
    save_splits(tmp_path / "c.json", make_splits(CASES, seed=8))
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.json", "b.json", "c.json"))
    assert a == b
    assert a != c


def test_input_order_does_not_matter():
    assert make_splits(CASES) == make_splits(list(reversed(CASES))) == make_splits(sorted(CASES, key=hash))


@pytest.mark.parametrize("n_folds", [2, 3, 5, 23])
def test_every_case_in_one_val_fold_and_sizes_balanced(n_folds):
    folds = make_splits(CASES, n_folds=n_folds)
    assert len(folds) == n_folds
    vals = [c for f in folds for c in f.val]
    assert sorted(vals) == sorted(CASES)
    sizes = [len(f.val) for f in folds]
    assert max(sizes) - min(sizes) <= 1
    for f in folds:
        assert set(f.train) | set(f.val) == set(CASES)
        assert not set(f.train) & set(f.val)
        assert list(f.train) == sorted(f.train) and list(f.val) == sorted(f.val)


def test_groups_never_split_across_train_and_val():
    groups = {c: f"patient_{i // 3}" for i, c in enumerate(CASES)}  # 8 patients, 3 scans each (last has 2)
    folds = make_splits(CASES, n_folds=4, groups=groups)
    assert sorted(c for f in folds for c in f.val) == sorted(CASES)
    for f in folds:
        val_groups = {groups[c] for c in f.val}
        train_groups = {groups[c] for c in f.train}
        assert not val_groups & train_groups
    sizes = [len(f.val) for f in folds]
    assert max(sizes) - min(sizes) <= 3  # at most one group's size apart
    assert make_splits(CASES, n_folds=4, groups=groups) == folds


def test_too_few_cases_or_groups_says_how_many_are_needed():
    with pytest.raises(SplitsError, match=r"at least 5 cases.*has 3.*fewer folds"):
        make_splits(["a", "b", "c"], n_folds=5)
    with pytest.raises(SplitsError, match=r"at least 3 groups.*belong to 2"):
        make_splits(["a", "b", "c", "d"], n_folds=3, groups={"a": "p", "b": "p", "c": "q", "d": "q"})
    with pytest.raises(SplitsError, match="no group"):
        make_splits(["a", "b", "c"], n_folds=2, groups={"a": "p"})
    with pytest.raises(SplitsError, match="duplicated"):
        make_splits(["a", "a", "b"], n_folds=2)
    assert issubclass(SplitsError, AutosegError)


def test_round_trip_and_nnunet_format(tmp_path):
    folds = make_splits(CASES)
    path = tmp_path / "splits.json"
    save_splits(path, folds)
    raw = json.loads(path.read_text())
    assert isinstance(raw, list) and set(raw[0]) == {"train", "val"}
    assert load_splits(path, case_ids=CASES) == folds


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_load_rejects_unknown_ids_with_suggestion(tmp_path):
    path = _write(tmp_path / "splits.json", [{"train": ["case_001", "case_002"], "val": ["case_0003"]}])
    with pytest.raises(SplitsError) as info:
        load_splits(path, case_ids=["case_001", "case_002", "case_003"])
    msg = str(info.value)
    assert str(path) in msg and "'case_0003'" in msg and "did you mean 'case_003'" in msg


def test_load_rejects_overlap_duplicates_and_bad_structure(tmp_path):
    overlap = _write(tmp_path / "overlap.json", [{"train": ["a", "b"], "val": ["b"]}])
    with pytest.raises(SplitsError, match=r"overlap\.json.*both 'train' and 'val'.*'b'"):
        load_splits(overlap)
    dup = _write(tmp_path / "dup.json", [{"train": ["a", "a"], "val": ["b"]}])
    with pytest.raises(SplitsError, match=r"dup\.json.*more than once.*'a'"):
        load_splits(dup)
    for name, obj in [("dict.json", {"train": [], "val": []}), ("keys.json", [{"training": ["a"], "val": []}]),
                      ("types.json", [{"train": "a", "val": []}]), ("empty.json", [])]:
        with pytest.raises(SplitsError, match=name.replace(".", r"\.")):
            load_splits(_write(tmp_path / name, obj))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(SplitsError, match=r"broken\.json.*not valid JSON"):
        load_splits(tmp_path / "broken.json")


def test_load_warns_about_cases_in_no_val_fold(tmp_path):
    path = _write(tmp_path / "splits.json", [{"train": ["a", "b"], "val": ["c"]}])
    with pytest.warns(UserWarning, match=r"in no validation fold.*'a'"):
        load_splits(path, case_ids=["a", "b", "c"])


def test_get_splits_makes_then_keeps_the_file(tmp_path):
    folds = get_splits(tmp_path, CASES, n_folds=3)
    path = tmp_path / "splits.json"
    assert path.exists() and len(folds) == 3
    custom = [Fold(train=tuple(CASES[5:]), val=tuple(CASES[:5])), Fold(train=tuple(CASES[:5]), val=tuple(CASES[5:]))]
    save_splits(path, custom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_splits(tmp_path, CASES, n_folds=5) == custom  # the user's file wins


def test_get_splits_reads_a_groups_table(tmp_path):
    table = tmp_path / "groups.tsv"
    table.write_text("case\tgroup\n" + "".join(f"{c}\tp{i % 6}\n" for i, c in enumerate(CASES)))
    folds = get_splits(tmp_path / "work", CASES, n_folds=3, groups=table)
    groups = read_groups(table)
    for f in folds:
        assert not {groups[c] for c in f.val} & {groups[c] for c in f.train}


def test_read_groups_errors(tmp_path):
    csv_ok = tmp_path / "g.csv"
    csv_ok.write_text("case,group,site\na,p1,x\nb,p1,y\n")
    assert read_groups(csv_ok) == {"a": "p1", "b": "p1"}
    no_col = tmp_path / "nocol.csv"
    no_col.write_text("case,patient\na,p1\n")
    with pytest.raises(SplitsError, match=r"nocol\.csv.*missing column.*group"):
        read_groups(no_col)
    with pytest.raises(SplitsError, match=r"g\.xlsx.*unknown groups table format"):
        read_groups(tmp_path / "g.xlsx")


def test_fold_cases_all_and_bad_fold():
    folds = make_splits(CASES, n_folds=5)
    everything = fold_cases(folds, "all")
    assert everything.train == everything.val == tuple(sorted(CASES))
    assert fold_cases(folds, 2) == folds[2] == fold_cases(folds, "2")
    with pytest.raises(SplitsError, match=r"fold 5 does not exist.*\[0, 1, 2, 3, 4\].*'all'"):
        fold_cases(folds, 5)
    with pytest.raises(SplitsError, match="does not exist"):
        fold_cases(folds, "last")


def test_importing_splits_does_not_import_torch():
    code = "import sys, autoseg.training.splits; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_existing_split_that_leaks_a_group_is_refused(tmp_path):
    ids = [f"c{i}" for i in range(10)]
    get_splits(tmp_path, ids, seed=1)  # made without groups
    groups = {c: "patient_a" if c in ("c0", "c1", "c2", "c3", "c4") else c for c in ids}
    with pytest.raises(SplitsError, match="both train and val"):
        get_splits(tmp_path, ids, groups=groups)
    (tmp_path / "splits.json").unlink()
    folds = get_splits(tmp_path, ids, groups=groups)
    assert all({"c0", "c1", "c2", "c3", "c4"} <= set(f.val) or not {"c0"} & set(f.val) for f in folds)
