"""Classification metrics on integer labels and predictions: plain numpy, no model, no files."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 20261126


def classification_metrics(y: np.ndarray, pred: np.ndarray, k: int, ci: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows = truth)."""
    confusion = _confusion(y, pred, k)
    precision, recall, f1 = _prf(confusion)
    metrics: dict[str, Any] = {
        "n": len(y),
        "accuracy": float(np.trace(confusion) / max(1, confusion.sum())),
        "macro_f1": float(f1.mean()),
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "confusion": confusion.tolist(),
    }
    if ci and len(y):
        metrics["ci95"] = bootstrap_intervals(y, pred, k)
    return metrics


def subset_metrics(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
    """Accuracy, recall of each class present and prediction counts of a subset (one source, one age group)."""
    present = sorted(set(y.tolist()))
    return {
        "n": len(y),
        "accuracy": float((y == pred).mean()),
        "recall": {labels[c]: float((pred[y == c] == c).mean()) for c in present},
        "predicted": {labels[c]: int((pred == c).sum()) for c in range(len(labels)) if (pred == c).any()},
    }


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the `positive` images against the rest (ties
    count half); None when either side is empty. Threshold-free: it tells a better ranking from a
    moved decision boundary."""
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
    resampling images with replacement (fixed seed, so a report is reproducible)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(y)
    samples = rng.integers(0, n, size=(BOOTSTRAP_ROUNDS, n))
    stats = defaultdict(list)
    for idx in samples:
        confusion = _confusion(y[idx], pred[idx], k)
        precision, recall, f1 = _prf(confusion)
        stats["accuracy"].append(np.trace(confusion) / n)
        stats["macro_f1"].append(f1.mean())
        stats["precision"].append(precision)
        stats["recall"].append(recall)
        stats["f1"].append(f1)
    return {name: np.percentile(np.asarray(v), [2.5, 97.5], axis=0).T.tolist() for name, v in stats.items()}


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def _prf(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1 of a confusion matrix; 0 where undefined, never NaN."""
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1
