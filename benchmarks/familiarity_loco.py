"""Can a distance to the training films tell that films come from a collection never trained on?

Issue #13 asks that the `familiarity` flag fire more often for films of a collection the model
never saw than for val films of seen collections. This measures it for six statistics (1.3.0
shipped the global Mahalanobis distance, 1.3.1 the 10th-nearest film), leaving out each collection
(MANIFEST.csv `collection`, 50 films or more) in turn: the statistic is fitted on the other
collections' train films (less any film in a cluster with the left-out collection's: a
re-encoded copy kept under another collection's name), its threshold is the 99th percentile of
their val films (as `cxrbatch familiarity` sets it), and the left-out collection's films (all
splits) are scored.
- Per film: the share flagged, and the AUC of the value, left-out films against seen val films.
- Per night (a batch from one site): the left-out collection's median against each seen
  collection's median over its val and test films; and how often `cxrbatch run`'s site check
  warns (its Fisher test against the val films' count) on nights of 50, 100, 200 and 1,000 films
  drawn from the left-out collection, against nights drawn from each seen collection's test films
  (false alarms).

Features come from either
- `--features-cache F`: the frozen ImageNet backbone's pooled features that `cxrbatch loco
  --features-cache F` keeps. Nothing in them was trained, so leaving a collection out of the
  statistic leaves it out entirely: every collection is a fold.
- `--classifier ONNX`: a classifier's own pooled features (the shipped statistic's input). Its
  backbone saw every collection it was trained on, so name the ones it never saw with `--unseen`.

    python -m benchmarks.familiarity_loco DATA --features-cache FEATURES \
        --json benchmarks/results/familiarity_loco.json
    python -m benchmarks.familiarity_loco DATA --classifier models/classifier.onnx --unseen chexpert \
        --json benchmarks/results/familiarity_unseen_chexpert.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import run_main
from cxrbatch.datasets import SPLITS, labelled_images, read_manifest, sources_of
from cxrbatch.datasets import left_out as films_left_out
from cxrbatch.errors import UsageError
from cxrbatch.metrics import roc_auc

Score = Callable[[np.ndarray], np.ndarray]
MIN_FILMS = 50  # a collection smaller than this is neither a fold nor a group of its own
PERCENTILE = 99.0
NIGHTS = (50, 100, 200, 1000)  # films per night for the site check
NIGHT_DRAWS = 200


def global_mahalanobis(train: np.ndarray, groups: np.ndarray) -> Score:
    """1.3.0's statistic: one mean, the Ledoit-Wolf covariance of all train films."""
    from export.familiarity import distances, ledoit_wolf, whitening

    mean = train.mean(axis=0)
    white = whitening(ledoit_wolf(train)[0])
    return lambda x: distances(x, mean, white)


def nearest_collection_shared(train: np.ndarray, groups: np.ndarray) -> Score:
    """The smallest distance to a collection's mean under the within-collection covariance."""
    from export.familiarity import ledoit_wolf, whitening

    keys = [g for g, n in Counter(groups.tolist()).items() if n >= MIN_FILMS // 2]
    means = np.stack([train[groups == g].mean(axis=0) for g in keys])
    within = np.concatenate([train[groups == g] - means[i] for i, g in enumerate(keys)])
    white = whitening(ledoit_wolf(within)[0])
    centres = means @ white

    def score(x: np.ndarray) -> np.ndarray:
        z = x @ white
        squared = (z**2).sum(1)[:, None] - 2 * z @ centres.T + (centres**2).sum(1)[None]
        return np.sqrt(np.maximum(squared.min(axis=1), 0))

    return score


def nearest_collection_own(train: np.ndarray, groups: np.ndarray) -> Score:
    """The smallest distance to a collection under its own covariance, in units of its own train
    films' 99th percentile (a tight collection gets a tight radius)."""
    from export.familiarity import distances, ledoit_wolf, whitening

    parts = []
    for g in [g for g, n in Counter(groups.tolist()).items() if n >= MIN_FILMS // 2]:
        films = train[groups == g]
        mean, white = films.mean(axis=0), whitening(ledoit_wolf(films)[0])
        parts.append((mean, white, float(np.percentile(distances(films, mean, white), PERCENTILE))))
    return lambda x: np.min(np.stack([distances(x, m, w) / r for m, w, r in parts]), axis=0)


def knn_cosine(train: np.ndarray, groups: np.ndarray) -> Score:
    """The shipped statistic: 1 - cosine similarity to the 10th most similar train film, with the
    train films' unit features rounded to float16 as the graph holds them."""
    from export.familiarity import knn_distances, unit_bank

    bank = unit_bank(train)
    return lambda x: knn_distances(x, bank)


def principal(train: np.ndarray, groups: np.ndarray, m: int = 64, residual: bool = False) -> Score:
    """Mahalanobis distance within the top `m` principal components, or (`residual`) the norm of
    what lies outside them."""
    mean = train.mean(axis=0)
    _, s, vt = np.linalg.svd(train - mean, full_matrices=False)
    basis, variance = vt[:m].T, s[:m] ** 2 / len(train)

    def score(x: np.ndarray) -> np.ndarray:
        c = x - mean
        z = c @ basis
        return np.linalg.norm(c - z @ basis.T, axis=1) if residual else np.sqrt((z**2 / variance).sum(axis=1))

    return score


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], Score]] = {
    "global Mahalanobis (1.3.0)": global_mahalanobis,
    "nearest collection, shared covariance": nearest_collection_shared,
    "nearest collection, own covariance": nearest_collection_own,
    "10th-nearest film, cosine": knn_cosine,
    "Mahalanobis in 64 principal components": principal,
    "residual outside 64 principal components": lambda t, g: principal(t, g, residual=True),
}


