"""The report row: one frozen record per file, shared by the reports, the ledger and the review page.

A `Record` is what a run says about one file, with the short hashes of the models that said it.
Numbers are rounded to the reports' six decimals when the record is made, so a record read back
from the ledger renders byte for byte like the one that was stored. The decisions a row shows
(accepted by the gate, refer, unfamiliar) are taken on the scores so rounded, by `accepts`,
`refers` and `is_unfamiliar`: `run` and `evaluate` both decide with them. `Summary` counts
records; it is the one place where a run's rows are counted.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.files import display_path
from cxrbatch.modelspec import ModelSpec
from cxrbatch.sitecheck import SiteCheck

CLASSIFIED, REJECTED, ERROR = "classified", "rejected", "error"
STATUSES = (CLASSIFIED, REJECTED, ERROR)
DECIMALS = 6


def rounded(value: float | None) -> float | None:
    """A score as the reports write it (six decimals)."""
    return None if value is None else round(float(value), DECIMALS)


# A film within 1e-6 of a threshold is decided alike by `run` and `evaluate` only if both decide
# with these, on the score as the reports write it.


def accepts(gate: ModelSpec, score: float) -> bool:
    """Whether the gate accepts a film: its score at or above the gate's threshold."""
    return round(score, DECIMALS) >= gate.threshold


def referral_score(classifier: ModelSpec, probs: np.ndarray, head: float | None) -> float:
    """A film's referral score: its referral head's output where the classifier has one, else
    1 - P(no-finding label), in float64 (the probabilities' float32 would move the sixth decimal)."""
    if head is not None:
        return head
    return 1.0 - float(probs[classifier.labels.index(classifier.negative_label or "")])


def refers(classifier: ModelSpec, score: float) -> bool | None:
    """Whether a referral score refers the film: at or above the referral threshold (None: the
    classifier has none)."""
    if classifier.referral_threshold is None:
        return None
    return round(score, DECIMALS) >= classifier.referral_threshold


def is_unfamiliar(classifier: ModelSpec, familiarity: float) -> bool | None:
    """Whether a film is unfamiliar: its familiarity distance above the classifier's threshold
    (None: the classifier has none)."""
    if classifier.familiarity_threshold is None:
        return None
    return round(familiarity, DECIMALS) > classifier.familiarity_threshold


class RecordError(ValueError):
    """A stored record that cannot be read back as one."""


