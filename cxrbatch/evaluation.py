"""Evaluate the shipped ONNX pipeline on a labelled folder tree (runtime side, no TensorFlow).

A tree whose class folders are the classifier's labels is scored as a classifier test (every
image goes through the classifier, and the gate's acceptance of these X-rays is reported too);
one whose folders are the gate's labels is scored as a gate test. With a MANIFEST.csv beside the
splits (columns `id` and `source`, optionally `kind`), metrics are also broken down per source.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrbatch.discovery import iter_images
from cxrbatch.errors import UsageError
from cxrbatch.imaging import in_frame
from cxrbatch.models import Model
from cxrbatch.pipeline import Screener

BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 20261126


@dataclass
class Scored:
    """Raw model outputs for a labelled set of images."""

    paths: list[Path]
    truth: list[str]
    gate_scores: np.ndarray  # (N,)
    probs: np.ndarray  # (N, K) classifier probabilities
    errors: list[str]


SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Framed:
    """A stress test for `Screener(transform=...)`: every film centred in a frame `factor` times
    its width and height. Above 1 the frame is black around the film (the wider field of view of
    sites that do not crop to the lungs); below 1 it cuts the film down to its centre (a tighter
    crop than the site's own)."""

    factor: float

    def __post_init__(self) -> None:
        if not 0.5 <= self.factor <= 2.0:
            raise UsageError(f"a frame factor must be between 0.5 and 2, not {self.factor}")

    def __call__(self, img: Image.Image) -> Image.Image:
        width, height = round(img.width * self.factor), round(img.height * self.factor)
        if self.factor >= 1.0:
            return in_frame(img, width, height)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        return img.crop((left, top, left + width, top + height))

    def __str__(self) -> str:
        if self.factor >= 1.0:
            return f"each film centred in a black frame {self.factor:g} times its width and height"
        return f"each film cut down to its central {100 * self.factor:g}% of width and height"


def labelled_images(data_dir: Path, split: str | None) -> tuple[list[Path], list[str]]:
    """List images with their class: `[split/]<CLASS>/` folders, or a flat folder whose
    MANIFEST.csv has `id` and `label` columns (ids are file stems). `split="all"` takes every
    split folder present (for sources a model never saw, such as a leave-source-out run's)."""
    if split == "all" and any((data_dir / s).is_dir() for s in SPLITS):
        roots = [data_dir / s for s in SPLITS if (data_dir / s).is_dir()]
    else:
        roots = [data_dir / split if split and (data_dir / split).is_dir() else data_dir]
    paths: list[Path] = []
    truth: list[str] = []
    for root in roots:
        found, labels = _labelled_folder(root)
        paths += found
        truth += labels
    if not paths:
        where = roots[0] if len(roots) == 1 else data_dir
        raise UsageError(f"No labelled images under {where} (expected <CLASS>/ folders or a MANIFEST.csv with labels)")
    return paths, truth


def _labelled_folder(root: Path) -> tuple[list[Path], list[str]]:
    if not root.is_dir():
        raise UsageError(f"Evaluation folder not found: {root}")
    paths: list[Path] = []
    truth: list[str] = []
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        found = list(iter_images([folder]))
        paths += found
        truth += [folder.name] * len(found)
    if not folders:
        manifest = read_manifest(root)
        for path in iter_images([root]):
            label = manifest.get(path.stem, {}).get("label")
            if label:
                paths.append(path)
                truth.append(label)
    return paths, truth


def score(screener: Screener, paths: list[Path], truth: list[str]) -> Scored:
    """Run both models on every image, whatever the gate says."""
    gate, classifier = screener.gate, screener.classifier
    keep_paths, keep_truth, gate_scores, probs, errors = [], [], [], [], []
    label_of = dict(zip(paths, truth, strict=True))
    for batch in screener.decoded_batches(paths):
        good = [d for d in batch if d.error is None]
        errors += [f"{d.path}: {d.error}" for d in batch if d.error is not None]
        if not good:
            continue
        gate_in = np.stack([d.gate_input for d in good])  # type: ignore[misc]
        clf_in = np.stack([d.classifier_input for d in good])  # type: ignore[misc]
        gate_scores.append(gate.run(gate_in)[gate.spec.score_output][:, 0])
        probs.append(classifier.run(clf_in)[classifier.spec.score_output])
        keep_paths += [d.path for d in good]
        keep_truth += [label_of[d.path] for d in good]
    k = len(classifier.spec.labels)
    return Scored(
        keep_paths,
        keep_truth,
        np.concatenate(gate_scores) if gate_scores else np.zeros(0),
        np.concatenate(probs) if probs else np.zeros((0, k)),
        errors,
    )


def read_manifest(data_dir: Path) -> dict[str, dict[str, str]]:
    """Map image id (file stem) to its MANIFEST.csv row; {} without a manifest."""
    manifest = data_dir / "MANIFEST.csv"
    if not manifest.is_file():
        return {}
    with manifest.open(newline="", encoding="utf-8") as fh:
        return {row["id"]: row for row in csv.DictReader(fh) if "id" in row}


def sources_of(paths: list[Path], manifest: dict[str, dict[str, str]]) -> list[str]:
    """The MANIFEST.csv `source` of each image ("" where unknown); ids are file stems."""
    return [manifest.get(p.stem, {}).get("source", "") for p in paths]


def evaluate(
    data_dir: Path,
    split: str | None,
    gate: Model,
    classifier: Model,
    screener: Screener,
    sources: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Score a labelled tree and return the metrics report as plain data; with `sources`, only
    the images whose MANIFEST.csv source is one of them."""
    paths, truth = labelled_images(data_dir, split)
    manifest = read_manifest(data_dir)
    if sources:
        keep = [i for i, source in enumerate(sources_of(paths, manifest)) if source in sources]
        if not keep:
            raise UsageError(f"No image under {data_dir} comes from the source(s) {list(sources)} in its MANIFEST.csv")
        paths, truth = [paths[i] for i in keep], [truth[i] for i in keep]
    classes = set(truth)
    if classes <= set(classifier.spec.labels):
        kind = "classifier"
    elif classes <= set(gate.spec.labels):
        kind = "gate"
    else:
        raise UsageError(
            f"Class folders {sorted(classes)} match neither the classifier labels "
            f"{list(classifier.spec.labels)} nor the gate labels {list(gate.spec.labels)}"
        )
    scored = score(screener, paths, truth)
    groups = _groups(scored.paths, manifest)
    report: dict[str, Any] = {
        "data": str(data_dir.name),
        "split": split,
        "sources": list(sources),
        "transform": None if screener.transform is None else str(screener.transform),
        "kind": kind,
        "images": len(scored.paths),
        "unreadable": scored.errors,
        "models": {"gate": gate.describe(), "classifier": classifier.describe()},
    }
    if kind == "classifier":
        report.update(_classifier_report(scored, classifier.spec.labels, gate.spec.threshold, groups))
    else:
        report.update(_gate_report(scored, gate, groups))
    return report


def _groups(paths: list[Path], manifest: dict[str, dict[str, str]]) -> dict[str, dict[str, list[int]]]:
    """Index lists of images per value of each manifest column we break down by."""
    groups: dict[str, dict[str, list[int]]] = {
        "source": defaultdict(list),
        "kind": defaultdict(list),
        "age_group": defaultdict(list),
    }
    for i, path in enumerate(paths):
        row = manifest.get(path.stem)
        if row is None:
            continue
        for column, index in groups.items():
            if row.get(column):
                index[row[column]].append(i)
    return {c: dict(sorted(g.items())) for c, g in groups.items() if g}


def _classifier_report(
    scored: Scored, labels: tuple[str, ...], gate_threshold: float, groups: dict[str, dict[str, list[int]]]
) -> dict[str, Any]:
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index[t] for t in scored.truth], dtype=np.int64)
    pred = scored.probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {"labels": list(labels), "overall": classification_metrics(y, pred, len(labels), ci=True)}
    out["auc"] = {label: roc_auc(scored.probs[:, i], y == i) for i, label in enumerate(labels)}
    out["gate_accepted"] = float((scored.gate_scores >= gate_threshold).mean()) if len(y) else None
    for column, values in groups.items():
        out[f"by_{column}"] = {value: _subset_metrics(y[idx], pred[idx], labels) for value, idx in values.items()}
    return out


def _subset_metrics(y: np.ndarray, pred: np.ndarray, labels: tuple[str, ...]) -> dict[str, Any]:
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


def classification_metrics(y: np.ndarray, pred: np.ndarray, k: int, ci: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix (rows = truth)."""
    confusion = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
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
        metrics["ci95"] = _bootstrap(y, pred, k)
    return metrics


def _prf(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    tp = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1


def _bootstrap(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, Any]:
    """Percentile 95% intervals from resampling images with replacement (fixed seed)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(y)
    samples = rng.integers(0, n, size=(BOOTSTRAP_ROUNDS, n))
    stats = defaultdict(list)
    for idx in samples:
        confusion = np.bincount(y[idx] * k + pred[idx], minlength=k * k).reshape(k, k)
        precision, recall, f1 = _prf(confusion)
        stats["accuracy"].append(np.trace(confusion) / n)
        stats["macro_f1"].append(f1.mean())
        stats["precision"].append(precision)
        stats["recall"].append(recall)
        stats["f1"].append(f1)
    return {name: np.percentile(np.asarray(v), [2.5, 97.5], axis=0).T.tolist() for name, v in stats.items()}


def _gate_report(scored: Scored, gate: Model, groups: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    positive = gate.spec.positive_label
    accepted = scored.gate_scores >= gate.spec.threshold
    is_pos = np.array([t == positive for t in scored.truth])
    out: dict[str, Any] = {
        "threshold": gate.spec.threshold,
        "xray_kept": float(accepted[is_pos].mean()) if is_pos.any() else None,
        "not_xray_rejected": float((~accepted[~is_pos]).mean()) if (~is_pos).any() else None,
        "counts": {"xray": int(is_pos.sum()), "not_xray": int((~is_pos).sum())},
        "missed": sorted(str(p.name) for p, a, pos in zip(scored.paths, accepted, is_pos, strict=True) if a != pos),
    }
    kinds = groups.get("kind", {})
    out["by_kind"] = {
        kind: {
            "n": len(idx),
            "rate": float(accepted[idx].mean() if is_pos[idx].all() else (~accepted[idx]).mean()),
            "meaning": "kept" if is_pos[idx].all() else "rejected",
        }
        for kind, idx in kinds.items()
    }
    return out


def format_report(report: dict[str, Any]) -> str:
    """Render an evaluation report as readable text."""
    lines = [f"{report['kind']} evaluation on {report['data']}/{report['split'] or ''}: {report['images']} images"]
    if report.get("transform"):
        lines.append(f"stress test: {report['transform']}")
    if report["unreadable"]:
        lines.append(f"unreadable: {len(report['unreadable'])}")
    if report["kind"] == "gate":
        lines.append(
            f"threshold {report['threshold']:.4f}: XRAY kept {_pct(report['xray_kept'])}, "
            f"NOT_XRAY rejected {_pct(report['not_xray_rejected'])}"
        )
        for kind, row in report["by_kind"].items():
            lines.append(f"  {kind:<16} n={row['n']:<5} {row['meaning']} {_pct(row['rate'])}")
        return "\n".join(lines)
    overall, labels = report["overall"], report["labels"]
    ci = overall.get("ci95", {})
    lines.append(
        f"accuracy {overall['accuracy']:.4f} {_ci(ci.get('accuracy'))}  "
        f"macro-F1 {overall['macro_f1']:.4f} {_ci(ci.get('macro_f1'))}  "
        f"gate accepted {_pct(report['gate_accepted'])}"
    )
    lines.append(f"  {'class':<14}{'precision':>22}{'recall':>22}{'f1':>22}")
    for i, label in enumerate(labels):
        cells = [
            f"{overall[m][i]:.3f} {_ci(ci.get(m, [None] * len(labels))[i])}" for m in ("precision", "recall", "f1")
        ]
        lines.append(f"  {label:<14}" + "".join(f"{c:>22}" for c in cells))
    auc = report.get("auc", {})
    lines.append("  AUC, one class against the rest: " + ", ".join(f"{k} {_num(v)}" for k, v in auc.items()))
    lines.append("confusion (rows truth, columns predicted): " + " ".join(labels))
    lines += [f"  {label:<14}{row}" for label, row in zip(labels, overall["confusion"], strict=True)]
    for column in ("source", "age_group"):
        for value, row in report.get(f"by_{column}", {}).items():
            recall = ", ".join(f"{k} {v:.2f}" for k, v in row["recall"].items())
            lines.append(f"  [{column}] {value[:60]:<60} n={row['n']:<4} acc {row['accuracy']:.3f}  recall: {recall}")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _ci(bounds: list[float] | None) -> str:
    return "" if not bounds else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"
