"""Site calibration: the referral threshold that keeps a target sensitivity on a site's own films.

A site screens labelled films of its own (`<LABEL>/` folders named by the classifier's labels:
the no-finding label and any abnormal ones). The referral threshold is chosen so that the
sensitivity on the abnormal films reaches the target *with a margin for the sample size*: the
highest threshold whose one-sided 95 % bootstrap lower bound of the sensitivity is at the target
or above. For each bootstrap resample of the abnormal films the highest threshold that reaches
the target is the ceil(target x n)-th highest score; the 5th percentile of those thresholds is
the chosen one (its sensitivity reaches the target in at least 95 % of the resamples).

The calibrated pair of models is the site's gate unchanged and its classifier with the new
`referral_threshold` and a `calibration` record (counts, target, achieved sensitivity and
specificity with 95 % intervals, date, the source model's sha256) in its metadata.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.discovery import iter_images
from cxrbatch.errors import UsageError
from cxrbatch.models import MODEL_FILES, Model, embed_metadata
from cxrbatch.pipeline import Screener
from cxrbatch.records import CLASSIFIED, DECIMALS, ERROR

MIN_FILMS = 20  # of each side, abnormal and normal: fewer cannot bound a sensitivity usefully
ROUNDS = 2000
SEED = 20261202
LOWER = 0.05  # one-sided 95 %: the threshold reaches the target in 95 % of the resamples


@dataclass(frozen=True)
class Calibration:
    """A chosen referral threshold and what it achieves on the calibration films."""

    target: float
    threshold: float
    counts: dict[str, int]
    sensitivity: float
    sensitivity_ci: tuple[float, float]
    specificity: float
    specificity_ci: tuple[float, float]
    date: str
    source_sha256: str
    films: str  # the labelled folder's name (never its full path)

    def record(self) -> dict[str, Any]:
        """The metadata record that travels with the calibrated classifier."""
        return {**asdict(self), "rule": "highest threshold whose one-sided 95% bootstrap lower bound of sensitivity "
                f"on the abnormal films reaches the target ({ROUNDS} resamples)"}  # fmt: skip

    def table(self) -> str:
        """The calibration as a few readable lines."""
        counts = ", ".join(f"{label} {n}" for label, n in self.counts.items())
        return "\n".join(
            [
                f"calibration films: {counts}",
                f"target sensitivity {self.target:.2f} (one-sided 95% bootstrap lower bound): "
                f"referral threshold {self.threshold:.6f}",
                f"  sensitivity {self.sensitivity:.3f} [{self.sensitivity_ci[0]:.3f}, {self.sensitivity_ci[1]:.3f}]",
                f"  specificity {self.specificity:.3f} [{self.specificity_ci[0]:.3f}, {self.specificity_ci[1]:.3f}]",
            ]
        )


def choose_threshold(abnormal: np.ndarray, target: float, rounds: int = ROUNDS, seed: int = SEED) -> float:
    """The highest threshold whose sensitivity on resampled `abnormal` scores reaches `target` in
    at least 95 % of `rounds` bootstrap resamples, rounded down to the reports' six decimals."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"a target sensitivity must be between 0 and 1, not {target}")
    n = len(abnormal)
    k = math.ceil(target * n)  # films that must be at or above the threshold
    rng = np.random.default_rng(seed)
    resamples = np.sort(rng.choice(abnormal, size=(rounds, n), replace=True), axis=1)
    per_resample = resamples[:, n - k]  # the k-th highest score of each resample
    threshold = float(np.quantile(per_resample, LOWER, method="lower"))
    return math.floor(threshold * 10**DECIMALS) / 10**DECIMALS


def proportion_ci(hits: np.ndarray, rounds: int = ROUNDS, seed: int = SEED) -> tuple[float, float]:
    """A percentile 95 % bootstrap interval of the share of True in `hits`."""
    rng = np.random.default_rng(seed)
    means = rng.choice(hits.astype(np.float64), size=(rounds, len(hits)), replace=True).mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def labelled_films(folder: Path, labels: tuple[str, ...]) -> dict[str, list[Path]]:
    """The films under `folder/<LABEL>/`, by label; a folder the classifier has no label for is refused."""
    if not folder.is_dir():
        raise UsageError(f"Calibration folder not found: {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subfolders if p.name not in labels]
    if unknown:
        raise UsageError(f"{folder}: folder(s) {unknown} are not labels of the classifier {list(labels)}")
    return {p.name: list(iter_images([p])) for p in subfolders}


def calibrate(folder: Path, screener: Screener, target: float) -> Calibration:
    """Screen the labelled films and choose the referral threshold for `target` sensitivity."""
    spec = screener.classifier.spec
    negative = spec.negative_label or ""
    films = labelled_films(folder, spec.labels)
    counts = {label: len(paths) for label, paths in films.items()}
    abnormal_n = sum(n for label, n in counts.items() if label != negative)
    if abnormal_n < MIN_FILMS or counts.get(negative, 0) < MIN_FILMS:
        raise UsageError(
            f"{folder}: calibration needs at least {MIN_FILMS} abnormal and {MIN_FILMS} {negative} films, "
            f"found {abnormal_n} abnormal and {counts.get(negative, 0)} {negative}"
        )
    paths = [p for label in films for p in films[label]]
    truth = np.array([label != negative for label in films for _ in films[label]])
    results = list(screener.screen(paths))
    _refuse_unusable(folder, results)
    scores = np.array([r.referral_score for r in results], dtype=np.float64)
    threshold = choose_threshold(scores[truth], target)
    refer = np.round(scores, DECIMALS) >= threshold
    return Calibration(
        target=target,
        threshold=threshold,
        counts=counts,
        sensitivity=float(refer[truth].mean()),
        sensitivity_ci=proportion_ci(refer[truth]),
        specificity=float((~refer[~truth]).mean()),
        specificity_ci=proportion_ci(~refer[~truth]),
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        source_sha256=screener.classifier.sha256,
        films=folder.name,
    )


def _refuse_unusable(folder: Path, results: list[Any]) -> None:
    """Every calibration film must be read and accepted by the gate, or the threshold means nothing."""
    bad = [r for r in results if r.status != CLASSIFIED]
    if not bad:
        return
    shown = "; ".join(
        f"{r.path.name}: {r.error if r.status == ERROR else f'rejected by the gate (score {r.gate_score:.3f})'}"
        for r in bad[:10]
    )
    more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
    raise UsageError(
        f"{folder}: {len(bad)} film(s) cannot be used for calibration: {shown}{more}; remove or replace them"
    )


def write_calibrated(gate: Model, classifier: Model, calibration: Calibration, out: Path, force: bool) -> Path:
    """Write the site's pair of models into `out`: the gate as it is, the classifier with the new threshold."""
    import onnx

    if out.exists() and not force:
        raise UsageError(f"{out} exists; choose another folder or pass --force to replace its models")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gate.path, out / MODEL_FILES["gate"])
    proto = onnx.load(str(classifier.path))
    meta = classifier.spec.to_metadata()
    meta["referral_threshold"] = calibration.threshold
    meta["calibration"] = calibration.record()
    embed_metadata(proto, meta)
    target = out / MODEL_FILES["classifier"]
    onnx.save(proto, str(target))
    return target