def fold(
    features: np.ndarray, split: np.ndarray, group: np.ndarray, left_out: str, gone: np.ndarray
) -> dict[str, object]:
    """The statistics fitted without the collection's films and their cluster-mates (`gone`),
    scored on the collection's own films."""
    seen = ~gone
    train, val = seen & (split == "train"), seen & (split == "val")
    held = group == left_out
    out: dict[str, object] = {"films": int(held.sum())}
    for name, make in METHODS.items():
        score = make(features[train], group[train])
        val_scores, held_scores = score(features[val]), score(features[held])
        threshold = float(np.percentile(val_scores, PERCENTILE))
        both = np.concatenate([held_scores, val_scores])
        is_held = np.r_[np.ones(len(held_scores), bool), np.zeros(len(val_scores), bool)]
        medians = {
            g: float(np.median(score(features[(group == g) & (split != "train")])))
            for g in np.unique(group[seen])
            if ((group == g) & (split != "train")).sum() >= 10
        }
        held_median = float(np.median(held_scores))
        nights = {
            str(n): night_alarms(held_scores, {g: score(features[(group == g) & (split == "test")]) for g in medians},
                                 threshold, (int((val_scores > threshold).sum()), len(val_scores)), n)
            for n in NIGHTS
        }  # fmt: skip
        out[name] = {
            "flagged": round(float((held_scores > threshold).mean()), 4),
            "seen_val_flagged": round(float((val_scores > threshold).mean()), 4),
            "auc_vs_seen_val": round(roc_auc(both, is_held) or 0.0, 4),
            "median": round(held_median, 4),
            "seen_collections_with_a_higher_median": sorted(g for g, m in medians.items() if m >= held_median),
            "seen_collections": len(medians),
            "nights": nights,
        }
    return out


def night_alarms(
    held: np.ndarray, seen: dict[str, np.ndarray], threshold: float, reference: tuple[int, int], n: int
) -> dict[str, object]:
    """How often a night of `n` films warns that the films are unlike the reference films (`cxrbatch
    run`'s site check: a one-sided Fisher exact test of the night's unfamiliar count against the
    val films' `reference` = (unfamiliar, films)), for nights drawn (with replacement) from the
    left-out collection, and for nights from each seen collection's test films (false alarms: the
    largest share over the seen collections of 20 films or more, the mean over them, and each)."""
    from cxrbatch.sitecheck import ALARM, Reference

    rng = np.random.default_rng(20261206)
    val = Reference("validation films", *reference)

    def share(values: np.ndarray) -> float:
        flagged = (rng.choice(values, (NIGHT_DRAWS, n)) > threshold).sum(axis=1)
        return float(np.mean([val.p_value(int(k), n) < ALARM for k in flagged]))

    false = {g: share(v) for g, v in seen.items() if len(v) >= 20}
    worst = max(false, key=lambda g: false[g]) if false else None
    return {
        "left_out": round(share(held), 4),
        "seen_max": round(false[worst], 4) if worst else None,
        "seen_worst": worst,
        "seen_mean": round(float(np.mean(list(false.values()))), 4) if false else None,
        "seen": {g: round(v, 4) for g, v in sorted(false.items())},
    }