@dataclass(frozen=True)
class Record:
    """One report row: the outcome for one file."""

    path: str  # as the reports write it (valid UTF-8, \\xNN for undecodable bytes)
    status: str
    gate_model: str  # first 12 hex digits of the gate file's sha256
    classifier_model: str
    gate_score: float | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = field(default=None, hash=False)  # classifier label order
    needs_review: bool | None = None
    error: str | None = None  # why the file could not be read, or what went wrong after screening
    referral_score: float | None = None  # a referral head's score (bundled or a site's), else 1 - P(no-finding label)
    refer: bool | None = None  # referral_score at or above the classifier's referral threshold
    familiarity: float | None = None  # distance of the film's features to the classifier's training films
    unfamiliar: bool | None = None  # familiarity above the classifier's familiarity threshold
    heatmap: str | None = None

    @classmethod
    def of(cls, path: Path | str, status: str, gate_model: str, classifier_model: str, **found: Any) -> Record:
        """A record with its path rendered for reports and its scores rounded."""
        probs = found.pop("probabilities", None)
        for key in ("gate_score", "confidence", "referral_score", "familiarity"):
            found[key] = rounded(found.get(key))
        return cls(
            path=display_path(path),
            status=status,
            gate_model=gate_model,
            classifier_model=classifier_model,
            probabilities=None if probs is None else {k: rounded(v) for k, v in probs.items()},  # type: ignore[misc]
            **found,
        )

    def same_result(self, other: Record, within: float = 2e-6) -> bool:
        """Whether `other` says what this record says: every cell the same but the scores, and
        those within `within` (the sixth decimal moves with a batch's make-up and the machine)."""
        scores = ("gate_score", "confidence", "referral_score", "familiarity")
        mine, theirs = self.probabilities or {}, other.probabilities or {}
        if (self.probabilities is None) != (other.probabilities is None) or list(mine) != list(theirs):
            return False
        pairs = [(getattr(self, n), getattr(other, n)) for n in scores] + [(mine[k], theirs[k]) for k in mine]
        # two six-decimal scores differ by whole millionths give or take a last bit: rounded, 2e-6 is 2e-6
        if not all((a is None) == (b is None) and (a is None or round(abs(a - b), 9) <= within) for a, b in pairs):
            return False
        cells = [f.name for f in fields(self) if f.name not in (*scores, "probabilities")]
        return all(getattr(self, n) == getattr(other, n) for n in cells)

    def to_read(self, negative_label: str) -> bool:
        """A reader should see it: referred (or, for a classifier without a referral threshold,
        classified as anything but the no-finding label)."""
        if self.status != CLASSIFIED:
            return False
        return bool(self.refer) if self.refer is not None else self.label != negative_label

    def flagged(self, negative_label: str) -> bool:
        """Worth a reviewer's look: to read, or unsure (`needs_review`)."""
        return self.to_read(negative_label) or (self.status == CLASSIFIED and bool(self.needs_review))

    def with_problem(self, message: str) -> Record:
        """The same result with a problem found after screening (a heatmap not written) in `error`."""
        return replace(self, error=message if not self.error else f"{self.error}; {message}")

    @property
    def has_problem(self) -> bool:
        """A result with a problem found after screening (`with_problem`): it stands, the row is not whole."""
        return self.status != ERROR and bool(self.error)

    def fields(self, labels: Iterable[str]) -> dict[str, Any]:
        """The report's fields in column order: one p_<LABEL> per classifier label."""
        probs = self.probabilities or {}
        return {
            "path": self.path,
            "status": self.status,
            "gate_score": self.gate_score,
            "label": self.label,
            "confidence": self.confidence,
            **{f"p_{label}": probs.get(label) for label in labels},
            "needs_review": self.needs_review,
            "error": self.error,
            "gate_model": self.gate_model,
            "classifier_model": self.classifier_model,
            "referral_score": self.referral_score,
            "refer": self.refer,
            "familiarity": self.familiarity,
            "unfamiliar": self.unfamiliar,
            "heatmap": self.heatmap,
        }

    def to_json(self) -> str:
        """The record as the ledger stores it: everything but the path, which the ledger keys."""
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, path: str, text: str) -> Record:
        """Read a stored record back; rows of ledger schema 1 (flat p_<LABEL> keys) too. A record
        that is not one (damaged, or edited by hand) is a RecordError, never a wrong row."""
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise RecordError(f"not JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("status") not in STATUSES:
            raise RecordError("not a result record (no status)")
        if "probabilities" not in data:
            probs = {k[2:]: data.pop(k) for k in [k for k in data if k.startswith("p_")]}
            data["probabilities"] = probs if any(v is not None for v in probs.values()) else None
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data and k != "path"}
        wrong = [k for k, v in known.items() if v is not None and not _holds(k, v)]
        probs = known.get("probabilities") or {}
        if wrong or not isinstance(probs, dict) or not all(_number(v) for v in probs.values()):
            raise RecordError(f"fields of the wrong type: {wrong or ['probabilities']}")
        return cls(path=path, **known)


