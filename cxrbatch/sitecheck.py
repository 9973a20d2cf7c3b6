"""The site check: are a run's films, as a whole, unlike the films the classifier's threshold is right for?

One unfamiliar film is not something a reader can act on, but a night with many more of them
than usual is: the films come from a site, scanner or population unlike the reference films,
where the referral threshold is not to be trusted. The reference is the films the classifier's
settings were chosen on, counted when they were chosen:
- its validation films (the `familiarity` record's `val_unfamiliar` of `val_films`);
- for a classifier calibrated by `cxrbatch calibrate`, its calibration films instead (the
  `calibration` record's `unfamiliar` count, made at the current familiarity threshold) where
  more of them were unfamiliar than of the validation films beyond chance (the same test, at
  `SITE_UNLIKE`): such a site is not warned every night. Where they were not, the validation
  films' larger count gives the check more power.
The test is a one-sided Fisher exact test of the run's unfamiliar count against the reference's,
so the reference's own sampling error is allowed for (a site whose films are a little more
often unfamiliar than the validation films is not warned however many films it screens). The
check counts only classified films that the current classifier judged (a report can hold rows
of earlier runs and models).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from cxrbatch.errors import ModelError
from cxrbatch.metrics import hypergeometric_at_least

if TYPE_CHECKING:
    from cxrbatch.models import Model
from cxrbatch.modelspec import ModelSpec

ALARM = 0.001  # warn when the run's count would come up by chance less than once in a thousand runs
TINY_P = 1e-300  # below it a p is shown as "p < 1e-300": the tail underflows to 0.0 not far below
SITE_UNLIKE = 0.05  # calibration films more often unfamiliar than the validation films at this level: their reference


@dataclass(frozen=True)
class Reference:
    """The films a run is held against: how many of them were unfamiliar."""

    against: str  # "validation films" or "calibration films"
    unfamiliar: int
    films: int
    calibrated: bool = field(default=False, compare=False)  # the model was calibrated (on films like these)
    site_headed: bool = field(default=False, compare=False)  # with a site head: calibrated again from its source

    def p_value(self, unfamiliar: int, films: int) -> float:
        """How likely a run of `films` films has `unfamiliar` or more if its films are like these:
        the one-sided Fisher exact test, the run and the reference pooled."""
        return hypergeometric_at_least(unfamiliar, films, unfamiliar + self.unfamiliar, films + self.films)


@dataclass(frozen=True)
class SiteCheck:
    """The outcome for one run: its unfamiliar count, the reference's, and the test."""

    films: int
    unfamiliar: int
    reference: Reference
    p: float

    @property
    def unlike_reference(self) -> bool:
        return self.p < ALARM

    def warning(self) -> str | None:
        """The sentence a person needs when the run's films look unlike the reference films."""
        if not self.unlike_reference:
            return None
        ref = self.reference
        found = (
            f"{self.unfamiliar} of {self.films} classified films ({self.unfamiliar / self.films:.1%}) are unfamiliar"
        )
        p = f"p = {self.p:.1g}" if self.p >= TINY_P else f"p < {TINY_P:.0e}"  # not "p = 0": an underflow
        against = f"against {ref.unfamiliar} of the {ref.films} {ref.against} ({p})"
        if ref.site_headed:  # calibrate refuses a model with a site head: its source is calibrated again
            advice = (
                "these films look unlike the films this model was calibrated on. Calibrate the models it was made "
                "from (such as the bundled models) again on recent labelled films, with a new site head (cxrbatch "
                "calibrate --site-head), before relying on refer or clear."
            )
        elif ref.against == "calibration films" or ref.calibrated:
            advice = (
                "these films look unlike the films this model was calibrated on. Calibrate again on recent "
                "labelled films (cxrbatch calibrate) before relying on refer or clear."
            )
        else:
            advice = (
                "these films look unlike the collections the classifier was trained on. Calibrate on this site's "
                "labelled films (cxrbatch calibrate --site-head) before relying on refer or clear."
            )
        return f"{found}, {against}: {advice}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "films": self.films,
            "unfamiliar": self.unfamiliar,
            "against": self.reference.against,
            "reference": {"films": self.reference.films, "unfamiliar": self.reference.unfamiliar},
            "p": float(f"{self.p:.3g}"),
            "unlike_reference": self.unlike_reference,
        }


def reference_of(spec: ModelSpec) -> Reference | None:
    """The reference a classifier's metadata records, or None: no familiarity output,
    or metadata from before these counts were kept. A malformed record is a ModelError (the model
    is refused when it loads, not after a night's screening)."""
    if spec.familiarity_threshold is None:
        return None
    site = validation = None
    try:
        calibration = spec.extra.get("calibration") or {}
        if (
            calibration.get("unfamiliar") is not None
            and calibration.get("familiarity_threshold") == spec.familiarity_threshold
        ):
            films = int(sum(calibration["counts"].values()))
            site = _checked(Reference("calibration films", int(calibration["unfamiliar"]), films))
        record = spec.extra.get("familiarity") or {}
        if record.get("val_unfamiliar") is not None and record.get("val_films"):
            validation = _checked(
                Reference("validation films", int(record["val_unfamiliar"]), int(record["val_films"]))
            )
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"the classifier's calibration or familiarity record is malformed ({type(exc).__name__}: {exc})"
        ) from None
    return _chosen(site, validation, spec.site_headed)


def _chosen(site: Reference | None, validation: Reference | None, site_headed: bool) -> Reference | None:
    """The reference of the two a classifier records, marked with whether it has a site head."""
    if site is None or validation is None:
        chosen = site or validation
        return chosen and replace(chosen, site_headed=site_headed)
    # The site's own films where they were more often unfamiliar than the validation films beyond chance
    # (so such a site is not warned every night); else the validation films, whose larger count gives the
    # check more power (against 0 of 40 calibration films, a night of 7 unfamiliar films in 50 went unwarned;
    # 1 of 40, which a site like the training films shows 36 % of the time, must not bring that back).
    if validation.p_value(site.unfamiliar, site.films) < SITE_UNLIKE:
        return replace(site, site_headed=site_headed)
    return replace(validation, calibrated=True, site_headed=site_headed)


def _checked(reference: Reference) -> Reference:
    if not 0 <= reference.unfamiliar <= reference.films:
        raise ValueError(f"{reference.unfamiliar} unfamiliar of {reference.films} {reference.against}")
    return reference


def check(records: Iterable[Any], reference: Reference | None, classifier_model: str) -> SiteCheck | None:
    """The site check over a run's report records (those with an `unfamiliar` value that the
    classifier `classifier_model`, a short hash, judged); None without a reference or such films."""
    if reference is None:
        return None
    flags = [bool(r.unfamiliar) for r in records if r.unfamiliar is not None and r.classifier_model == classifier_model]
    if not flags:
        return None
    k, n = sum(flags), len(flags)
    return SiteCheck(films=n, unfamiliar=k, reference=reference, p=reference.p_value(k, n))


def of_run(records: Iterable[Any], classifier: Model) -> SiteCheck | None:
    """The site check of a run's report records, held against the reference that `classifier`
    (the model that judged them) records."""
    return check(records, reference_of(classifier.spec), classifier.short_hash)
