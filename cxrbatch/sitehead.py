"""A site head: a referral score learnt from a site's own labelled films, on the classifier's features.

The bundled referral score (the bundled referral head of export/referral_head.py, or
1 - P(NORMAL) for a model without one) ranks films from collections the classifier saw well and
a new hospital's poorly (models/README.md, *On a site it never saw*); a threshold alone cannot
mend a ranking. The pooled backbone features carry more than the four-class head reads
from them, so a site with labelled films can fit its own linear score on them:

1. each film's features are scaled to unit length and centred on the calibration films' mean;
2. a ridge regression onto +1 (abnormal) / -1 (normal), solved in its dual form (films are
   fewer than features), with the penalty chosen from `PENALTIES` (relative to the mean squared
   norm of the centred features) by the AUC of out-of-fold scores in `FOLDS` stratified folds;
3. a logistic (Platt) fit of the out-of-fold scores at that penalty maps the ridge score to a
   probability, the `referral_score` the reports show; the head's out-of-fold AUC, which
   `calibrate` holds against the bundled score, is of nested scores (each fold's penalty chosen
   by the other folds), since the chosen penalty's own AUC was chosen on itself.

The out-of-fold probabilities are scores of films the head was not fitted on: calibration
chooses the referral threshold on them (cxrbatch.calibration), so the threshold is not set on
scores the head has already learnt. The head is then refitted on all the films and added to the
graph as the output `site_referral` (N x 1): one unit-length step, one (D x 1) product and a
sigmoid. Everything is numpy and onnx (no TensorFlow, no scikit-learn).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cxrbatch.errors import UsageError
from cxrbatch.features import node, unit_length, unit_length_nodes
from cxrbatch.metrics import roc_auc
from cxrbatch.modelspec import SITE_REFERRAL

OUTPUT = SITE_REFERRAL
PREFIX = "site_head_"  # every node output and initializer the site head adds
PENALTIES = tuple(float(10.0**k) for k in np.arange(-2.0, 4.5, 0.5))
FOLDS = 5
SEED = 20261206


@dataclass(frozen=True)
class SiteHead:
    """A fitted site head: probability = sigmoid(slope * ((unit(x) - mean) . weights + bias) + intercept)."""

    mean: np.ndarray  # (D,) mean unit-length feature of the calibration films
    weights: np.ndarray  # (D,)
    bias: float
    slope: float
    intercept: float
    penalty: float  # the ridge penalty chosen, relative to the mean squared norm of the centred features
    cv_auc: float  # AUC of the nested out-of-fold scores

    def probability(self, feats: np.ndarray) -> np.ndarray:
        """The referral score of each row of pooled features `feats`, as the graph computes it."""
        raw = (unit_length(feats) - self.mean) @ self.weights + self.bias
        return _sigmoid(self.slope * raw + self.intercept)

    def record(self, films: int) -> dict[str, object]:
        """What the calibration record says of the head."""
        return {
            "output": OUTPUT,
            "films": films,
            "features": len(self.weights),
            "penalty": self.penalty,
            "cv_auc": round(self.cv_auc, 6),
            "folds": FOLDS,
            "rule": "ridge regression of +1/-1 on unit-length, centred pooled features; penalty by the AUC of "
            f"{FOLDS}-fold out-of-fold scores; Platt scaling of those scores; threshold chosen on them; cv_auc of "
            "nested out-of-fold scores (each fold's penalty chosen by the others)",
        }


def fit(feats: np.ndarray, abnormal: np.ndarray, seed: int = SEED) -> tuple[SiteHead, np.ndarray]:
    """Fit a site head on pooled features `feats` (N x D) of films labelled `abnormal` (N,), and
    return it with the out-of-fold probability of every film (the scores a threshold is chosen on).

    Among penalties whose out-of-fold AUC ties, the strongest is taken. The out-of-fold scores at
    that penalty are the deployed head's, fold for fold: the threshold and the Platt fit are made
    on them. Their AUC, though, was chosen on itself (it overstated a head with nothing to learn:
    0.568 against a true 0.521, benchmarks/README.md), so the head's `cv_auc`, which `calibrate`
    holds against the bundled score, is of nested scores (`out_of_fold`)."""
    abnormal = np.asarray(abnormal, dtype=bool)
    if min(abnormal.sum(), (~abnormal).sum()) < FOLDS:
        raise UsageError(f"a site head needs at least {FOLDS} abnormal and {FOLDS} normal films")
    unit = unit_length(np.asarray(feats, dtype=np.float64))
    folds = _folds(abnormal, np.random.default_rng(seed))
    best, oof = _best_penalty(unit, abnormal, folds, len(abnormal))
    cv_auc = roc_auc(out_of_fold(unit, abnormal, folds), abnormal) or 0.0
    slope, intercept = platt(oof, abnormal)
    if slope <= 0:
        raise UsageError(
            f"a site head learnt nothing from these films (out-of-fold AUC {cv_auc:.3f}): calibrate without --site-head"
        )
    [(mean, weights, bias)] = _ridge(unit, abnormal, (PENALTIES[best],))
    head = SiteHead(mean, weights, bias, slope, intercept, PENALTIES[best], cv_auc)
    return head, _sigmoid(slope * oof + intercept)


def out_of_fold(unit: np.ndarray, abnormal: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Nested out-of-fold scores: each film's ridge score from a head fitted without its fold, at
    the penalty the other folds choose among themselves; their AUC is not chosen on itself."""
    scores = np.zeros(len(abnormal))
    for k in range(FOLDS):
        held = folds == k
        rest = np.flatnonzero(~held)
        best, _ = _best_penalty(unit[rest], abnormal[rest], folds[rest], len(abnormal))
        [(mean, weights, bias)] = _ridge(unit[rest], abnormal[rest], (PENALTIES[best],), len(abnormal))
        scores[held] = (unit[held] - mean) @ weights + bias
    return scores