def load_features(
    args: argparse.Namespace,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, Callable[[str], np.ndarray]]:
    """Each film's features, split and collection, what they were made with, and for a
    collection which films a model without it must not see (`datasets.left_out`)."""
    images = labelled_images(args.data_dir, "all")
    manifest = read_manifest(args.data_dir)

    def gone(collection: str) -> np.ndarray:
        return films_left_out(images.paths, manifest, (collection,))

    split = np.array([manifest[p.stem]["split"] for p in images.paths])
    group = np.array(sources_of(images.paths, manifest))
    if args.features_cache:
        from export.loco import cached_clean_features

        cached = cached_clean_features(args.features_cache)
        return (
            np.stack([cached[p.stem] for p in images.paths]).astype(np.float64),
            split,
            group,
            "frozen ImageNet",
            gone,
        )
    import onnx

    from cxrbatch.features import features
    from cxrbatch.models import CPU, load_model
    from cxrbatch.pipeline import Screener

    classifier = load_model(args.classifier, "classifier", [CPU])
    gate = load_model(args.classifier.with_name("gate.onnx"), "gate", [CPU])
    proto = onnx.load(str(args.classifier))
    feats = features(proto, images.paths, Screener(gate, classifier, batch_size=32))
    return feats, split, group, f"classifier {classifier.short_hash}", gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="a tree `cxrbatch data build` made (MANIFEST.csv with splits)")
    parser.add_argument("--features-cache", type=Path, help="the features cache of `cxrbatch loco`")
    parser.add_argument("--classifier", type=Path, help="a classifier ONNX (gate.onnx beside it)")
    parser.add_argument("--unseen", action="append", default=[], help="with --classifier: a collection it never saw")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if bool(args.features_cache) == bool(args.classifier):
        parser.error("give exactly one of --features-cache and --classifier")
    if args.classifier and not args.unseen:
        parser.error("--classifier needs --unseen: the collections its backbone never saw")
    features, split, group, kind, gone = load_features(args)
    assert set(split) <= set(SPLITS)
    counts = Counter(group.tolist())
    unknown = sorted(set(args.unseen) - set(counts))
    if unknown:
        raise UsageError(f"no film of {args.data_dir} comes from the collection(s) {unknown}")
    folds = args.unseen or sorted(g for g, n in counts.items() if n >= MIN_FILMS)
    if not folds:
        raise UsageError(f"no collection of {args.data_dir} has {MIN_FILMS} films to leave out")
    if args.unseen:  # never-seen collections stay out of every statistic
        keep = ~np.isin(group, args.unseen)
    result: dict[str, object] = {"data": args.data_dir.name, "features": kind, "percentile": PERCENTILE, "folds": {}}
    for left_out in folds:
        if args.unseen:
            others = [g for g in args.unseen if g != left_out]
            mask = keep | (group == left_out)
            mask &= ~np.isin(group, others)
            out = fold(features[mask], split[mask], group[mask], left_out, gone(left_out)[mask])
        else:
            out = fold(features, split, group, left_out, gone(left_out))
        result["folds"][left_out] = out  # type: ignore[index]
        print(f"{left_out}: done", flush=True)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


def print_table(result: dict[str, object]) -> None:
    folds: dict[str, dict[str, object]] = result["folds"]  # type: ignore[assignment]
    print(f"\nfeatures: {result['features']}; share of the left-out films flagged (threshold: the {PERCENTILE:g}th")
    print("percentile of seen val films) / AUC of the value, left-out films against seen val films")
    print(f"{'statistic':42} " + " ".join(f"{g[:13]:>13}" for g in folds) + f" {'mean':>13}")
    for name in METHODS:
        cells = [folds[g][name] for g in folds]  # type: ignore[index]
        flagged = [c["flagged"] for c in cells]  # type: ignore[index]
        aucs = [c["auc_vs_seen_val"] for c in cells]  # type: ignore[index]
        row = " ".join(f"{f:5.3f}/{a:5.3f}  " for f, a in zip(flagged, aucs, strict=True))
        print(f"{name:42} {row} {np.mean(flagged):5.3f}/{np.mean(aucs):5.3f}")
    print("\nnights that warn (site check): left-out collection / worst seen collection")
    for name in ("global Mahalanobis (1.3.0)", "10th-nearest film, cosine"):
        for n in NIGHTS:
            cells = [folds[g][name]["nights"][str(n)] for g in folds]  # type: ignore[index]
            row = " ".join(_night_cell(c) for c in cells)  # type: ignore[arg-type]
            print(f"{name[:30]:30} {n:>4} films {row}")
    print("\nper night: seen collections whose median is at or above the left-out one's (of all seen)")
    for name in METHODS:
        cells = [folds[g][name] for g in folds]  # type: ignore[index]
        row = " ".join(
            f"{len(c['seen_collections_with_a_higher_median']):>6}/{c['seen_collections']:<6}"  # type: ignore[index,arg-type]
            for c in cells
        )
        print(f"{name:42} {row}")


def _night_cell(c: dict[str, object]) -> str:
    worst = f"{c['seen_max']:5.2f} {str(c['seen_worst'])[:8]:8}" if c["seen_worst"] else "    -         "
    return f"{c['left_out']:5.2f}/{worst}"


if __name__ == "__main__":
    run_main(main)