def _number(value: object) -> bool:
    """A score as a report can print it: a finite int or float, never a bool (an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _holds(key: str, value: object) -> bool:
    kind = _FIELD_TYPES.get(key, object)
    return _number(value) if kind == (int, float) else isinstance(value, kind)


# What each stored field may hold besides None (numbers may come back from JSON as integers).
_FIELD_TYPES: dict[str, type | tuple[type, ...]] = {
    **dict.fromkeys(("status", "gate_model", "classifier_model", "label", "error", "heatmap"), str),
    **dict.fromkeys(("gate_score", "confidence", "referral_score", "familiarity"), (int, float)),
    **dict.fromkeys(("needs_review", "refer", "unfamiliar"), bool),
    "probabilities": dict,
}


@dataclass
class Summary:
    """Counts of the rows a run reports, and how much it screened now against what it reused."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_label: Counter[str] = field(default_factory=Counter)
    problems: int = 0  # rows whose result stands but whose heatmap could not be written
    referred: int = 0  # classified rows at or above the referral threshold
    cleared: int = 0  # classified rows below it
    unfamiliar: int = 0  # classified rows whose film is unlike the classifier's training films
    site: SiteCheck | None = None  # this run's films against the classifier's reference films (sitecheck)
    found: int = 0  # image files found in the inputs
    screened: int = 0  # files inferred by this run
    reused: int | None = None  # files whose result came from the ledger (None: no ledger)
    seconds: float = 0.0  # time spent screening what was screened now

    @classmethod
    def of(cls, records: Iterable[Record], **run: Any) -> Summary:
        """Count reported records; `run` gives screened, reused and seconds."""
        summary = cls(**run)
        for record in records:
            summary.by_status[record.status] += 1
            if record.label:
                summary.by_label[record.label] += 1
            summary.problems += record.has_problem
            if record.refer is not None:
                summary.referred += record.refer
                summary.cleared += not record.refer
            summary.unfamiliar += bool(record.unfamiliar)
        return summary

    def recount(self, records: Iterable[Record]) -> Summary:
        """The same run's figures over other rows (a report file that holds earlier rows too); the
        site check stays this run's."""
        run = {"found": self.found, "screened": self.screened, "reused": self.reused, "seconds": self.seconds}
        return Summary.of(records, **run, site=self.site)

    def site_warning(self) -> str | None:
        """The site check's warning for this run, if it warns."""
        return self.site.warning() if self.site else None

    @property
    def files(self) -> int:
        return sum(self.by_status.values())

    @property
    def images_per_second(self) -> float:
        return self.screened / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> bool:
        """Something needs a look: an unreadable file, or a heatmap that could not be written."""
        return bool(self.by_status[ERROR] or self.problems)

    def line(self) -> str:
        """One human line: counts per status and label, then what was screened now and how fast."""
        statuses = f"{self.by_status[CLASSIFIED]} classified, {self.by_status[REJECTED]} rejected, " + plural(
            self.by_status[ERROR], "error"
        )
        labels = ", ".join(f"{n} {label}" for label, n in sorted(self.by_label.items()))
        text = f"{plural(self.files, 'file')}: {statuses}" + (f" ({labels})" if labels else "")
        if self.referred or self.cleared:
            text += f"; {self.referred} referred, {self.cleared} cleared"
        if self.unfamiliar:
            text += f", {self.unfamiliar} unfamiliar"
        if self.problems:
            text += f"; {plural(self.problems, 'heatmap')} not written"
        rate = f"in {self.seconds:.1f} s, {self.images_per_second:.1f} images/s"
        if self.reused is None:
            return f"{text} {rate}"
        return f"{text}; {self.screened} screened {rate}, {self.reused} reused from the ledger"

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data for the JSON report."""
        return {
            "files": self.files,
            "by_status": {s: self.by_status[s] for s in STATUSES},
            "by_label": dict(sorted(self.by_label.items())),
            "referral": {"referred": self.referred, "cleared": self.cleared, "unfamiliar": self.unfamiliar},
            "site_check": self.site.as_dict() if self.site else None,
            "heatmap_problems": self.problems,
            "found": self.found,
            "screened": self.screened,
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }


def plural(n: int, noun: str) -> str:
    """`1 file`, `2 files`, `0 errors`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
