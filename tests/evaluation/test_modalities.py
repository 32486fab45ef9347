"""Channel-subset evaluation and exact Shapley attribution with a fake 4-channel predictor.

The fake model finds class 1 from channel 0 alone, class 2 only when channels 1 AND 2 are both present,
and ignores channel 3 (noise). So, per case with both classes: v(S) = [0 in S, {1, 2} <= S], and the exact
Shapley values are class 1 -> (1, 0, 0, 0), class 2 -> (0, 0.5, 0.5, 0).
"""

from __future__ import annotations

import csv
import itertools
import json
import math

import numpy as np
import pytest

from autoseg.errors import AutosegError
from autoseg.evaluation.attribution import explain_cases, shapley_values
from autoseg.evaluation.metrics import EvaluationError
from autoseg.evaluation.modalities import all_subsets, evaluate_missing, subset_values

CHANNELS = ("T1", "T2", "FLAIR", "noise")
CLASS_NAMES = ("lesion", "oedema")
CLASSES = (1, 2)


def make_case(seed: int, *, with_class2: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(image (4, 12, 12), reference (12, 12)) for the fake model."""
    rng = np.random.default_rng(seed)
    ref = np.zeros((12, 12), np.uint8)
    ref[1:5, 1:5] = 1
    image = np.zeros((4, 12, 12))
    image[0][ref == 1] = 1.0
    if with_class2:
        ref[6:10, 6:10] = 2
        image[1][ref == 2] = 1.0
        image[2][ref == 2] = 1.0
    image[1, 6:10, 0:3] = 1.0  # channel 1 or 2 alone lights other places: no class 2 without both
    image[2, 0:3, 6:10] = 1.0
    image[3] = rng.random((12, 12))
    return image, ref


class FakeModel:
    """Predict function of one case; records every call."""

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.calls: list[frozenset[int]] = []

    def __call__(self, present: frozenset[int]) -> np.ndarray:
        self.calls.append(present)
        mask = np.array([i in present for i in range(len(self.image))], dtype=np.float64)
        img = self.image * mask[:, None, None]
        out = np.zeros(img.shape[1:], np.uint8)
        out[img[0] > 0.5] = 1
        out[(img[1] > 0.5) & (img[2] > 0.5)] = 2
        return out


def expected_value(subset: frozenset[int]) -> list[float]:
    return [float(0 in subset), float({1, 2} <= subset)]


def random_table(n: int, n_classes: int, seed: int) -> dict[frozenset[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s: rng.random(n_classes) for s in all_subsets(n, include_empty=True)}


# ---------------------------------------------------------------- shapley_values


def test_two_player_game_matches_hand_computation():
    v = {frozenset(): 0.0, frozenset({0}): 0.2, frozenset({1}): 0.4, frozenset({0, 1}): 1.0}
    phi = shapley_values(v, 2)
    # phi_0 = 1/2 (0.2 - 0) + 1/2 (1.0 - 0.4) = 0.4 ; phi_1 = 1/2 (0.4 - 0) + 1/2 (1.0 - 0.2) = 0.6
    np.testing.assert_allclose(phi[:, 0], [0.4, 0.6])
    assert phi.shape == (2, 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_efficiency_on_random_tables(n):
    v = random_table(n, 3, seed=n)
    phi = shapley_values(v, n)
    assert phi.shape == (n, 3)
    np.testing.assert_allclose(phi.sum(axis=0), v[frozenset(range(n))] - v[frozenset()], atol=1e-12)


def test_matches_average_over_player_orders():
    n, v = 4, random_table(4, 2, seed=7)
    brute = np.zeros((n, 2))
    orders = list(itertools.permutations(range(n)))
    for order in orders:
        before: frozenset[int] = frozenset()
        for p in order:
            brute[p] += v[before | {p}] - v[before]
            before = before | {p}
    np.testing.assert_allclose(shapley_values(v, n), brute / len(orders), atol=1e-12)


def test_symmetric_players_share_and_null_player_gets_zero():
    rng = np.random.default_rng(3)
    g = {(k, b): rng.random() for k in range(3) for b in (False, True)}
    # players 0 and 1 are interchangeable, player 3 never changes the value
    v = {s: np.array([g[(len(s & {0, 1}), 2 in s)]]) for s in all_subsets(4, include_empty=True)}
    phi = shapley_values(v, 4)[:, 0]
    assert phi[0] == pytest.approx(phi[1])
    assert phi[3] == pytest.approx(0.0, abs=1e-12)


def test_more_than_five_players_is_refused():
    with pytest.raises(EvaluationError, match=r"2\^n predictions per case.*at most 5 channels"):
        shapley_values(random_table(6, 1, seed=0), 6)


def test_missing_coalition_is_named():
    v = random_table(3, 2, seed=1)
    del v[frozenset({0, 2})]
    with pytest.raises(EvaluationError, match=r"coalition \{0 \(T1\), 2 \(FLAIR\)\} is missing") as err:
        shapley_values(v, 3, player_names=CHANNELS[:3])
    assert isinstance(err.value, AutosegError)
    v = random_table(2, 2, seed=1)
    del v[frozenset()]
    with pytest.raises(EvaluationError, match="no channel"):
        shapley_values(v, 2)


def test_nan_value_and_out_of_range_player_are_refused():
    v = random_table(2, 2, seed=2)
    v[frozenset({1})] = np.array([0.5, math.nan])
    with pytest.raises(EvaluationError, match="both_empty=1.0"):
        shapley_values(v, 2)
    v = random_table(2, 1, seed=2)
    v[frozenset({0, 5})] = np.array([1.0])
    with pytest.raises(EvaluationError, match="n_players=2"):
        shapley_values(v, 2)


# ---------------------------------------------------------------- subset_values


def test_subset_values_predicts_each_subset_once_and_both_empty_convention():
    image, ref = make_case(0, with_class2=False)
    model = FakeModel(image)
    subsets = [{0, 1}, (1, 0), frozenset(), {1}]
    nan_values = subset_values(model, ref, CLASSES, subsets)
    assert model.calls == [frozenset({0, 1}), frozenset(), frozenset({1})]
    assert nan_values[frozenset({0, 1})][0] == 1.0 and math.isnan(nan_values[frozenset({0, 1})][1])
    one_values = subset_values(FakeModel(image), ref, CLASSES, subsets, both_empty=1.0)
    np.testing.assert_array_equal(one_values[frozenset({0, 1})], [1.0, 1.0])
    np.testing.assert_array_equal(one_values[frozenset()], [0.0, 1.0])


def test_subset_values_ignore_label_and_shape_check():
    image, ref = make_case(0)
    ref = ref.copy()
    ref[1:5, 1:3] = 255  # half of class 1 ignored: prediction there does not count
    values = subset_values(FakeModel(image), ref, CLASSES, [{0, 1, 2}], ignore_label=255)
    np.testing.assert_array_equal(values[frozenset({0, 1, 2})], [1.0, 1.0])
    with pytest.raises(EvaluationError, match=r"channels \[0\] has shape \(12, 12\)"):
        subset_values(FakeModel(image), ref[:6], CLASSES, [{0}])


# ---------------------------------------------------------------- explain_cases


def test_explain_cases_exact_values_and_one_prediction_per_coalition():
    models = [FakeModel(make_case(s)[0]) for s in range(3)]
    cases = [(f"c{s}", m, make_case(s)[1]) for s, m in enumerate(models)]
    att = explain_cases(cases, 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    for m in models:
        assert len(m.calls) == 16 and set(m.calls) == set(all_subsets(4, include_empty=True))
    expected = np.array([[1.0, 0.0], [0.0, 0.5], [0.0, 0.5], [0.0, 0.0]])
    for case in att.cases:
        np.testing.assert_allclose(case.shapley, expected, atol=1e-12)
        np.testing.assert_array_equal(case.value_full, [1.0, 1.0])
        np.testing.assert_array_equal(case.value_empty, [0.0, 0.0])
        assert case.reference == "reference"
    np.testing.assert_allclose(att.mean(), expected, atol=1e-12)
    np.testing.assert_allclose(att.std(), 0.0, atol=1e-12)


def test_explain_class_absent_everywhere_counts_as_perfect():
    image, ref = make_case(1, with_class2=False)
    att = explain_cases([("a", FakeModel(image), ref)], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    case = att.cases[0]
    np.testing.assert_array_equal(case.value_full, [1.0, 1.0])
    np.testing.assert_array_equal(case.value_empty, [0.0, 1.0])
    np.testing.assert_allclose(case.shapley[:, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(case.shapley[:, 0], [1.0, 0.0, 0.0, 0.0], atol=1e-12)


def test_explain_without_reference_uses_the_full_prediction():
    image, ref = make_case(2)
    model = FakeModel(image)
    wrong_ref = np.zeros_like(ref)  # with a reference, the model would look bad; without, it matches itself
    att = explain_cases([("own", model, None)], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    assert len(model.calls) == 16 and model.calls[0] == frozenset(range(4))
    case = att.cases[0]
    assert case.reference == "full prediction"
    np.testing.assert_array_equal(case.value_full, [1.0, 1.0])
    np.testing.assert_allclose(case.shapley[:, 1], [0.0, 0.5, 0.5, 0.0], atol=1e-12)
    assert "without reference" in att.format_table()
    scored = explain_cases([("ref", FakeModel(image), wrong_ref)], 4, CHANNELS, CLASS_NAMES, CLASSES,
                           progress=False)
    np.testing.assert_array_equal(scored.cases[0].value_full, [0.0, 0.0])


def test_explain_refuses_six_channels_before_predicting():
    model = FakeModel(np.zeros((6, 4, 4)))
    names = [f"ch{i}" for i in range(6)]
    with pytest.raises(EvaluationError, match="at most 5 channels"):
        explain_cases([("a", model, None)], 6, names, CLASS_NAMES, CLASSES, progress=False)
    assert model.calls == []


def test_explain_names_the_case_of_a_bad_prediction():
    image, ref = make_case(0)
    with pytest.raises(EvaluationError, match="case 'bad'"):
        explain_cases([("bad", FakeModel(image), ref[:5])], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)


def test_attribution_files(tmp_path):
    cases = [(f"c{s}", FakeModel(make_case(s)[0]), make_case(s)[1]) for s in range(2)]
    att = explain_cases(cases, 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    att.write_csv(tmp_path / "attribution.csv")
    att.save(tmp_path / "attribution.json")
    att.plot(tmp_path / "attribution.png")
    rows = list(csv.DictReader((tmp_path / "attribution.csv").open()))
    assert list(rows[0]) == ["case", "class", "channel", "shapley", "value_full", "value_empty"]
    assert len(rows) == 2 * 2 * 4
    row = next(r for r in rows if r["case"] == "c1" and r["class"] == "oedema" and r["channel"] == "FLAIR")
    assert float(row["shapley"]) == pytest.approx(0.5)
    d = json.loads((tmp_path / "attribution.json").read_text())
    assert d["mean"]["lesion"]["T1"] == pytest.approx(1.0)
    assert d["cases"]["c0"]["value_empty"] == {"lesion": 0.0, "oedema": 0.0}
    png = (tmp_path / "attribution.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    table = att.format_table()
    assert "T1" in table and "+0.500 ± 0.000" in table
    single = explain_cases(cases[:1], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    single.plot(tmp_path / "single.png")  # one case: no error bars
    assert (tmp_path / "single.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


# ---------------------------------------------------------------- evaluate_missing


def missing_cases():
    (ia, ra), (ib, rb) = make_case(0), make_case(1, with_class2=False)
    return [("a", FakeModel(ia), ra), ("b", FakeModel(ib), rb)]


def test_evaluate_missing_covers_every_nonempty_subset_once():
    cases = missing_cases()
    summary = evaluate_missing(cases, 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    for _, model, _ in cases:
        assert len(model.calls) == 15 and set(model.calls) == set(all_subsets(4))
        assert frozenset() not in model.calls
    assert len(summary.subsets()) == 15
    for s in summary.subsets():
        np.testing.assert_allclose(summary.mean(s), expected_value(s))  # case b's NaN oedema left out
    assert math.isnan(summary.per_case({0, 1, 2})[1, 1])
    assert summary.foreground_mean(range(4)) == 1.0 and summary.drop(range(4)) == 0.0
    assert summary.one_missing_drop() == {"T1": 0.5, "T2": 0.5, "FLAIR": 0.5, "noise": 0.0}


def test_evaluate_missing_table_order_and_generator_input(capsys):
    summary = evaluate_missing(iter(missing_cases()), 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    lines = summary.format_table().splitlines()
    assert lines[1].split() == ["channels", "lesion", "oedema", "mean", "drop"]
    names = [line.split()[0] for line in lines[3:]]
    assert names[:5] == ["T1+T2+FLAIR+noise", "T1+T2+FLAIR", "T1+T2+noise", "T1+FLAIR+noise", "T2+FLAIR+noise"]
    assert len(names) == 15 and names[-4:] == ["T1", "T2", "FLAIR", "noise"]
    assert lines[4].split()[1:] == ["1.000", "1.000", "1.000", "0.000"]
    evaluate_missing(missing_cases(), 4, CHANNELS, CLASS_NAMES, CLASSES, progress=True)
    assert "30/30" in capsys.readouterr().err


def test_evaluate_missing_files(tmp_path):
    summary = evaluate_missing(missing_cases(), 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    summary.save(tmp_path / "missing.json")
    summary.write_csv(tmp_path / "missing.csv")
    d = json.loads((tmp_path / "missing.json").read_text())
    assert len(d["subsets"]) == 15 and d["subsets"][0]["name"] == "T1+T2+FLAIR+noise"
    assert d["one_missing_drop"]["noise"] == 0.0
    assert d["cases"]["b"]["T1"] == {"lesion": 1.0, "oedema": None}  # NaN stored as null
    assert d["classes"] == {"lesion": 1, "oedema": 2}
    rows = list(csv.DictReader((tmp_path / "missing.csv").open()))
    assert len(rows) == 2 * 15 * 2
    assert {r["dice"] for r in rows if r["case"] == "b" and r["class"] == "oedema"} == {"nan"}


def test_evaluate_missing_input_errors():
    image, ref = make_case(0)
    with pytest.raises(EvaluationError, match="needs one"):
        evaluate_missing([("a", FakeModel(image), None)], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    with pytest.raises(EvaluationError, match="3 channel names"):
        evaluate_missing([("a", FakeModel(image), ref)], 4, CHANNELS[:3], CLASS_NAMES, CLASSES, progress=False)
    with pytest.raises(EvaluationError, match="given twice"):
        evaluate_missing([("a", FakeModel(image), ref)] * 2, 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)
    with pytest.raises(EvaluationError, match="no case"):
        evaluate_missing([], 4, CHANNELS, CLASS_NAMES, CLASSES, progress=False)


def test_one_channel_model_has_no_one_missing_drop():
    ref = make_case(0)[1]
    summary = evaluate_missing([("a", lambda s: np.where(0 in s, ref, 0), ref)], 1, ["T1"], ["lesion"], [1],
                               progress=False)
    assert [sorted(s) for s in summary.subsets()] == [[0]]
    assert math.isnan(summary.one_missing_drop()["T1"])
