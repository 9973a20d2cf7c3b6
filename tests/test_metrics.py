"""Classification metrics on known confusion matrices and rankings."""

from __future__ import annotations

import numpy as np
import pytest

from cxrbatch.metrics import (
    bootstrap_intervals,
    classification_metrics,
    hypergeometric_at_least,
    roc_auc,
    subset_metrics,
)


def test_metrics_on_a_known_confusion_matrix() -> None:
    # truth 0: 3 right, 1 called 1; truth 1: 2 right; truth 2: 1 right, 1 called 0
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, pred, 3, ci=True)
    assert m["confusion"] == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["recall"] == pytest.approx([0.75, 1.0, 0.5])
    assert m["precision"] == pytest.approx([0.75, 2 / 3, 1.0])
    f1 = [0.75, 0.8, 2 / 3]
    assert m["f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    low, high = m["ci95"]["accuracy"]
    assert low <= m["accuracy"] <= high and high - low > 0


def test_bootstrap_is_reproducible_and_brackets_each_class() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    first, again = bootstrap_intervals(y, pred, 3), bootstrap_intervals(y, pred, 3)
    assert first == again  # fixed seed: the same report twice
    assert len(first["recall"]) == 3 and all(low <= high for low, high in first["recall"])
    assert first["accuracy"][0] <= 0.75 <= first["accuracy"][1]
    perfect = bootstrap_intervals(y, y, 3)
    assert perfect["accuracy"] == [1.0, 1.0] and perfect["macro_f1"][1] == 1.0  # no spread without errors


def test_roc_auc_reads_a_0_1_mask_as_a_mask_and_refuses_nan() -> None:
    scores = np.array([0.9, 0.8, 0.1, 0.2])
    assert roc_auc(scores, np.array([1, 1, 0, 0])) == roc_auc(scores, np.array([True, True, False, False])) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([np.nan, 0.8, 0.1]), np.array([True, False, False]))


def test_a_rare_class_keeps_its_films_in_every_resample() -> None:
    # 3 films of 100 in class 2: resampling all films together left it out of some resamples, whose
    # recall and F1 counted as 0 (a perfect classifier got the interval [0, 1] for its recall).
    y = np.array([0] * 60 + [1] * 37 + [2] * 3)
    perfect = bootstrap_intervals(y, y, 3)
    assert perfect["recall"] == [[1.0, 1.0]] * 3 and perfect["macro_f1"] == [1.0, 1.0]
    pred = y.copy()
    pred[97] = 0  # one of the three missed
    low, high = bootstrap_intervals(y, pred, 3)["recall"][2]
    assert low == 0.0 and high == 1.0 and low < 2 / 3 < high


def test_roc_auc_counts_ordered_pairs_and_half_ties() -> None:
    positive = np.array([True, True, False, False, False])
    # pairs (pos, neg): 0.9 beats all three; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 1 + 0.5) / 6
    assert roc_auc(np.array([0.9, 0.4, 0.4, 0.1, 0.5]), positive) == pytest.approx(4.5 / 6)
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), positive) == 0.0
    assert roc_auc(np.ones(5), positive) == 0.5
    assert roc_auc(np.ones(3), np.array([True, True, True])) is None


def test_a_class_with_no_films_has_no_recall_or_f1_and_is_not_averaged() -> None:
    # All films of one class, all right: macro-F1 was 0.25 with the three absent classes as 0.
    m = classification_metrics(np.array([0, 0, 0]), np.array([0, 0, 0]), 4, ci=True)
    assert m["recall"] == [1.0, None, None, None] and m["f1"] == [1.0, None, None, None]
    assert m["precision"] == [1.0, None, None, None] and m["macro_f1"] == 1.0
    # 3 of 3 right shows a recall above 0.29 at 95 %: the bootstrap said [1, 1]; F1 and macro-F1
    # are bootstrap figures, and three films are too few for one
    assert m["ci95"]["recall"][0] == pytest.approx([0.2924, 1.0], abs=1e-4) and m["ci95"]["recall"][1:] == [None] * 3
    assert m["ci95"]["f1"] == [None] * 4 and m["ci95"]["macro_f1"] is None
    # a class with films never predicted: precision undefined, recall and F1 0 (it counts)
    m = classification_metrics(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), 3)
    assert m["precision"] == [0.5, None, None] and m["recall"] == [1.0, 0.0, None]
    assert m["f1"] == pytest.approx([2 / 3, 0.0, None]) and m["macro_f1"] == pytest.approx(1 / 3)
    empty = classification_metrics(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 2, ci=True)
    assert empty["accuracy"] is None and empty["macro_f1"] is None and "ci95" not in empty


