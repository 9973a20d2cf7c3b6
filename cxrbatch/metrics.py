"""Classification metrics on integer labels and predictions: plain numpy, no model, no files."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 20261126
INTERVAL = 0.95
# A percentile bootstrap over fewer films than this on a side draws only a handful of distinct
# resamples (1 normal and 1 abnormal film: AUC [1, 1]); such statistics get no interval.
MIN_BOOTSTRAP_FILMS = 10
INTERVALS = (
    "95 % intervals: exact binomial (Clopper-Pearson) for shares (accuracy, precision, recall, "
    "sensitivity, specificity); percentile bootstrap (1000 rounds, fixed seed) for F1, macro-F1, AUC "
    f"and the specificity at 90 % sensitivity, given only with at least {MIN_BOOTSTRAP_FILMS} films on each side"
)


def classification_metrics(y: np.ndarray, pred: np.ndarray, k: int, ci: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows = truth).

    A class with no films has no recall or F1 (None), and macro-F1 averages the classes that have
    films: a site's NORMAL/ABNORMAL folders, or a split without one class, are not scored down for
    the classes they do not hold. Precision is None for a class never predicted. Accuracy and
    macro-F1 are None without films."""
    confusion = _confusion(y, pred, k)
    precision, recall, f1 = _prf(confusion)
    metrics: dict[str, Any] = {
        "n": len(y),
        "accuracy": float(np.trace(confusion) / confusion.sum()) if len(y) else None,
        "macro_f1": _mean_of_present(f1),
        "precision": _listed(precision),
        "recall": _listed(recall),
        "f1": _listed(f1),
        "confusion": confusion.tolist(),
    }
    if ci and len(y):
        metrics["ci95"] = class_intervals(y, pred, k)
    return metrics