def _best_penalty(unit: np.ndarray, abnormal: np.ndarray, folds: np.ndarray, films: int) -> tuple[int, np.ndarray]:
    """The index of the penalty whose cross-validated scores (over the folds present in `folds`)
    rank these films best, the strongest among ties, and those scores. Penalties hold for `films` films."""
    oof = np.zeros((len(PENALTIES), len(abnormal)))
    for k in np.unique(folds):
        held = folds == k
        for i, (mean, weights, bias) in enumerate(_ridge(unit[~held], abnormal[~held], PENALTIES, films)):
            oof[i, held] = (unit[held] - mean) @ weights + bias
    aucs = [roc_auc(row, abnormal) or 0.0 for row in oof]
    best = max(range(len(PENALTIES)), key=lambda i: (aucs[i], i))
    return best, oof[best]


def fit_if_better(feats: np.ndarray, abnormal: np.ndarray, bundled: np.ndarray) -> tuple[SiteHead, np.ndarray]:
    """`fit`, refused (UsageError) where the head's nested out-of-fold scores rank the films no
    better than the `bundled` scores do (scores of a model not fitted on these films): a site like
    the training collections keeps the bundled score."""
    head, oof = fit(feats, abnormal)
    bundled_auc = roc_auc(bundled, np.asarray(abnormal, dtype=bool)) or 0.0
    if head.cv_auc <= bundled_auc:
        raise UsageError(
            f"a site head ranks these films no better than the bundled score (out-of-fold AUC {head.cv_auc:.3f}, "
            f"bundled {bundled_auc:.3f}): calibrate without --site-head"
        )
    return head, oof


