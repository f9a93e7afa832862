"""A sweep's answer: intervals, paired and Welch tests, Holm, verdicts and the sentence, against scipy and by hand."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from descent.compare import (
    Replicate,
    answer,
    compare,
    holm,
    interval,
    labels,
    paired_p,
    setting_of,
    welch_p,
)


def replicates(setting, values, paired_by="seed", keys=None, metric="val/acc", sizes=(80, 20), **others):
    """One Replicate per value of `metric`, keyed 0, 1, ... (or by `keys`); `others`: more metrics ("test__acc")."""
    keys = range(len(values)) if keys is None else keys
    n_train, n_test = sizes if paired_by == "fold" else (None, None)
    return [
        Replicate(
            setting=tuple(setting),
            key=key,
            paired_by=paired_by,
            metrics={metric: value, **{name.replace("__", "/"): v[i] for name, v in others.items()}},
            n_train=n_train,
            n_test=n_test,
        )
        for i, (key, value) in enumerate(zip(keys, values, strict=True))
    ]


def by_label(rows):
    return {row["label"]: row for row in rows}


def test_interval_is_the_student_t_interval_of_the_finite_values():
    values = [0.91, 0.87, None, 0.93, math.nan, 0.89]
    x = np.array([0.91, 0.87, 0.93, 0.89])
    half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    got = interval(values)
    assert got.n == 4
    assert got.mean == pytest.approx(x.mean(), rel=1e-12)
    assert got.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert (got.low, got.high) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-12)
    half90 = stats.t.ppf(0.95, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    assert interval(values, confidence=0.9).high == pytest.approx(x.mean() + half90, rel=1e-12)


def test_nadeau_bengio_interval_widens_the_variance_by_the_test_train_ratio():
    x = np.array([0.8, 0.84, 0.78, 0.83, 0.81])
    correction = 0.25
    half = stats.t.ppf(0.975, 4) * math.sqrt(np.var(x, ddof=1) * (1 / 5 + correction))
    got = interval(x, correction=correction)
    assert (got.low, got.high) == pytest.approx((x.mean() - half, x.mean() + half), rel=1e-12)


def test_fewer_than_two_values_have_no_std_and_no_interval():
    assert interval([0.7, None]) == interval([0.7]) == type(interval([0.7]))(1, 0.7, None, None, None)
    assert interval([]) == interval([math.nan]) == type(interval([]))(0, None, None, None, None)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=12), st.floats(0, 1))
def test_an_interval_holds_its_mean_and_widens_with_the_correction(values, correction):
    plain, corrected = interval(values), interval(values, correction=correction)
    assert plain.low <= plain.mean <= plain.high
    assert corrected.low <= plain.low + 1e-12 and corrected.high >= plain.high - 1e-12


@pytest.mark.parametrize("seed", range(5))
def test_paired_p_is_exactly_scipys_ttest_rel(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed
    a, b = rng.normal(0.8, 0.05, n), rng.normal(0.78, 0.05, n)
    assert paired_p(a, b) == stats.ttest_rel(a, b).pvalue


def test_nadeau_bengio_paired_p_matches_a_hand_computation():
    a = np.array([0.82, 0.85, 0.80, 0.84, 0.83])
    b = np.array([0.80, 0.81, 0.80, 0.82, 0.80])
    d, correction = a - b, 20 / 80
    t = d.mean() / math.sqrt(np.var(d, ddof=1) * (1 / len(d) + correction))
    expected = 2 * stats.t.sf(abs(t), len(d) - 1)
    assert paired_p(a, b, correction) == pytest.approx(expected, rel=1e-10)
    assert paired_p(a, b, correction) > paired_p(a, b)


def test_paired_p_is_one_when_every_difference_is_zero_and_zero_when_constant():
    a = [0.9, 0.8, 0.85]
    assert paired_p(a, a) == 1.0
    assert paired_p(a, a, correction=0.25) == 1.0
    assert paired_p([0.5, 0.75, 1.0], [0.25, 0.5, 0.75]) == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # differences equal but for rounding: no cancellation warning from scipy
        assert paired_p([0.8, 0.82, 0.81], [0.9, 0.92, 0.91]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_welch_p_is_scipys_unequal_variance_ttest(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(0.8, 0.01, 4), rng.normal(0.79, 0.05, 6)
    assert welch_p(a, b) == stats.ttest_ind(a, b, equal_var=False).pvalue


def test_welch_p_of_two_constant_samples_is_one_when_equal_else_zero():
    assert welch_p([0.5, 0.5], [0.5, 0.5, 0.5]) == 1.0
    assert welch_p([0.5, 0.5], [0.25, 0.25]) == 0.0


def test_holm_matches_a_worked_example():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_holm_adjusted_is_at_least_raw_at_most_one_and_monotone_in_raw_order(p):
    adjusted = holm(p)
    assert all(raw <= adj <= 1 for raw, adj in zip(p, adjusted, strict=True))
    order = np.argsort(p, kind="stable")
    assert all(adjusted[i] <= adjusted[j] for i, j in itertools.pairwise(order))


def test_a_setting_drops_seed_fold_and_run_keys_but_keeps_the_others():
    overrides = [
        "optimizer=adam",
        "seed=3",
        "++seed=4",
        "cv.fold=2",
        "+model.width=64",
        "data.seed=7",
        "~skip_done",
        "skip_done=true",
        "ckpt_path=a/last.ckpt",
        "hydra.run.dir=out",
        "hydra/launcher=joblib",
        "optimizer.lr=0.1",
    ]
    assert setting_of(overrides) == ("optimizer=adam", "+model.width=64", "data.seed=7", "optimizer.lr=0.1")


def test_identical_settings_are_tied_with_p_one():
    values = [0.9, 0.85, 0.88]
    rows = compare(replicates(["optimizer=adam"], values) + replicates(["optimizer=sgd"], values))
    assert [row["verdict"] for row in rows] == ["best", "tied"]
    assert rows[1]["p_value"] == rows[1]["p_raw"] == 1.0
    assert rows[1]["paired_by"] == "seed"


def test_a_single_replicate_is_never_worse_and_has_no_interval():
    rows = compare(replicates(["optimizer=adam"], [0.95, 0.951, 0.949]) + replicates(["optimizer=sgd"], [0.1]))
    sgd = by_label(rows)["sgd"]
    assert sgd["verdict"] == "cannot be tested (n=1)"
    assert sgd["n"] == 1 and sgd["p_value"] is None and sgd["p_raw"] is None and sgd["paired_by"] is None
    assert sgd["val/acc_mean"] == 0.1
    assert sgd["val/acc_std"] is sgd["val/acc_ci_low"] is sgd["val/acc_ci_high"] is None


def test_nothing_is_tested_against_a_best_of_one_replicate():
    rows = compare(replicates(["optimizer=adam"], [0.99]) + replicates(["optimizer=sgd"], [0.1, 0.11, 0.09]))
    assert [row["verdict"] for row in rows] == ["best", "cannot be tested (n=1)"]
    assert rows[1]["n"] == 3 and rows[1]["p_value"] is None


def test_the_best_is_chosen_on_validation_even_when_test_says_otherwise():
    reps = replicates(["optimizer=adam"], [0.9, 0.91, 0.89], test__acc=[0.5, 0.5, 0.5])
    reps += replicates(["optimizer=sgd"], [0.8, 0.81, 0.79], test__acc=[0.99, 0.99, 0.99])
    rows = compare(reps)
    assert rows[0]["label"] == "adam" and rows[0]["verdict"] == "best"
    assert rows[1]["test/acc_mean"] == pytest.approx(0.99)
    with pytest.raises(ValueError, match="test/acc"):
        compare(reps, metric="test/acc")


def test_a_loss_metric_is_minimized():
    reps = replicates(["optimizer=adam"], [0.3, 0.31, 0.29], metric="val/loss")
    reps += replicates(["optimizer=sgd"], [0.1, 0.12, 0.11], metric="val/loss")
    rows = compare(reps, metric="val/loss")
    assert [row["label"] for row in rows] == ["sgd", "adam"]
    assert rows[0]["verdict"] == "best"
    assert rows[0]["val/loss_mean"] == pytest.approx(0.11)


def test_a_clearly_worse_setting_is_worse():
    rng = np.random.default_rng(0)
    good = 0.9 + rng.normal(0, 0.005, 5)
    bad = good - 0.2 + rng.normal(0, 0.005, 5)
    rows = compare(replicates(["optimizer=sgd"], bad) + replicates(["optimizer=adam"], good))
    assert [row["label"] for row in rows] == ["adam", "sgd"]
    assert rows[1]["verdict"] == "worse" and rows[1]["p_value"] < 0.05
    assert rows[1]["p_raw"] == paired_p(bad, good)


def test_close_settings_are_tied_not_worse():
    rows = compare(replicates(["optimizer=adam"], [0.9, 0.8, 0.85]) + replicates(["optimizer=sgd"], [0.8, 0.88, 0.84]))
    assert rows[1]["verdict"] == "tied" and rows[1]["p_value"] >= 0.05


def test_mismatched_seeds_use_welch():
    best, other = [0.9, 0.92, 0.91], [0.7, 0.75, 0.72]
    rows = compare(replicates(["optimizer=adam"], best) + replicates(["optimizer=sgd"], other, keys=[3, 4, 5]))
    assert rows[1]["paired_by"] == "welch"
    assert rows[1]["p_raw"] == welch_p(other, best)


def test_a_missing_value_breaks_the_pairing_into_welch():
    rows = compare(
        replicates(["optimizer=adam"], [0.9, 0.92, 0.91]) + replicates(["optimizer=sgd"], [0.7, None, 0.72, 0.71])
    )
    assert rows[1]["n"] == 3 and rows[1]["paired_by"] == "welch"


def test_folds_are_paired_with_the_nadeau_bengio_correction():
    best, other = [0.9, 0.86, 0.93, 0.88], [0.85, 0.84, 0.9, 0.86]
    reps = replicates(["model=cnn"], best, paired_by="fold", sizes=(60, 20))
    reps += replicates(["model=mlp"], other, paired_by="fold", sizes=(60, 20))
    rows = compare(reps)
    assert rows[1]["paired_by"] == "fold"
    assert rows[1]["p_raw"] == pytest.approx(paired_p(other, best, correction=20 / 60), rel=1e-12)
    cnn = interval(best, correction=20 / 60)
    assert (rows[0]["val/acc_ci_low"], rows[0]["val/acc_ci_high"]) == pytest.approx((cnn.low, cnn.high), rel=1e-12)


def test_a_fold_needs_its_train_and_test_sizes():
    with pytest.raises(ValueError, match="n_train"):
        Replicate(setting=(), key=0, paired_by="fold", metrics={"val/acc": 0.9})
    with pytest.raises(ValueError, match="paired_by"):
        Replicate(setting=(), key=0, paired_by="replicate", metrics={"val/acc": 0.9})


def test_holm_adjusts_over_the_comparisons_made_only():
    reps = replicates(["optimizer=adam"], [0.9, 0.92, 0.91, 0.93])
    reps += replicates(["optimizer=sgd"], [0.85, 0.9, 0.86, 0.9])
    reps += replicates(["optimizer=rmsprop"], [0.8, 0.91, 0.84, 0.88])
    reps += replicates(["optimizer=adagrad"], [0.5])
    rows = by_label(compare(reps))
    raw = [rows["sgd"]["p_raw"], rows["rmsprop"]["p_raw"]]
    assert [rows["sgd"]["p_value"], rows["rmsprop"]["p_value"]] == holm(raw)
    assert holm(raw) != raw
    assert rows["adagrad"]["p_value"] is None


def test_to_target_counts_the_replicates_that_reached_it():
    reps = replicates(["optimizer=adam"], [0.9, 0.92, 0.91], to_target__seconds=[1.0, None, 3.0])
    reps += replicates(["optimizer=sgd"], [0.8, 0.82, 0.81], to_target__seconds=[None, math.nan, None])
    rows = by_label(compare(reps))
    assert rows["adam"]["to_target/seconds_reached"] == 2
    assert rows["adam"]["to_target/seconds_mean"] == pytest.approx(2.0)
    assert rows["sgd"]["to_target/seconds_reached"] == 0
    assert rows["sgd"]["to_target/seconds_mean"] is None
    assert rows["adam"]["to_target/steps_reached"] == 0
    assert "test/acc_reached" not in rows["adam"]


def test_labels_name_what_varies_between_settings():
    assert labels([("optimizer=adam", "lr=0.1"), ("optimizer=sgd", "lr=0.1")]) == {
        ("optimizer=adam", "lr=0.1"): "adam",
        ("optimizer=sgd", "lr=0.1"): "sgd",
    }
    two = labels([("optimizer=adam", "lr=0.1"), ("optimizer=sgd", "lr=0.01")])
    assert list(two.values()) == ["optimizer=adam lr=0.1", "optimizer=sgd lr=0.01"]
    assert labels([("optimizer=adam",), ()]) == {("optimizer=adam",): "adam", (): "(defaults)"}
    assert labels([("optimizer=adam", "lr=0.1")]) == {("optimizer=adam", "lr=0.1"): "optimizer=adam lr=0.1"}
    keyed = labels([("data.batch_size=32",), ("data.batch_size=full",)])  # a key, not a group: named by its last part
    assert list(keyed.values()) == ["batch_size=32", "batch_size=full"]
    assert labels([()]) == {(): "(defaults)"}


def test_the_answer_says_best_tied_worse_and_untestable():
    base = np.array([0.9, 0.88, 0.91])
    reps = replicates(["optimizer=adam"], base)
    reps += replicates(["optimizer=momentum"], base + np.array([-0.01, 0.008, -0.004]))
    reps += replicates(["optimizer=sgd"], base - np.array([0.2, 0.21, 0.198]))
    reps += replicates(["optimizer=rmsprop"], [0.5])
    rows = compare(reps)
    verdicts = {row["label"]: row["verdict"] for row in rows}
    assert verdicts == {"adam": "best", "momentum": "tied", "sgd": "worse", "rmsprop": "cannot be tested (n=1)"}
    text = answer(rows)
    clauses = text.rstrip(".").split("; ")
    assert text.endswith(".") and len(clauses) == 4
    assert clauses[0].startswith(rows[0]["label"]) and " ± " in clauses[0]
    assert clauses[0].endswith("val/acc (95% CI, n=3): best")
    tied = next(c for c in clauses if c.startswith("momentum"))
    assert tied.endswith(f"tied (p={by_label(rows)['momentum']['p_value']:.2g})")
    assert "better" not in text and "worse" not in tied
    assert next(c for c in clauses if c.startswith("sgd")).split(": ")[1].startswith("worse (p")
    assert clauses[-1] == "rmsprop 0.5 (n=1): cannot be tested (n=1)"


def test_the_answer_rounds_the_mean_to_the_half_width():
    rows = compare(replicates(["optimizer=adam"], [0.985, 0.99, 0.987]) + replicates(["optimizer=sgd"], [0.72]))
    half = (rows[0]["val/acc_ci_high"] - rows[0]["val/acc_ci_low"]) / 2
    assert answer(rows) == (
        f"adam {rows[0]['val/acc_mean']:.3f} ± {float(f'{half:.1g}'):.3f} val/acc (95% CI, n=3): best; "
        "sgd 0.72 (n=1): cannot be tested (n=1)."
    )
