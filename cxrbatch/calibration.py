"""Site calibration: the referral threshold that keeps a target sensitivity on a site's own films.

A site screens labelled films of its own (`<LABEL>/` folders named by the classifier's labels:
the no-finding label and any abnormal ones, or `ABNORMAL/` for films a reader called abnormal
without naming the class, which is what most sites' reads say). The referral threshold is chosen so that the
sensitivity on the site's abnormal films reaches the target *with 95 % confidence*, whatever the
distribution of the scores: it is the j-th lowest abnormal score, for the largest j such that
P(Binomial(n, 1 - target) >= j) >= 0.95. (The j-th lowest of n scores sits below a share
1 - target of the abnormal population exactly when at least j of the n films do; that count is
binomial.) A bootstrap of the same order statistic, tried first, under-covered badly at small n
(about 62 % at n = 20). The rule needs n >= ln(0.05) / ln(target) abnormal films (59 for 0.95,
29 for 0.90); with fewer, no threshold can promise the target and calibration is refused.

With `site_head`, the site's films also fit a site head (cxrbatch.sitehead): a referral score of
their own, learnt on the classifier's features, which ranks a site the classifier never saw
better than the bundled score can (the bundled referral head, or 1 - P(NORMAL) for a model
without one); it takes that score's place, and is refused where it ranks the films no better.
The threshold is then chosen by the same rule on the head's out-of-fold scores (films it was not
fitted on), and the sensitivity and specificity reported are those scores'.

The calibrated pair of models is the site's gate unchanged and its classifier with the new
`referral_threshold` and a `calibration` record (counts, target, achieved sensitivity and
specificity with 95 % intervals, date, the source model's sha256, and how many of the films were
unfamiliar, at which familiarity threshold) in its metadata. Where that count is above the
validation films' beyond chance, `cxrbatch run`'s site check then holds a run's films against it
instead of the validation films' (cxrbatch.sitecheck): a threshold is right for films like the
ones it was calibrated on.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cxrbatch import sitehead
from cxrbatch.datasets import ABNORMAL, refuse_loose
from cxrbatch.discovery import iter_images
from cxrbatch.errors import ModelError, ReportError, UsageError, first_few
from cxrbatch.features import pooled_features_name, save_classifier, with_features
from cxrbatch.files import file_sha256, staged
from cxrbatch.metrics import proportion_ci
from cxrbatch.models import MODEL_FILES, Model
from cxrbatch.pipeline import Screener
from cxrbatch.records import CLASSIFIED, DECIMALS, ERROR
from cxrbatch.sitehead import SiteHead

MIN_FILMS = 20  # of each side at least; the abnormal side needs more for a high target (min_abnormal)
CONFIDENCE = 0.95  # the chance that the threshold's sensitivity on the site's abnormal films reaches the target


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
    unfamiliar: int | None = None  # calibration films the classifier calls unfamiliar (None: no familiarity output)
    familiarity_threshold: float | None = None  # the threshold `unfamiliar` was counted at
    site_head: SiteHead | None = None  # fitted on these films; the threshold is on its out-of-fold scores
    bundled_specificity: float | None = None  # with a site head: what the bundled score clears at the same target

    def record(self) -> dict[str, Any]:
        """The metadata record that travels with the calibrated classifier."""
        rule = (
            f"the j-th lowest abnormal score, largest j with P(Binomial(n, 1 - target) >= j) >= {CONFIDENCE}: "
            f"sensitivity at or above the target with {CONFIDENCE:.0%} confidence"
        )
        if self.site_head is not None:
            rule += (
                "; applied to the site head's out-of-fold scores, which stand in for the refitted head's, so the "
                "confidence is approximate (benchmarks/site_head_coverage.py)"
            )
        without = {"site_head"} | ({"bundled_specificity"} if self.bundled_specificity is None else set())
        fields = {k: v for k, v in asdict(self).items() if k not in without}
        head = {} if self.site_head is None else {"site_head": self.site_head.record(sum(self.counts.values()))}
        return {**fields, "rule": rule, **head}

    def table(self) -> str:
        """The calibration as a few readable lines."""
        counts = ", ".join(f"{label} {n}" for label, n in self.counts.items())
        films = sum(self.counts.values())
        unfamiliar = [] if self.unfamiliar is None else [f"unfamiliar films: {self.unfamiliar} of {films}"]
        head = self.site_head
        if head is not None:
            unfamiliar.append(
                f"site head: out-of-fold AUC {head.cv_auc:.3f} (penalty {head.penalty:g}); "
                "sensitivity and specificity above are of its out-of-fold scores"
            )
            if self.bundled_specificity is not None:
                unfamiliar.append(
                    f"  the bundled score, calibrated on the same films, would clear {self.bundled_specificity:.3f} "
                    "of the normal ones (without --site-head)"
                )
        return "\n".join(
            [
                f"calibration films: {counts}",
                f"target sensitivity {self.target:g} (reached with {'about ' if head else ''}{CONFIDENCE:.0%} "
                "confidence): "
                f"referral threshold {self.threshold:.6f}",
                f"  sensitivity {self.sensitivity:.3f} [{self.sensitivity_ci[0]:.3f}, {self.sensitivity_ci[1]:.3f}]",
                f"  specificity {self.specificity:.3f} [{self.specificity_ci[0]:.3f}, {self.specificity_ci[1]:.3f}]",
                *unfamiliar,
            ]
        )


def min_abnormal(target: float, confidence: float = CONFIDENCE) -> int:
    """The fewest abnormal films from which any threshold reaches `target` with `confidence`."""
    return max(MIN_FILMS, math.ceil(math.log(1 - confidence) / math.log(target)))


def choose_threshold(abnormal: np.ndarray, target: float, confidence: float = CONFIDENCE) -> float:
    """The highest threshold (an abnormal score, rounded down to six decimals) whose sensitivity on
    the population the `abnormal` scores come from reaches `target` with probability `confidence`."""
    if not 0.0 < target < 1.0:
        raise UsageError(f"a target sensitivity must be between 0 and 1, not {target}")
    n = len(abnormal)
    j = _order_statistic(n, 1.0 - target, confidence)
    if j is None:
        raise UsageError(
            f"{n} abnormal films cannot show a sensitivity of {target} with {confidence:.0%} confidence: "
            f"at least {min_abnormal(target, confidence)} are needed"
        )
    threshold = float(np.sort(abnormal)[j - 1])
    return math.floor(threshold * 10**DECIMALS) / 10**DECIMALS


def _order_statistic(n: int, q: float, confidence: float) -> int | None:
    """The largest j (1-based) with P(Binomial(n, q) >= j) >= confidence, or None."""
    log_q, log_p = math.log(q), math.log1p(-q)
    tail = 0.0
    for j in range(n, 0, -1):
        tail += math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_q + (n - j) * log_p)
        if tail >= confidence:
            return j
    return None


def labelled_films(folder: Path, labels: tuple[str, ...]) -> dict[str, list[Path]]:
    """The films under `folder/<LABEL>/` (or `ABNORMAL/`), by label; any other folder, and images
    lying beside the label folders, are refused."""
    if not folder.is_dir():
        raise UsageError(f"Calibration folder not found: {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subfolders if p.name not in labels and p.name != ABNORMAL]
    if unknown:
        raise UsageError(
            f"{folder}: folder(s) {unknown} are not labels of the classifier {list(labels)} "
            f"(films read only as abnormal go in {ABNORMAL}/)"
        )
    if not subfolders:  # films lying flat (refuse_loose would name them beside "class folders ()")
        raise UsageError(
            f"{folder} holds no label folder: put each film in a folder named by its label {list(labels)}, "
            f"or in {ABNORMAL}/ if it was read only as abnormal"
        )
    films = {p.name: list(iter_images([p])) for p in subfolders}
    refuse_loose(folder, subfolders, [p.name for p in subfolders])  # of no label: unused without a word
    _refuse_copies(folder, films)
    return films


def _refuse_copies(folder: Path, films: dict[str, list[Path]]) -> None:
    """One film twice (a copy, a symbolic link, a folder linked into another label) would count
    twice: the binomial rule takes the films as independent, and a film under two labels is both
    abnormal and normal. Refused, naming the first pairs (by content: the sha256 of the file)."""
    first: dict[str, tuple[str, Path]] = {}
    twice: list[str] = []
    for label, paths in films.items():
        for path in paths:
            try:
                digest = file_sha256(path)
            except OSError:
                continue  # unreadable: screening reports it
            if digest in first:
                twice.append(f"{_inside(folder, first[digest][1])} and {_inside(folder, path)}")
            else:
                first[digest] = (label, path)
    if twice:
        raise UsageError(
            f"{folder}: the same film is there twice ({first_few(twice, 5, '; ')}); keep each film once, "
            "under its one label"
        )


def calibrate(folder: Path, gate: Model, classifier: Model, target: float, site_head: bool = False) -> Calibration:
    """Screen the labelled films and choose the referral threshold for `target` sensitivity; with
    `site_head`, fit a site head on them first (on the features the same screening gives) and
    choose the threshold on its out-of-fold scores."""
    if not 0.0 < target < 1.0:  # NaN too, which no range check of the command line catches
        raise UsageError(f"a target sensitivity must be between 0 and 1, not {target}")
    spec = classifier.spec
    negative = spec.negative_label or ""
    _refuse_site_headed(classifier)
    graph = _site_head_graph(classifier) if site_head else None  # checked before any film is screened
    films = labelled_films(folder, spec.labels)
    counts = {label: len(paths) for label, paths in films.items()}
    abnormal_n = sum(n for label, n in counts.items() if label != negative)
    needed = min_abnormal(target)
    if abnormal_n < needed or counts.get(negative, 0) < MIN_FILMS:
        raise UsageError(
            f"{folder}: calibration for a target sensitivity of {target} needs at least {needed} abnormal and "
            f"{MIN_FILMS} {negative} films, found {abnormal_n} abnormal and {counts.get(negative, 0)} {negative}"
        )
    paths = [p for label in films for p in films[label]]
    truth = np.array([label != negative for label in films for _ in films[label]])
    screener = Screener(gate, classifier if graph is None else with_features(classifier, graph))
    results = list(screener.screen(paths))
    _refuse_unusable(folder, results)
    scores = np.array([r.referral_score for r in results], dtype=np.float64)
    head = bundled_specificity = None
    if graph is not None:
        feats = np.stack([r.features for r in results]).astype(np.float64)  # type: ignore[misc]
        bundled_specificity = specificity_at_target(scores, truth, target)  # shown beside the head's
        head, scores = sitehead.fit_if_better(feats, truth, scores)
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
        source_sha256=classifier.sha256,
        films=Path(os.path.abspath(folder)).name,  # `.` and `..` have no name of their own; a link keeps its own
        unfamiliar=sum(bool(r.unfamiliar) for r in results) if spec.familiarity_output else None,
        familiarity_threshold=spec.familiarity_threshold,
        site_head=head,
        bundled_specificity=bundled_specificity,
    )


def specificity_at_target(scores: np.ndarray, truth: np.ndarray, target: float) -> float:
    """The share of normal films cleared at the threshold the rule chooses for `target`."""
    threshold = choose_threshold(scores[truth], target)
    return float((np.round(scores[~truth], DECIMALS) < threshold).mean())


def _refuse_site_headed(classifier: Model) -> None:
    """A classifier that already has a site head is not calibrated again: its scores on the films
    it was fitted on are in-sample, and its record would be lost."""
    if classifier.spec.site_headed:
        raise UsageError(
            f"{classifier.path.name} already has a site head, fitted on other films; calibrate the model it "
            "was made from (such as the bundled models) again, with --site-head"
        )


def _site_head_graph(classifier: Model) -> onnx.ModelProto:
    """The classifier's graph, refused where a site head cannot read its pooled features (a float16
    or int8 copy)."""
    graph = onnx.load(str(classifier.path))
    try:
        pooled_features_name(graph, classifier.spec.score_output)
    except ModelError as exc:
        raise UsageError(
            f"{classifier.path.name} cannot take a site head ({exc}): calibrate the float32 model it was made from"
        ) from None
    return graph


def _inside(folder: Path, path: Path) -> str:
    """A film's path within the labelled folder (`PNEUMONIA/linked/a.jpg`), as the user can find it."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _refuse_unusable(folder: Path, results: list[Any]) -> None:
    """Every calibration film must be read and accepted by the gate, or the threshold means nothing."""
    bad = [r for r in results if r.status != CLASSIFIED]
    if not bad:
        return
    why = [r.error if r.status == ERROR else f"rejected by the gate (score {r.gate_score:.3f})" for r in bad]
    shown = [f"{_inside(folder, r.path)}: {reason}" for r, reason in zip(bad, why, strict=True)]
    raise UsageError(
        f"{folder}: {len(bad)} film(s) cannot be used for calibration: {first_few(shown, 10, '; ')}; "
        "remove or replace them"
    )