def class_intervals(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    """The 95 % intervals of `classification_metrics`: exact for accuracy, precision and recall
    (shares of films), bootstrap for F1 and macro-F1; None where a class has no films (recall, F1),
    is never predicted (precision), or has fewer than MIN_BOOTSTRAP_FILMS films (F1, and macro-F1
    when any class with films has so few)."""
    boot = bootstrap_intervals(y, pred, k)
    films = np.bincount(y, minlength=k)
    few = (films > 0) & (films < MIN_BOOTSTRAP_FILMS)
    return {
        "accuracy": list(proportion_ci(y == pred)),
        "macro_f1": None if few.any() else boot["macro_f1"],
        "precision": [list(proportion_ci(y[pred == c] == c)) if (pred == c).any() else None for c in range(k)],
        "recall": [list(proportion_ci(pred[y == c] == c)) if films[c] else None for c in range(k)],
        "f1": [None if few[c] else boot["f1"][c] for c in range(k)],
    }


def _mean_of_present(f1: np.ndarray) -> float | None:
    """Macro-F1: the mean F1 of the classes with films (NaN marks the others); None without any."""
    present = f1[~np.isnan(f1)]
    return float(present.mean()) if len(present) else None


def _listed(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def subset_metrics(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, recall of each class present and prediction counts of a subset (one source, one age
    group). A truth below 0 names no class (a film read only as abnormal): such films count in `n`
    and `predicted`, not in `accuracy` (None when no film of the subset names a class) or `recall`."""
    named = y >= 0
    present = sorted(set(y[named].tolist()))
    return {
        "n": len(y),
        "accuracy": float((y[named] == pred[named]).mean()) if named.any() else None,
        "recall": {labels[c]: float((pred[y == c] == c).mean()) for c in present},
        "predicted": {labels[c]: int((pred == c).sum()) for c in range(len(labels)) if (pred == c).any()},
    }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the `positive` images against the rest (ties
    count half); None when either side is empty. Threshold-free: it tells a better ranking from a
    moved decision boundary."""
    positive = np.asarray(positive, dtype=bool)  # a 0/1 integer mask would index, not select
    if np.isnan(scores).any():
        raise ValueError("roc_auc: a score is NaN, which has no rank")
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct value
    ranks = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def bootstrap_intervals(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    """Percentile 95% intervals of accuracy, macro-F1 and per-class precision/recall/F1 from
    resampling images with replacement within each true class (fixed seed, so a report is
    reproducible). Within each class: a resample that happened to hold no image of a rare class
    would count its recall and F1 as 0, and stretch their intervals down to 0. A class with no
    films has no interval (None); precision's interval is over the resamples that predict the class."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(y)
    members = [np.flatnonzero(y == c) for c in range(k)]
    samples = np.concatenate(
        [m[rng.integers(0, len(m), size=(BOOTSTRAP_ROUNDS, len(m)))] for m in members if len(m)], axis=1
    )
    stats = defaultdict(list)
    for idx in samples:
        confusion = _confusion(y[idx], pred[idx], k)
        precision, recall, f1 = _prf(confusion)
        stats["accuracy"].append(np.trace(confusion) / n)
        stats["macro_f1"].append(_mean_of_present(f1))
        stats["precision"].append(precision)
        stats["recall"].append(recall)
        stats["f1"].append(f1)
    return {name: _intervals(np.asarray(v, dtype=np.float64)) for name, v in stats.items()}


def _intervals(rounds: np.ndarray) -> Any:
    """The 2.5th and 97.5th percentiles over the rounds (axis 0) of each statistic, NaN rounds left
    out; None for a statistic with no defined round."""
    if rounds.ndim == 1:
        return _intervals(rounds[:, None])[0]
    out: list[list[float] | None] = []
    for column in rounds.T:
        defined = column[~np.isnan(column)]
        out.append(np.percentile(defined, [2.5, 97.5]).tolist() if len(defined) else None)
    return out


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _prf(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of a confusion matrix; NaN where undefined: recall and
    F1 of a class with no films, precision of a class never predicted (its F1 is then 0)."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    nan = np.full_like(tp, np.nan)
    precision = np.divide(tp, predicted, out=nan.copy(), where=predicted > 0)
    recall = np.divide(tp, actual, out=nan.copy(), where=actual > 0)
    denom = np.nan_to_num(precision) + recall
    f1 = np.divide(2 * np.nan_to_num(precision) * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    f1[actual == 0] = np.nan
    return precision, recall, f1


TRIAGE_SENSITIVITY = 0.90  # WHO's target for a triage test: sensitivity >= 90 % (with specificity >= 70 %)


def referral_metrics(scores: np.ndarray, abnormal: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """Refer-or-clear metrics of referral `scores` (refer at or above `threshold`) for `abnormal`
    films against normal ones: sensitivity, specificity, ROC AUC, and the specificity at the
    triage sensitivity of 90 %, each with a 95 % interval: exact for sensitivity and specificity,
    percentile bootstrap for the other two, resampling the abnormal and the normal films
    separately (fixed seed) and only with MIN_BOOTSTRAP_FILMS films on each side. A side with no
    films gives None."""
    pos, neg = scores[abnormal], scores[~abnormal]
    point = _referral_point(pos, neg, threshold)
    out: dict[str, Any] = {"n_abnormal": len(pos), "n_normal": len(neg), "threshold": threshold, **point}
    if len(pos) and len(neg):
        out["threshold_at_90_sensitivity"] = _threshold_for(pos, TRIAGE_SENSITIVITY)
    enough = min(len(pos), len(neg)) >= MIN_BOOTSTRAP_FILMS
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    rounds = [
        _referral_point(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)), threshold)
        for _ in range(BOOTSTRAP_ROUNDS if enough else 0)
    ]
    exact = {
        "sensitivity": None if threshold is None or not len(pos) else list(proportion_ci(pos >= threshold)),
        "specificity": None if threshold is None or not len(neg) else list(proportion_ci(neg < threshold)),
    }
    out["ci95"] = {
        name: exact[name]
        if name in exact
        else (None if value is None or not enough else np.percentile([r[name] for r in rounds], [2.5, 97.5]).tolist())
        for name, value in point.items()
    }
    return out


def _referral_point(pos: np.ndarray, neg: np.ndarray, threshold: float | None) -> dict[str, float | None]:
    both = len(pos) > 0 and len(neg) > 0
    at_90 = _threshold_for(pos, TRIAGE_SENSITIVITY) if both else None
    return {
        "sensitivity": float((pos >= threshold).mean()) if threshold is not None and len(pos) else None,
        "specificity": float((neg < threshold).mean()) if threshold is not None and len(neg) else None,
        "auc": roc_auc(np.concatenate([pos, neg]), np.arange(len(pos) + len(neg)) < len(pos)) if both else None,
        "specificity_at_90_sensitivity": float((neg < at_90).mean()) if at_90 is not None else None,
    }


def _threshold_for(pos: np.ndarray, sensitivity: float) -> float:
    """The highest threshold that refers at least `sensitivity` of the abnormal scores `pos`."""
    k = int(np.ceil(sensitivity * len(pos)))
    return float(np.sort(pos)[::-1][k - 1])


def proportion_ci(hits: np.ndarray, confidence: float = INTERVAL) -> tuple[float, float]:
    """The exact (Clopper-Pearson) interval of the share of True in `hits`. A bootstrap's interval
    of a share of all hits is [1, 1], though 60 hits of 60 only show the share is above 0.94 with
    97.5 % confidence; this one says so."""
    n, k = len(hits), int(np.count_nonzero(hits))
    if n == 0:
        return 0.0, 1.0
    half = (1.0 - confidence) / 2
    low = 0.0 if k == 0 else _bisect(lambda p: _tail(n, k, p) >= half)  # the smallest p that makes k hits likely
    high = 1.0 if k == n else _bisect(lambda p: 1.0 - _tail(n, k + 1, p) <= half)
    return low, high


def _tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k)."""
    log_p, log_q = math.log(p), math.log1p(-p)
    terms = (
        math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q
        for j in range(k, n + 1)
    )
    return min(1.0, sum(math.exp(t) for t in terms))


def _bisect(reached: Callable[[float], bool]) -> float:
    """The smallest p in (0, 1) where `reached` (false below it, true above) turns true, to 1e-9."""
    low, high = 1e-12, 1.0 - 1e-12
    while high - low > 1e-9:
        middle = (low + high) / 2
        low, high = (low, middle) if reached(middle) else (middle, high)
    return high


def hypergeometric_at_least(k: int, draws: int, successes: int, population: int) -> float:
    """P(X >= k) for X the successes among `draws` taken without replacement from a population of
    `population` holding `successes`: the one-sided Fisher exact test of a sample against a
    reference, the two pooled (`draws` of them from the sample)."""
    low, high = max(0, draws - (population - successes)), min(draws, successes)
    if k <= low:
        return 1.0
    if k > high:
        return 0.0

    def log_choose(n: int, r: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)

    total = log_choose(population, draws)
    others = population - successes
    terms = [log_choose(successes, x) + log_choose(others, draws - x) - total for x in range(k, high + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))