def add_to_graph(
    proto: onnx.ModelProto, head: SiteHead, features_name: str, output: str = OUTPUT, prefix: str = PREFIX
) -> None:
    """Append the output `output` (N x 1) computing `head.probability` from `features_name`, its
    nodes and initializers named with `prefix` (a bundled referral head, export/referral_head.py,
    is written the same way under its own names)."""
    graph = proto.graph
    if any(o.name == output for o in graph.output):
        advice = "calibrate the model it was made from" if output == OUTPUT else "add one to a model without"
        raise UsageError(f"the classifier already has a {'site' if output == OUTPUT else 'referral'} head; {advice}")
    unit_nodes, unit = unit_length_nodes(proto, features_name, prefix)
    # slope * ((u - mean) . w + bias) + intercept = (u - mean) . (slope w) + (slope bias + intercept)
    graph.initializer.extend(
        [
            numpy_helper.from_array(head.mean.astype(np.float32)[None, :], prefix + "mean"),
            numpy_helper.from_array((head.slope * head.weights).astype(np.float32)[:, None], prefix + "weights"),
            numpy_helper.from_array(
                np.array([head.slope * head.bias + head.intercept], dtype=np.float32), prefix + "offset"
            ),
        ]
    )
    graph.node.extend(
        [
            *unit_nodes,
            node("Sub", [unit, prefix + "mean"], [prefix + "centred"]),
            node("MatMul", [prefix + "centred", prefix + "weights"], [prefix + "raw"]),
            node("Add", [prefix + "raw", prefix + "offset"], [prefix + "logit"]),
            node("Sigmoid", [prefix + "logit"], [output]),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, [None, 1]))


def _ridge(
    unit: np.ndarray, abnormal: np.ndarray, penalties: tuple[float, ...], films: int | None = None
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Ridge regressions of +1/-1 on the centred rows, one per penalty, from one eigendecomposition:
    of the N x N Gram matrix when films are fewer than features (the dual form), else of the D x D
    scatter matrix. A penalty is relative to the mean squared norm of the centred rows, and holds
    for `films` films (default: the rows): a fold fitted on 4/5 of them gets 4/5 of the penalty,
    so that it is shrunk as much, film for film, as the head refitted on all of them. (With the
    full penalty the folds were shrunk more, their out-of-fold scores were not the refitted
    head's, and a threshold chosen on them missed its sensitivity more often than it promised.)"""
    mean = unit.mean(axis=0)
    centred = unit - mean
    target = np.where(abnormal, 1.0, -1.0)
    bias = float(target.mean())
    residual = target - bias
    n, d = centred.shape
    scale = max(float(np.sum(centred**2)) / n, 1e-12) * n / (films or n)
    dual = n <= d
    values, vectors = np.linalg.eigh(centred @ centred.T if dual else centred.T @ centred)
    values = np.clip(values, 0.0, None)
    projected = vectors.T @ (residual if dual else centred.T @ residual)
    fits = []
    for penalty in penalties:
        solved = vectors @ (projected / (values + penalty * scale))
        fits.append((mean, centred.T @ solved if dual else solved, bias))
    return fits


def _folds(abnormal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fold number per film, each side spread evenly over the folds at random."""
    folds = np.zeros(len(abnormal), dtype=np.int64)
    for side in (True, False):
        index = rng.permutation(np.flatnonzero(abnormal == side))
        folds[index] = np.arange(len(index)) % FOLDS
    return folds


def platt(scores: np.ndarray, abnormal: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """Slope and intercept of the logistic regression of `abnormal` on `scores` (Newton's method on
    standardised scores, with Platt's smoothed targets so that separable scores keep a finite slope)."""
    n_pos, n_neg = int(abnormal.sum()), int((~abnormal).sum())
    target = np.where(abnormal, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    centre, spread = float(scores.mean()), max(float(scores.std()), 1e-12)
    x = np.stack([(scores - centre) / spread, np.ones_like(scores)], axis=1)
    params = np.zeros(2)
    for _ in range(steps):
        p = _sigmoid(x @ params)
        gradient = x.T @ (p - target)
        hessian = x.T @ (x * (p * (1 - p))[:, None]) + 1e-9 * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        params -= step
        if np.abs(step).max() < 1e-10:
            break
    slope = float(params[0]) / spread
    return slope, float(params[1]) - slope * centre


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # = 1 / (1 + exp(-z)), without overflow
