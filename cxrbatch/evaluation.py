"""Evaluate the gate and the classifier on a labelled folder tree (runtime side, no TensorFlow).

A tree whose classes are the classifier's labels is scored as a classifier test (every image goes
through the classifier, and the gate's acceptance of these X-rays is reported too); films in an
`ABNORMAL` folder (read as abnormal, no class named) count for refer or clear only; one whose
classes are the gate's labels is scored as a gate test. Both models run through the `Screener`,
as in a screening run (same decoding, same GPU batch padding), but every image reaches both,
whatever the gate says. How trees and manifests are read is `cxrbatch.datasets`' rule; with a
MANIFEST.csv beside the splits, metrics are also broken down per source, age group or kind.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrbatch.datasets import ABNORMAL, Split, labelled_images, only_sources, read_manifest, split_used
from cxrbatch.errors import UsageError, first_few
from cxrbatch.metrics import (
    INTERVALS,
    MIN_BOOTSTRAP_FILMS,
    classification_metrics,
    referral_metrics,
    roc_auc,
    subset_metrics,
)
from cxrbatch.modelinput import in_frame
from cxrbatch.models import Model
from cxrbatch.modelspec import ModelSpec
from cxrbatch.pipeline import Screener
from cxrbatch.records import DECIMALS, accepts, is_unfamiliar, plural, referral_score


@dataclass
class Scored:
    """Raw model outputs for a labelled set of images."""

    paths: list[Path]
    truth: list[str]
    gate_scores: np.ndarray  # (N,)
    probs: np.ndarray  # (N, K) classifier probabilities
    errors: list[str]
    familiarity: np.ndarray | None = None  # (N,) when the classifier has a familiarity output
    referral: np.ndarray | None = None  # (N,) when the classifier has a referral head (bundled or a site's)


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


def score(screener: Screener, images: Split) -> Scored:
    """Run both models on every readable image, whatever the gate says."""
    keep_paths: list[Path] = []
    keep_truth: list[str] = []
    gate_scores, probs, distances, referrals, errors = [], [], [], [], []
    label_of = dict(zip(images.paths, images.names(), strict=True))
    spec = screener.classifier.spec
    for batch, outputs in screener.model_outputs(images.paths):
        good = [d for d in batch if d.error is None]
        errors += [f"{d.path}: {d.error}" for d in batch if d.error is not None]
        if outputs is None:
            continue
        gate, out = outputs
        gate_scores.append(gate)
        probs.append(out[spec.score_output])
        if spec.familiarity_output:
            distances.append(out[spec.familiarity_output][:, 0])
        if spec.referral_output:
            referrals.append(out[spec.referral_output][:, 0])
        keep_paths += [d.path for d in good]
        keep_truth += [label_of[d.path] for d in good]
    return Scored(
        keep_paths,
        keep_truth,
        np.concatenate(gate_scores) if gate_scores else np.zeros(0),
        np.concatenate(probs) if probs else np.zeros((0, len(spec.labels))),
        errors,
        (np.concatenate(distances) if distances else np.zeros(0)) if spec.familiarity_output else None,
        (np.concatenate(referrals) if referrals else np.zeros(0)) if spec.referral_output else None,
    )


def evaluate(data_dir: Path, split: str | None, screener: Screener, sources: tuple[str, ...] = ()) -> dict[str, Any]:
    """Score a labelled tree with the screener's gate and classifier and return the metrics report
    as plain data; with `sources`, only the images whose MANIFEST.csv source is one of them."""
    gate, classifier = screener.gate, screener.classifier
    manifest = read_manifest(data_dir)
    images = only_sources(labelled_images(data_dir, split), manifest, sources)
    kind = _kind(set(images.classes), gate, classifier)
    scored = score(screener, images)
    if not scored.paths:  # no figure to give, only an empty report that looks like a result
        raise UsageError(
            f"{data_dir}: {plural(len(scored.errors), 'labelled film')} found, none readable, so nothing was "
            f"evaluated: {first_few(scored.errors, 10, '; ')}"
        )
    groups = _groups(scored.paths, manifest)
    report: dict[str, Any] = {
        # `.` and `..` have no name of their own; a link keeps the name it was given (as calibrate's)
        "data": Path(os.path.abspath(data_dir)).name,
        "split": split_used(data_dir, split),  # None: a tree without split folders, read whole
        "sources": list(sources),
        "transform": None if screener.transform is None else str(screener.transform),
        "kind": kind,
        "images": len(scored.paths),
        "unreadable": scored.errors,
        "models": {"gate": gate.describe(), "classifier": classifier.describe()},
    }
    if kind == "classifier":
        report.update(_classifier_report(scored, classifier.spec, gate.spec, groups))
    else:
        report.update(_gate_report(scored, gate, groups))
    if scored.familiarity is not None:
        report["familiarity"] = _familiarity_report(scored, classifier.spec, gate, groups)
    return report


def _familiarity_report(
    scored: Scored, spec: ModelSpec, gate: Model, groups: dict[str, dict[str, list[int]]]
) -> dict[str, Any]:
    """How often films are `unfamiliar` to the classifier, overall and per group; for a gate tree,
    also among the non-X-rays the gate lets through, and the AUC of the distance for non-X-rays."""
    assert scored.familiarity is not None and spec.familiarity_threshold is not None
    unfamiliar = np.array([is_unfamiliar(spec, f) for f in scored.familiarity.tolist()], dtype=bool)  # as run
    out: dict[str, Any] = {
        "threshold": spec.familiarity_threshold,
        "unfamiliar": float(unfamiliar.mean()) if len(unfamiliar) else None,
        "by_group": {
            f"{column}={value}": {
                "n": len(idx),
                "unfamiliar": float(unfamiliar[idx].mean()),
                # how well the distance tells this group's films from the rest of the tree's
                "auc_vs_rest": roc_auc(scored.familiarity, np.isin(np.arange(len(unfamiliar)), idx)),
            }
            for column, values in groups.items()
            for value, idx in values.items()
        },
    }
    if gate.spec.positive_label in set(scored.truth):
        other = np.array([t != gate.spec.positive_label for t in scored.truth])
        slipped = other & _accepted(scored, gate.spec)
        out["auc_not_xray"] = roc_auc(scored.familiarity, other)
        out["not_xray_unfamiliar"] = float(unfamiliar[other].mean()) if other.any() else None
        out["xray_unfamiliar"] = float(unfamiliar[~other].mean()) if (~other).any() else None
        out["passed_gate_not_xray"] = {"n": int(slipped.sum()), "unfamiliar": int(unfamiliar[slipped].sum())}
    return out


def _accepted(scored: Scored, gate: ModelSpec) -> np.ndarray:
    """Which films the gate accepts, as `cxrbatch run` decides it."""
    return np.array([accepts(gate, s) for s in scored.gate_scores.tolist()], dtype=bool)


def _kind(classes: set[str], gate: Model, classifier: Model) -> str:
    """Which model a tree tests, from its classes."""
    if classes <= {*classifier.spec.labels, ABNORMAL}:  # a classifier always names its no-finding label
        return "classifier"
    if classes <= set(gate.spec.labels):
        return "gate"
    known = (list(classifier.spec.labels), list(gate.spec.labels))
    unknown = sorted(classes - {*known[0], ABNORMAL, *known[1]})
    if unknown:  # name the folders at fault, not every folder of the tree
        raise UsageError(
            f"Class folder(s) {unknown} match neither the classifier labels {known[0]} nor the gate labels {known[1]}"
        )
    raise UsageError(
        f"Class folders {sorted(classes)} mix the classifier's labels {known[0]} and the gate's {known[1]}: "
        "a tree tests one model, so give each its own"
    )


def _groups(paths: list[Path], manifest: dict[str, dict[str, str]]) -> dict[str, dict[str, list[int]]]:
    """Index lists of images per value of each manifest column we break down by."""
    groups: dict[str, dict[str, list[int]]] = {
        "source": defaultdict(list),
        "collection": defaultdict(list),
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
    scored: Scored, spec: ModelSpec, gate: ModelSpec, groups: dict[str, dict[str, list[int]]]
) -> dict[str, Any]:
    labels = spec.labels
    index = {label: i for i, label in enumerate(labels)}
    y = np.array([index.get(t, -1) for t in scored.truth], dtype=np.int64)  # -1: an ABNORMAL film, no class
    named = y >= 0
    pred = scored.probs.argmax(axis=1) if len(y) else np.zeros(0, dtype=np.int64)
    out: dict[str, Any] = {
        "labels": list(labels),
        "intervals": INTERVALS,
        "overall": classification_metrics(y[named], pred[named], len(labels), ci=True),
        # films read only as abnormal: how many, and what the model called them
        "abnormal_unnamed": {
            k: v for k, v in subset_metrics(y[~named], pred[~named], labels).items() if k in ("n", "predicted")
        },
    }
    out["auc"] = {label: roc_auc(scored.probs[named, i], y[named] == i) for i, label in enumerate(labels)}
    out["gate_accepted"] = float(_accepted(scored, gate).mean()) if len(y) else None
    # refer or clear, as `cxrbatch run` decides it: its referral score, rounded as the reports write
    # it, at or above the threshold (`refers`, as `referral_metrics` compares)
    negative = index[spec.negative_label or ""]
    heads = scored.referral.tolist() if scored.referral is not None else [None] * len(y)
    scores = [referral_score(spec, p, h) for p, h in zip(scored.probs, heads, strict=True)]
    referral = np.array([round(s, DECIMALS) for s in scores], dtype=np.float64)
    abnormal = y != negative
    out["referral"] = referral_metrics(referral, abnormal, spec.referral_threshold)
    for column, values in groups.items():
        out[f"by_{column}"] = {
            value: {
                **subset_metrics(y[idx], pred[idx], labels),
                "referral": referral_metrics(referral[idx], abnormal[idx], spec.referral_threshold),
            }
            for value, idx in values.items()
        }
    return out


def _gate_report(scored: Scored, gate: Model, groups: dict[str, dict[str, list[int]]]) -> dict[str, Any]:
    positive = gate.spec.positive_label
    accepted = _accepted(scored, gate.spec)
    is_pos = np.array([t == positive for t in scored.truth], dtype=bool)  # `~` of an empty float array fails
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
    text = _format_metrics(report)
    return text if "familiarity" not in report else "\n".join([text, *_familiarity_lines(report["familiarity"])])


def _format_metrics(report: dict[str, Any]) -> str:
    where = report["data"] if report["split"] is None else f"{report['data']}/{report['split']}"
    lines = [f"{report['kind']} evaluation on {where}: {report['images']} images"]
    if report.get("transform"):
        lines.append(f"stress test: {report['transform']}")
    if report["unreadable"]:  # left out of every figure below: name them, as run's error rows do
        unreadable = report["unreadable"]
        lines.append(f"unreadable, left out of every figure: {len(unreadable)} ({first_few(unreadable, 10, '; ')})")
    if report["kind"] == "gate":
        lines.append(
            f"threshold {report['threshold']:.4f}: XRAY kept {_pct(report['xray_kept'])}, "
            f"NOT_XRAY rejected {_pct(report['not_xray_rejected'])}"
        )
        for kind, row in report["by_kind"].items():
            lines.append(f"  {kind:<16} n={row['n']:<5} {row['meaning']} {_pct(row['rate'])}")
        return "\n".join(lines)
    overall, labels = report["overall"], report["labels"]
    unnamed = report.get("abnormal_unnamed", {"n": 0})
    if unnamed["n"]:
        called = ", ".join(f"{k} {v}" for k, v in unnamed["predicted"].items())
        lines.append(
            f"{ABNORMAL}: {unnamed['n']} films read as abnormal with no class named, called {called} "
            f"(refer or clear only; the class metrics are of the other {overall['n']})"
        )
    if overall["n"]:
        lines += _class_lines(overall, labels, report)
    lines.append(_referral_line("refer or clear", report["referral"]))
    for column in ("source", "collection", "age_group"):
        for value, row in report.get(f"by_{column}", {}).items():
            recall = ", ".join(f"{k} {v:.2f}" for k, v in row["recall"].items())
            lines.append(f"  [{column}] {value[:60]:<60} n={row['n']:<4} acc {_num(row['accuracy'])}  recall: {recall}")
            lines.append(_referral_line("      refer or clear", row["referral"]))
    return "\n".join(lines)


def _class_lines(overall: dict[str, Any], labels: list[str], report: dict[str, Any]) -> list[str]:
    ci = overall.get("ci95", {})
    few = f"(no interval: a class has under {MIN_BOOTSTRAP_FILMS} films)"
    lines = [
        f"accuracy {overall['accuracy']:.4f} {_ci(ci.get('accuracy'))}  "
        f"macro-F1 {overall['macro_f1']:.4f} {_ci(ci.get('macro_f1')) or few}{_present(overall)}  "
        f"gate accepted {_pct(report['gate_accepted'])}",
        f"  {'class':<14}{'precision':>22}{'recall':>22}{'f1':>22}",
    ]
    for i, label in enumerate(labels):
        cells = [  # n/a: recall and F1 of a class with no films, precision of a class never predicted
            f"{_num(overall[m][i])} {_ci(ci.get(m, [None] * len(labels))[i])}" for m in ("precision", "recall", "f1")
        ]
        lines.append(f"  {label:<14}" + "".join(f"{c:>22}" for c in cells))
    auc = report.get("auc", {})
    lines.append("  AUC, one class against the rest: " + ", ".join(f"{k} {_num(v)}" for k, v in auc.items()))
    lines.append("confusion (rows truth, columns predicted): " + " ".join(labels))
    lines += [f"  {label:<14}{row}" for label, row in zip(labels, overall["confusion"], strict=True)]
    return lines


def _familiarity_lines(f: dict[str, Any]) -> list[str]:
    lines = [f"unfamiliar (distance above {f['threshold']:.3f}): {_pct(f['unfamiliar'])}"]
    if "auc_not_xray" in f:
        slipped = f["passed_gate_not_xray"]
        lines.append(
            f"  non-X-rays {_pct(f['not_xray_unfamiliar'])} unfamiliar, X-rays {_pct(f['xray_unfamiliar'])}; "
            f"AUC of the distance for non-X-rays {_num(f['auc_not_xray'])}; "
            f"of {slipped['n']} non-X-rays the gate accepted, {slipped['unfamiliar']} unfamiliar"
        )
    lines += [
        f"  [{group[:70]}] n={row['n']} unfamiliar {_pct(row['unfamiliar'])}, "
        f"AUC against the rest {_num(row['auc_vs_rest'])}"
        for group, row in f["by_group"].items()
    ]
    return lines


def _referral_line(title: str, r: dict[str, Any]) -> str:
    """Sensitivity, specificity, AUC and the specificity at 90 % sensitivity, each with its interval."""
    ci = r["ci95"]
    at = "no threshold" if r["threshold"] is None else f"{r['threshold']:.6f}"
    cells = [f"{title} at {at}: abnormal {r['n_abnormal']}, normal {r['n_normal']}"]
    for name, key in (
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("AUC", "auc"),
        ("specificity at 90% sensitivity", "specificity_at_90_sensitivity"),
    ):
        if r[key] is not None:
            cells.append(
                f"{name} {r[key]:.3f} {_ci(ci[key]) or f'(no interval: under {MIN_BOOTSTRAP_FILMS} films on a side)'}"
            )
    return "; ".join(cells)


def _present(overall: dict[str, Any]) -> str:
    """Which classes macro-F1 averages, where some have no films."""
    present = sum(f is not None for f in overall["f1"])
    return "" if present == len(overall["f1"]) else f" (of the {present} classes with films)"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _ci(bounds: list[float] | None) -> str:
    return "" if not bounds else f"[{bounds[0]:.3f}, {bounds[1]:.3f}]"