def check_out(out: Path, models_dir: Path, force: bool) -> None:
    """Refuse an `out` the site's models cannot go to: run before screening (say so at once, not
    after minutes of work) and again before writing."""
    if out.exists() and not out.is_dir():  # before the advice to pass --force, which would not help
        raise UsageError(f"{out} is a file, not a folder for the calibrated models")
    if out.exists() and not force:
        raise UsageError(f"{out} exists; choose another folder or pass --force to replace its models")
    there = next(p for p in (out, *out.parents) if os.path.lexists(p))  # `out`, or where it is made
    if not there.is_dir():  # a file on the way, or a link to nothing: mkdir would fail after the screening
        raise UsageError(f"{out} cannot be made: {there} is not a folder; choose another folder")
    if out.resolve() == models_dir.resolve():
        raise UsageError(f"{out} holds the models being calibrated; write the site's models to another folder")


def write_calibrated(gate: Model, classifier: Model, calibration: Calibration, out: Path, force: bool) -> Path:
    """Write the site's pair of models into `out`: the gate as it is, the classifier with the new threshold."""
    check_out(out, classifier.path.parent, force)
    meta = classifier.spec.to_metadata()
    meta["referral_threshold"] = calibration.threshold
    meta["calibration"] = calibration.record()
    proto = onnx.load(str(classifier.path))
    if calibration.site_head is not None:
        sitehead.add_to_graph(proto, calibration.site_head, pooled_features_name(proto, classifier.spec.score_output))
        meta["outputs"]["referral"] = sitehead.OUTPUT
        if isinstance(meta.get("referral_head"), dict):  # the bundled head stays in the graph, unused
            meta["referral_head"]["in_use"] = False
    target = out / MODEL_FILES["classifier"]
    made = [p for p in (out, *out.parents) if not os.path.lexists(p)]  # the folders mkdir makes, deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"Cannot write the calibrated models into {out}: {exc.strerror or exc}") from None
    try:
        _write_pair(gate, proto, meta, out)
    except BaseException:  # SIGTERM and Ctrl-C too: an empty folder left would refuse the same command again
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else has been put there since
                folder.rmdir()
        raise
    return target


def _write_pair(gate: Model, proto: onnx.ModelProto, meta: dict[str, Any], out: Path) -> None:
    """Write the gate's bytes and the calibrated classifier into `out`."""
    # each file through a temporary one renamed into place, the gate only once the classifier
    # loads as the runtime loads it and has taken its place: a run killed or a disk filled part
    # way leaves no truncated model, and with --force the old pair stands until then (it was the
    # new gate beside the old classifier where the classifier could not be written)
    gate_bytes = gate.path.read_bytes()
    with staged(out / MODEL_FILES["gate"], lambda fh: fh.write(gate_bytes), binary=True, what="model") as commit:
        save_classifier(proto, meta, out / MODEL_FILES["classifier"])
        commit()
