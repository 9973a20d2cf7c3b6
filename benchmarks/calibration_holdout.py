"""Does a site that calibrates on 40 labelled films per class keep the target sensitivity on the rest?

Screens a labelled split once with the given models, then many times over draws 40 films of
each class (half of a class with fewer than 80): the site's calibration films. It chooses the
referral threshold on them exactly as `cxrbatch calibrate` does, and measures the sensitivity
and specificity on the films not drawn.
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

from cxrbatch.calibration import choose_threshold
from cxrbatch.datasets import labelled_images
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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gate, classifier = load_models(args.models or default_models_dir(), "cpu")
    images = labelled_images(args.data_dir, args.split)
    results = list(Screener(gate, classifier).screen(images.paths))
    ok = np.array([r.referral_score is not None for r in results])
    raw = np.array([r.referral_score or 0.0 for r in results])[ok]  # calibrate chooses on these
    scores = np.round(raw, DECIMALS)  # and refers on the reports' six decimals
    labels = np.array(images.names())[ok]
    negative = classifier.spec.negative_label
    rng = np.random.default_rng(20261202)
    rows = []
    for _ in range(args.draws):
        drawn = np.zeros(len(scores), dtype=bool)
        for label in np.unique(labels):
            index = np.flatnonzero(labels == label)
            drawn[rng.choice(index, min(args.per_class, len(index) // 2), replace=False)] = True
        abnormal = labels != negative
        threshold = choose_threshold(raw[drawn & abnormal], args.target)
        rest_abnormal, rest_normal = ~drawn & abnormal, ~drawn & ~abnormal
        rows.append(
            (
                threshold,
                float((scores[rest_abnormal] >= threshold).mean()),
                float((scores[rest_normal] < threshold).mean()),
            )
        )
    sens = np.array([r[1] for r in rows])
    spec = np.array([r[2] for r in rows])
    result = {
        "data": f"{args.data_dir.name}/{args.split}",
        "classifier": classifier.short_hash,
        "films": {str(label): int((labels == label).sum()) for label in np.unique(labels)},
        "per_class": args.per_class,
        "target": args.target,
        "draws": args.draws,
        "sensitivity_on_the_rest": {"median": float(np.median(sens)), "p5": float(np.percentile(sens, 5))},
        "share_within_5_points": float((sens >= args.target - 0.05).mean()),
        "share_at_or_above_target": float((sens >= args.target).mean()),
        "specificity_on_the_rest": {"median": float(np.median(spec)), "p5": float(np.percentile(spec, 5))},
        "threshold": {"median": float(np.median([r[0] for r in rows])), "min": min(r[0] for r in rows)},
    }
    print(
        f"{'draws':>6} {'per class':>10} {'target':>7} {'sens median':>12} {'sens p5':>8} "
        f"{'>= target-5':>12} {'spec median':>12}"
    )
    print(
        f"{args.draws:>6} {args.per_class:>10} {args.target:>7.2f} {np.median(sens):>12.3f} "
        f"{np.percentile(sens, 5):>8.3f} {result['share_within_5_points']:>12.3f} {np.median(spec):>12.3f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
