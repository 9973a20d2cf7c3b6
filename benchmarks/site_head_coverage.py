"""How often a site head's threshold keeps the sensitivity it promises, on synthetic features.

`cxrbatch calibrate --site-head` chooses the threshold on out-of-fold scores (5 fold models), then
deploys a head refitted on all the films: the binomial rule's "95 % confidence" holds exactly only
for scores of the scorer that is deployed. This draws calibration sites of known truth (Gaussian
pooled features with an abnormal shift along one direction), fits a head as `calibrate` does,
and measures the deployed head's true sensitivity on 3,000 fresh abnormal films: the share of
sites where it reaches the target is the coverage the rule actually gives. It also sets the
head's two out-of-fold AUCs beside its true one: of the scores at the penalty chosen on them (the
threshold's scores; before 2026-12-07 also the `cv_auc` that `calibrate` holds against the bundled
score) and of nested scores, each fold's penalty chosen by the other folds (`cv_auc` now). Needs
no ../shared and no model.

    python -m benchmarks.site_head_coverage --json benchmarks/results/site_head_coverage.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import run_main
from cxrbatch import sitehead
from cxrbatch.calibration import choose_threshold
from cxrbatch.errors import UsageError
from cxrbatch.metrics import roc_auc

FEATURES = 256
FRESH = 3000
# (abnormal films, normal films, target sensitivity, abnormal shift): a site at the smallest size the
# rule allows for 0.95, a larger one at 0.90, and a site with almost nothing to learn.
SCENARIOS = ((60, 60, 0.95, 0.15), (100, 60, 0.90, 0.10), (100, 60, 0.90, 0.03))


def scenario(abnormal_n: int, normal_n: int, target: float, shift: float, sites: int, seed: int) -> dict[str, Any]:
    """Coverage, mean true sensitivity and AUCs of `sites` calibration sites drawn from one population."""
    rng = np.random.default_rng(seed)
    base = np.abs(rng.normal(size=FEATURES)) + 0.5
    direction = rng.normal(size=FEATURES)
    direction /= np.linalg.norm(direction)

    def draw(n: int, abnormal: bool) -> np.ndarray:
        films = base + 0.5 * rng.normal(size=(n, FEATURES))
        return films + abnormal * shift * 0.5 * np.sqrt(FEATURES) * direction

    kept, sensitivities, cv_aucs, chosen_aucs, true_aucs = [], [], [], [], []
    for site in range(sites):
        feats = np.vstack([draw(abnormal_n, True), draw(normal_n, False)])
        truth = np.r_[np.ones(abnormal_n, bool), np.zeros(normal_n, bool)]
        try:
            head, oof = sitehead.fit(feats, truth, seed=site)
        except UsageError:  # learnt nothing (Platt slope <= 0): calibrate refuses such a head
            continue
        threshold = choose_threshold(oof[truth], target)
        fresh_abnormal = np.round(head.probability(draw(FRESH, True)), 6)
        fresh_normal = np.round(head.probability(draw(FRESH, False)), 6)
        sensitivity = float(np.mean(fresh_abnormal >= threshold))
        kept.append(sensitivity >= target)
        sensitivities.append(sensitivity)
        cv_aucs.append(head.cv_auc)
        chosen_aucs.append(roc_auc(oof, truth) or 0.0)
        both = np.r_[np.ones(FRESH, bool), np.zeros(FRESH, bool)]
        true_aucs.append(roc_auc(np.r_[fresh_abnormal, fresh_normal], both) or 0.0)
    return {
        "abnormal": abnormal_n,
        "normal": normal_n,
        "target": target,
        "shift": shift,
        "sites": sites,
        "fitted": len(kept),
        "coverage": float(np.mean(kept)),
        "true_sensitivity": {"mean": float(np.mean(sensitivities)), "p5": float(np.percentile(sensitivities, 5))},
        "out_of_fold_auc": float(np.mean(cv_aucs)),  # nested: the head's cv_auc, held against the bundled score
        "chosen_penalty_auc": float(np.mean(chosen_aucs)),  # of the scores the threshold is chosen on
        "true_auc": float(np.mean(true_aucs)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=200, help="calibration sites drawn per scenario")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("abnormal  normal  target  shift  fitted  coverage  sens mean  sens p5  nested AUC  chosen AUC  true AUC")
    for abnormal_n, normal_n, target, shift in SCENARIOS:
        row = scenario(abnormal_n, normal_n, target, shift, args.sites, args.seed)
        rows.append(row)
        print(
            f"{abnormal_n:8d} {normal_n:7d} {target:7.2f} {shift:6.2f} {row['fitted']:7d} {row['coverage']:9.3f} "
            f"{row['true_sensitivity']['mean']:10.3f} {row['true_sensitivity']['p5']:8.3f} "
            f"{row['out_of_fold_auc']:11.3f} {row['chosen_penalty_auc']:11.3f} {row['true_auc']:9.3f}"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"features": FEATURES, "fresh": FRESH, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    run_main(main)
