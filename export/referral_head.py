"""Give a classifier a bundled referral head: abnormal against normal, learnt only from the
differences within each training collection.

1 - P(NORMAL) ranks the films of collections the classifier saw well and a new hospital's poorly
(models/README.md, *On a site it never saw*): the four-class head also learnt which collection a
film comes from, and several collections hold one class only (TBX11K is all TB, CheXpert and JSRT
all normal). The head made here cannot use where a collection sits:

1. the pooled backbone features of the train split's films, scaled to unit length;
2. only collections with at least `MIN_SIDE` normal and `MIN_SIDE` abnormal films, each centred on
   its class-balanced mean (the mean of its normal films' mean and its abnormal films' mean);
3. a class-balanced ridge regression of +1 (abnormal) / -1 (normal) on those rows, with no
   intercept (the classes are balanced over all the rows, not within each collection, so their
   weighted mean is small but not zero: norm 0.009 against rows of norm 0.65 on the shipped
   data; weighting within each collection instead moved the AUC of the NIH and Shenzhen folds by
   at most 0.0015), its penalty (relative to the rows' mean squared norm) from `PENALTIES` by the
   mean AUC within each collection when that collection, and every film of another collection in
   a cluster with one of its films, is left out of the fit;
4. a logistic (Platt) fit on the val split's films maps the score to a probability (and sets
   the offset the regression has none of).

It is written into the graph as the output `referral` (cxrbatch.sitehead.add_to_graph: one
unit-length step, one D x 1 product and a sigmoid), which `cxrbatch run` reports as
`referral_score`. The model loses its referral threshold, which belonged to 1 - P(NORMAL):
`cxrbatch calibrate` on the val split sets the new one, as it set the old. Labels, probabilities
and the familiarity output do not change. Only onnx and onnxruntime are needed (no TensorFlow).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch import sitehead
from cxrbatch.datasets import read_manifest, sources_of
from cxrbatch.errors import ExportError, UsageError
from cxrbatch.features import (
    features,
    open_source,
    pooled_features_name,
    save_classifier,
    training_films,
    unit_length,
)
from cxrbatch.files import check_out
from cxrbatch.metrics import roc_auc
from cxrbatch.models import Model
from cxrbatch.modelspec import BUNDLED_REFERRAL

log = logging.getLogger(__name__)

PREFIX = "referral_head_"  # every node output and initializer the head adds
MIN_SIDE = 10  # normal and abnormal train films a collection needs to take part
PENALTIES = (1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1000.0, 1e5)


def within_collection_rows(
    unit: np.ndarray, abnormal: np.ndarray, collections: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The rows of each collection with both sides (`MIN_SIDE` each), centred on its class-balanced
    mean; films of no named collection ("") take no part."""
    rows = {}
    for name in sorted(set(collections.tolist()) - {""}):
        own = collections == name
        pos, neg = own & abnormal, own & ~abnormal
        if pos.sum() >= MIN_SIDE and neg.sum() >= MIN_SIDE:
            centre = 0.5 * (unit[pos].mean(axis=0) + unit[neg].mean(axis=0))
            rows[str(name)] = (unit[own] - centre, abnormal[own])
    return rows


def ridge(rows: np.ndarray, abnormal: np.ndarray, penalties: tuple[float, ...]) -> list[np.ndarray]:
    """Class-balanced ridge regressions of +1/-1 on `rows`, with no intercept (see the module's
    step 3), one weight vector per penalty, from one eigendecomposition of the weighted scatter matrix."""
    weight = np.where(abnormal, 0.5 / abnormal.mean(), 0.5 / (~abnormal).mean())
    target = np.where(abnormal, 1.0, -1.0)
    scale = float(np.mean(np.sum(rows * rows, axis=1)))
    values, vectors = np.linalg.eigh((rows * weight[:, None]).T @ rows)
    projected = vectors.T @ ((rows * weight[:, None]).T @ target)
    return [vectors @ (projected / (np.clip(values, 0.0, None) + penalty * scale)) for penalty in penalties]


def choose_penalty(
    rows: dict[str, tuple[np.ndarray, np.ndarray]], clusters: dict[str, np.ndarray] | None = None
) -> tuple[float, dict[str, dict[float, float]]]:
    """The penalty with the best mean AUC within each collection, each scored by a fit without it
    and without every film of another collection in a cluster with one of its films (`clusters`:
    each collection's rows' cluster ids; a re-encoded copy under another collection's name would
    otherwise be fitted on and scored); ties go to the stronger penalty. Returns it and every
    collection's AUC at every penalty."""
    if len(rows) < 2:
        raise UsageError(
            f"a referral head needs two collections with {MIN_SIDE} normal and {MIN_SIDE} abnormal train films "
            f"each, found {len(rows)} ({', '.join(rows) or 'none'})"
        )
    aucs: dict[str, dict[float, float]] = {}
    for left_out, (x_out, y_out) in rows.items():
        touched = set((clusters or {}).get(left_out, np.array([])).tolist()) - {""}
        kept = {
            name: ~np.isin(clusters[name], list(touched)) if clusters and touched else np.ones(len(a), dtype=bool)
            for name, (_, a) in rows.items()
            if name != left_out
        }
        x = np.concatenate([rows[name][0][keep] for name, keep in kept.items()])
        y = np.concatenate([rows[name][1][keep] for name, keep in kept.items()])
        if y.all() or not y.any():
            raise UsageError(
                f"nothing is left to fit without the films of {left_out}'s clusters: normal and abnormal films of "
                "other collections are needed"
            )
        fits = ridge(x, y, PENALTIES)
        aucs[left_out] = {p: roc_auc(x_out @ w, y_out) or 0.0 for p, w in zip(PENALTIES, fits, strict=True)}
    means = {p: float(np.mean([a[p] for a in aucs.values()])) for p in PENALTIES}
    best = max(PENALTIES, key=lambda p: (round(means[p], 12), p))
    return best, aucs


