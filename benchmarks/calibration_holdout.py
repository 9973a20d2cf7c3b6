"""Does a site that calibrates on 40 labelled films per class keep the target sensitivity on the rest?

Screens a labelled split once with the given models, then many times over draws 40 films of
each class (half of a class with fewer than 80): the site's calibration films. It chooses the
referral threshold on them exactly as `cxrbatch calibrate` does, and measures the sensitivity
and specificity on the films not drawn.
With `--site-head`, each draw also fits a site head on its calibration films (as `cxrbatch
calibrate --site-head` does: threshold on the head's out-of-fold scores; where calibrate would
refuse the head as no better than the bundled score, the draw keeps the bundled score, and the
JSON counts those draws) and measures it on the same films not drawn, beside the bundled score;
both rows report the AUC on those films too.
Prints a table and writes JSON. A measurement of the calibration procedure on data it does not
tune: the models and the threshold rule are fixed before it runs.

    python -m benchmarks.calibration_holdout ../shared/data/cxr --split test \
        --json benchmarks/results/calibration_holdout.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks import run_main
from cxrbatch import sitehead
from cxrbatch.calibration import choose_threshold, specificity_at_target
from cxrbatch.datasets import labelled_images, split_used
from cxrbatch.errors import UsageError
from cxrbatch.metrics import roc_auc
from cxrbatch.models import default_models_dir, load_models
from cxrbatch.pipeline import Screener
from cxrbatch.records import DECIMALS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", type=Path, default=None)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--site-head", action="store_true", help="also fit and measure a site head per draw")
    parser.add_argument(
        "--refuse-worse-at-target",
        action="store_true",
        help="with --site-head: also refuse a head that clears fewer drawn normals at the target than the bundled "
        "score (a rule tried, not adopted)",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gate, classifier = load_models(args.models or default_models_dir(), "cpu")
    images = labelled_images(args.data_dir, args.split)
    screener = Screener(gate, classifier)
    results = list(screener.screen(images.paths))
    ok = np.array([r.referral_score is not None for r in results])
    raw = np.array([r.referral_score or 0.0 for r in results])[ok]  # calibrate chooses on these
    scores = np.round(raw, DECIMALS)  # and refers on the reports' six decimals
    labels = np.array(images.names())[ok]
    abnormal = labels != classifier.spec.negative_label
    feats = None
    if args.site_head:
        import onnx

        from cxrbatch.features import features

        kept = [p for p, good in zip(images.paths, ok, strict=True) if good]
        feats = features(onnx.load(str(classifier.path)), kept, screener)
    rng = np.random.default_rng(20261202)
    refused = 0
    rows: dict[str, list[tuple[float, float, float, float | None]]] = {"bundled score": [], "site head": []}
    for _ in range(args.draws):
        drawn = np.zeros(len(scores), dtype=bool)
        for label in np.unique(labels):
            index = np.flatnonzero(labels == label)
            drawn[rng.choice(index, min(args.per_class, len(index) // 2), replace=False)] = True
        rows["bundled score"].append(_held_out(raw[drawn & abnormal], scores, drawn, abnormal, args.target))
        if feats is not None:  # as calibrate --site-head: a head no better than the bundled score is refused
            try:
                head, oof = sitehead.fit_if_better(feats[drawn], abnormal[drawn], raw[drawn])
                if args.refuse_worse_at_target:  # a rule tried and not adopted (benchmarks/README.md)
                    _refuse_worse_at_target(raw[drawn], oof, abnormal[drawn], args.target)
            except UsageError:
                refused += 1
                rows["site head"].append(rows["bundled score"][-1])  # the site keeps the bundled score
                continue
            head_scores = np.round(head.probability(feats), DECIMALS)
            rows["site head"].append(_held_out(oof[abnormal[drawn]], head_scores, drawn, abnormal, args.target))
    result = {
        "data": args.data_dir.name + (f"/{used}" if (used := split_used(args.data_dir, args.split)) else " (whole)"),
        "classifier": classifier.short_hash,
        "films": {str(label): int((labels == label).sum()) for label in np.unique(labels)},
        "per_class": args.per_class,
        "target": args.target,
        "draws": args.draws,
        "refuse_worse_at_target": bool(args.site_head and args.refuse_worse_at_target),
        **_summary(rows["bundled score"], args.target),
    }
    if rows["site head"]:
        result["site_head"] = {**_summary(rows["site head"], args.target), "refused_draws": refused}
    print(
        f"{'score':<14} {'draws':>6} {'per class':>10} {'target':>7} {'sens median':>12} {'sens p5':>8} "
        f"{'>= target-5':>12} {'spec median':>12} {'AUC median':>11}"
    )
    for name, found in (("bundled score", result), ("site head", result.get("site_head"))):
        if found:
            print(
                f"{name:<14} {args.draws:>6} {args.per_class:>10} {args.target:>7.2f} "
                f"{found['sensitivity_on_the_rest']['median']:>12.3f} {found['sensitivity_on_the_rest']['p5']:>8.3f} "
                f"{found['share_within_5_points']:>12.3f} {found['specificity_on_the_rest']['median']:>12.3f} "
                f"{found['auc_on_the_rest']['median']:>11.3f}"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def _refuse_worse_at_target(bundled: np.ndarray, head: np.ndarray, truth: np.ndarray, target: float) -> None:
    """The tried rule: refuse a head whose specificity at the target is below the bundled score's."""
    if specificity_at_target(head, truth, target) < specificity_at_target(bundled, truth, target):
        raise UsageError("the site head clears fewer of these normal films at the target than the bundled score")


def _held_out(
    chosen_on: np.ndarray, scores: np.ndarray, drawn: np.ndarray, abnormal: np.ndarray, target: float
) -> tuple[float, float, float, float | None]:
    """Threshold chosen on `chosen_on` (the drawn abnormal films' scores); its sensitivity,
    specificity and the scores' AUC on the films not drawn."""
    threshold = choose_threshold(chosen_on, target)
    rest_abnormal, rest_normal = ~drawn & abnormal, ~drawn & ~abnormal
    return (
        threshold,
        float((scores[rest_abnormal] >= threshold).mean()),
        float((scores[rest_normal] < threshold).mean()),
        roc_auc(scores[~drawn], abnormal[~drawn]),
    )


def _summary(rows: list[tuple[float, float, float, float | None]], target: float) -> dict[str, object]:
    sens = np.array([r[1] for r in rows])
    spec = np.array([r[2] for r in rows])
    auc = np.array([r[3] for r in rows if r[3] is not None])
    return {
        "sensitivity_on_the_rest": {"median": float(np.median(sens)), "p5": float(np.percentile(sens, 5))},
        "share_within_5_points": float((sens >= target - 0.05).mean()),
        "share_at_or_above_target": float((sens >= target).mean()),
        "specificity_on_the_rest": {"median": float(np.median(spec)), "p5": float(np.percentile(spec, 5))},
        "auc_on_the_rest": {"median": float(np.median(auc)) if len(auc) else None},
        "threshold": {"median": float(np.median([r[0] for r in rows])), "min": min(r[0] for r in rows)},
    }


if __name__ == "__main__":
    run_main(main)