def test_subset_metrics_name_present_classes_and_predictions() -> None:
    labels = ("A", "B", "C")
    m = subset_metrics(np.array([0, 0, 1, 1]), np.array([0, 2, 1, 1]), labels)
    assert m == {"n": 4, "accuracy": 0.75, "recall": {"A": 0.5, "B": 1.0}, "predicted": {"A": 1, "B": 2, "C": 1}}


def test_referral_metrics_on_known_scores() -> None:
    from cxrbatch.metrics import referral_metrics

    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.6, 0.3, 0.1, 0.05])
    abnormal = np.array([True, True, True, True, False, False, False, False])
    m = referral_metrics(scores, abnormal, 0.5)
    assert (m["n_abnormal"], m["n_normal"]) == (4, 4)
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.75  # 0.2 is missed, 0.6 is referred
    assert m["auc"] == pytest.approx(14 / 16)  # pairs: 0.9, 0.8, 0.7 beat all four normals, 0.2 beats 0.1 and 0.05
    assert m["threshold_at_90_sensitivity"] == 0.2  # all 4 abnormal films (ceil(0.9 x 4)) at or above it
    assert m["specificity_at_90_sensitivity"] == 0.5
    # 3 of 4: the exact binomial interval; four films a side are too few for a bootstrap AUC
    assert m["ci95"]["sensitivity"] == pytest.approx([0.1941, 0.9937], abs=1e-4)
    assert m["ci95"]["specificity"] == m["ci95"]["sensitivity"]
    assert m["ci95"]["auc"] is None and m["ci95"]["specificity_at_90_sensitivity"] is None
    only_normal = referral_metrics(scores[4:], abnormal[4:], 0.5)
    assert only_normal["sensitivity"] is None and only_normal["auc"] is None and only_normal["specificity"] == 0.75
    assert referral_metrics(scores, abnormal, None)["sensitivity"] is None


def test_referral_intervals_from_ten_films_a_side_are_bootstrapped_reproducibly() -> None:
    from cxrbatch.metrics import referral_metrics

    rng = np.random.default_rng(5)
    scores = np.concatenate([rng.uniform(0.3, 1.0, 10), rng.uniform(0.0, 0.7, 10)])
    abnormal = np.arange(20) < 10
    m = referral_metrics(scores, abnormal, 0.5)
    low, high = m["ci95"]["auc"]
    assert low < m["auc"] < high or m["auc"] == high == 1.0
    assert high - low > 0.05
    assert referral_metrics(scores, abnormal, 0.5)["ci95"] == m["ci95"]  # a fixed seed
    # one film fewer on one side: no bootstrap interval, exact ones still
    fewer = referral_metrics(scores[1:], abnormal[1:], 0.5)
    assert fewer["ci95"]["auc"] is None and fewer["ci95"]["sensitivity"] is not None


def test_hypergeometric_at_least_is_fishers_one_sided_tail() -> None:
    from math import comb

    for k, draws, successes, population in ((3, 10, 30, 110), (0, 5, 2, 9), (9, 10, 36, 110), (20, 20, 47, 74)):
        low, high = max(0, draws - (population - successes)), min(draws, successes)
        exact = sum(
            comb(successes, x) * comb(population - successes, draws - x) for x in range(max(k, low), high + 1)
        ) / comb(population, draws)
        assert hypergeometric_at_least(k, draws, successes, population) == pytest.approx(exact, rel=1e-9)
    assert hypergeometric_at_least(3, 2, 5, 10) == 0.0 and hypergeometric_at_least(0, 4, 1, 10) == 1.0