def fit_head(
    unit: np.ndarray, abnormal: np.ndarray, collections: np.ndarray, clusters: np.ndarray | None = None
) -> tuple[np.ndarray, float, dict[str, dict[float, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Steps 2 and 3 on unit-length features (`clusters`: each film's cluster id, for the choice
    of penalty): the weights, the penalty, each collection's AUC at every penalty when left out,
    and the centred rows of each collection that took part."""
    rows = within_collection_rows(unit, abnormal, collections)
    by_collection = None if clusters is None else {name: clusters[collections == name] for name in rows}
    penalty, aucs = choose_penalty(rows, by_collection)
    x = np.concatenate([r for r, _ in rows.values()])
    y = np.concatenate([a for _, a in rows.values()])
    return ridge(x, y, (penalty,))[0], penalty, aucs, rows


def add_referral_head(
    src: Path,
    dst: Path,
    data_dir: Path,
    gate: Path,
    exclude_sources: tuple[str, ...] = (),
    version: str | None = None,
) -> dict[str, Any]:
    """Write `dst`: the classifier `src` with a bundled referral head fitted on `data_dir`'s train
    split (its MANIFEST.csv names each film's collection) and Platt-scaled on its val split, less
    `exclude_sources` (as the model's training left them out); return the record it carries."""
    check_out(dst, ".onnx", "DST")
    proto, classifier, screener = open_source(src, gate, "a referral head")
    spec = classifier.spec
    if spec.referral_output:
        raise UsageError(f"{src} already has a referral head ({spec.referral_output}); add one to a model without")
    if not read_manifest(data_dir):  # before any other complaint about the tree: it names the collections
        raise UsageError(f"{data_dir} has no MANIFEST.csv: a referral head needs each film's collection")
    train, val, manifest, exclude_sources = training_films(data_dir, spec, exclude_sources, "a referral head")
    if spec.negative_label not in train.classes:
        raise UsageError(f"{data_dir}/train has no {spec.negative_label} folder: a referral head needs normal films")
    negative = train.classes.index(spec.negative_label)
    if len(set((val.labels != negative).tolist())) < 2:  # Platt scaling and the val AUC need both
        raise UsageError(f"{data_dir / 'val'} needs normal and abnormal films to scale the referral head")
    log.info("referral head: features of %d train and %d val films", len(train.paths), len(val.paths))
    unit = unit_length(features(proto, train.paths, screener))
    collections = np.array(sources_of(train.paths, manifest))
    clusters = np.array([manifest.get(p.stem, {}).get("cluster", "") for p in train.paths])
    weights, penalty, aucs, rows = fit_head(unit, train.labels != negative, collections, clusters)
    val_abnormal = val.labels != negative
    val_raw = unit_length(features(proto, val.paths, screener)) @ weights
    slope, intercept = sitehead.platt(val_raw, val_abnormal)
    if slope <= 0:
        raise ExportError("the referral head ranks the val films backwards (Platt slope <= 0); not written")
    head = sitehead.SiteHead(
        mean=np.zeros_like(weights),
        weights=weights,
        bias=0.0,
        slope=slope,
        intercept=intercept,
        penalty=penalty,
        cv_auc=float(np.mean([a[penalty] for a in aucs.values()])),
    )
    sitehead.add_to_graph(proto, head, pooled_features_name(proto, spec.score_output), BUNDLED_REFERRAL, PREFIX)
    record = {
        "output": BUNDLED_REFERRAL,
        "rule": "class-balanced ridge regression of +1/-1 on unit-length pooled features, each collection centred "
        "on its class-balanced mean; penalty by the mean within-collection AUC with that collection (and the "
        "films of its clusters) left out; "
        "Platt scaling on the val split",
        "collections": {name: {"films": len(a), "abnormal": int(a.sum())} for name, (_, a) in rows.items()},
        "penalty": penalty,
        "left_out_auc": {name: round(a[penalty], 6) for name, a in aucs.items()},
        "val_films": len(val.paths),
        "val_auc": round(roc_auc(val_raw, val_abnormal) or 0.0, 6),  # both sides are there (checked above)
        "data": data_dir.name,
        "excluded_sources": list(exclude_sources),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    meta = spec.to_metadata()
    meta["outputs"]["referral"] = BUNDLED_REFERRAL
    meta["referral_head"] = record
    for stale in ("referral_threshold", "calibration"):  # they belonged to 1 - P(NORMAL)
        meta.pop(stale, None)
    inputs = np.stack([d.classifier_input for batch in screener.decoded_batches(val.paths[:4]) for d in batch])  # type: ignore[misc]
    expected = head.probability(features(proto, val.paths[:4], screener))

    def agrees(written: Model) -> None:  # the written model loads, and agrees with numpy
        if not np.allclose(written.run(inputs)[BUNDLED_REFERRAL][:, 0], expected, rtol=1e-4, atol=1e-5):
            raise ExportError("the referral output of the graph differs from the head it was built from")

    save_classifier(proto, meta, dst, version, agrees)
    return record
