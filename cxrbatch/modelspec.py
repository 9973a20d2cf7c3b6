"""The metadata record of a model (schema `cxrbatch.model/1`, documented in models/README.md),
parsed and checked: what the runtime needs to feed and read the model, and that it describes
the model's graph."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from cxrbatch.errors import ModelError, UsageError
from cxrbatch.modelinput import InputSpec

SCHEMA = "cxrbatch.model/1"
ROLES = ("gate", "classifier")
# Keys of the record that ModelSpec holds in its own fields (the rest stays in `extra`).
_SPEC_KEYS = frozenset(
    (
        *("schema", "role", "name", "version", "labels", "outputs", "threshold", "positive_label", "negative_label"),
        *("referral_threshold", "familiarity_threshold"),
    )
)
# The graph outputs a referral score can come from instead of 1 - P(negative_label): a head fitted on
# the training collections at export (export/referral_head.py), or on a site's films (cxrbatch.sitehead).
BUNDLED_REFERRAL = "referral"
SITE_REFERRAL = "site_referral"
REFERRAL_FROM = {BUNDLED_REFERRAL: "bundled head", SITE_REFERRAL: "site head"}
# What `cxrbatch calibrate` chose on a classifier's float32 scores: a float16 or int8 copy moves
# them, so a copy's record leaves these out (`copy_metadata`).
CHOSEN_ON_SCORES = ("referral_threshold", "calibration")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """The metadata record of one model, parsed and checked."""

    role: str
    name: str
    version: str
    input_name: str
    input: InputSpec
    labels: tuple[str, ...]
    score_output: str
    threshold: float  # gate: accept at or above; classifier: needs review below
    positive_label: str | None = None  # gate: the label its sigmoid scores (a chest X-ray)
    negative_label: str | None = None  # classifier: the label that is not a finding
    cam_output: str | None = None
    referral_threshold: float | None = None  # classifier: refer at or above this referral score
    referral_output: str | None = None  # classifier: a referral head's score (N x 1); else 1 - P(negative_label)
    familiarity_output: str | None = None  # classifier: distance of a film's features to the training films'
    familiarity_threshold: float | None = None  # classifier: unfamiliar above this distance
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # every other metadata key, kept as is

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str) -> ModelSpec:
        """Build a spec from the JSON record, naming what is missing."""
        if meta.get("schema") != SCHEMA:
            raise ModelError(f"{source}: metadata schema is {meta.get('schema')!r}, expected {SCHEMA!r}")
        try:
            inp = meta["input"]
            role = meta["role"]
            spec = cls(
                role=role,
                name=meta["name"],
                version=str(meta["version"]),
                input_name=inp["name"],
                input=InputSpec(
                    height=int(inp["height"]),
                    width=int(inp["width"]),
                    channels=int(inp["channels"]),
                    colour=inp["colour"],
                    equalize=bool(inp["equalize"]),
                    resample=inp.get("resample", "bilinear"),
                    clahe=float(inp.get("clahe", 0.0)),
                ),
                labels=tuple(meta["labels"]),
                score_output=meta["outputs"]["scores"],
                cam_output=meta["outputs"].get("cam"),
                referral_threshold=_optional_float(meta.get("referral_threshold")),
                familiarity_output=meta["outputs"].get("familiarity"),
                referral_output=meta["outputs"].get("referral"),
                familiarity_threshold=_optional_float(meta.get("familiarity_threshold")),
                threshold=float(meta["threshold"]),
                positive_label=meta.get("positive_label"),
                negative_label=meta.get("negative_label"),
                extra={k: v for k, v in meta.items() if k not in _SPEC_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: incomplete model metadata ({type(exc).__name__}: {exc})") from None
        if role not in ROLES:
            raise ModelError(f"{source}: unknown role {role!r}")
        spec._check_values(meta, source)
        if role == "gate" and spec.positive_label not in spec.labels:
            raise ModelError(f"{source}: gate metadata needs positive_label among its labels")
        if role == "classifier" and spec.negative_label not in spec.labels:
            raise ModelError(f"{source}: classifier metadata needs negative_label (its no-finding label) in labels")
        if (spec.familiarity_output is None) != (spec.familiarity_threshold is None):
            raise ModelError(f"{source}: a familiarity output needs a familiarity_threshold, and the reverse")
        return spec

    def _check_values(self, meta: dict[str, Any], source: str) -> None:
        """Values the record may not hold whatever its graph: each would give wrong rows, not an error."""
        labels = meta["labels"]
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise ModelError(f"{source}: labels must be a list of names, not {labels!r}")
        if len(set(labels)) != len(labels):
            raise ModelError(f"{source}: a label is listed twice in {labels}")
        for key in ("threshold", "referral_threshold"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:  # NaN fails too
                raise ModelError(f"{source}: {key} must be between 0 and 1, not {value}")
        if self.familiarity_threshold is not None and not 0.0 <= self.familiarity_threshold < float("inf"):
            raise ModelError(
                f"{source}: familiarity_threshold must be a distance (0 or more), not {self.familiarity_threshold}"
            )
        if min(self.input.height, self.input.width) < 1 or self.input.channels not in (1, 3):
            raise ModelError(f"{source}: input must be at least 1 x 1 with 1 or 3 channels, not {asdict(self.input)}")
        named = [n for n in (self.score_output, self.cam_output, self.familiarity_output, self.referral_output) if n]
        if len(set(named)) != len(named):
            raise ModelError(f"{source}: the outputs record names one graph output for two things: {meta['outputs']}")
        if self.role == "classifier":
            from cxrbatch import sitecheck

            try:
                sitecheck.reference_of(self)
            except ModelError as exc:
                raise ModelError(f"{source}: {exc}") from None

    def check_graph(self, inputs: dict[str, list[Any]], outputs: dict[str, list[Any]], source: str) -> None:
        """Refuse a record that does not describe its graph (`inputs` and `outputs`: name -> shape,
        a dimension a string or None where the graph leaves it open): fed or read by the record,
        such a model fails mid-run or, worse, gives wrong rows with exit 0."""
        expected = (self.input.height, self.input.width, self.input.channels)
        shape = inputs.get(self.input_name)
        if shape is None:
            raise ModelError(f"{source}: the metadata's input {self.input_name!r} is not the graph's ({list(inputs)})")
        known = bool(shape)  # a graph may leave its input's rank open
        if known and (
            len(shape) != 4 or any(isinstance(d, int) and d != e for d, e in zip(shape[1:], expected, strict=False))
        ):
            raise ModelError(
                f"{source}: the graph's input is {shape}, the metadata says N x {' x '.join(map(str, expected))}"
            )
        width = {self.score_output: 1 if self.role == "gate" else len(self.labels)}
        width.update({name: 1 for name in (self.familiarity_output, self.referral_output) if name})
        if self.cam_output:
            width[self.cam_output] = len(self.labels)
        for name, last in width.items():
            if name not in outputs:
                raise ModelError(
                    f"{source}: the metadata names output {name!r}, which the graph lacks ({list(outputs)})"
                )
            dims = outputs[name]
            if dims and isinstance(dims[-1], int) and dims[-1] != last:
                raise ModelError(f"{source}: output {name!r} is {dims}, the metadata needs {last} value(s) per film")

    @property
    def referral_from(self) -> str:
        """Where the referral score comes from: "site head", "bundled head" or "1 - p(no finding)"."""
        if not self.referral_output:
            return "1 - p(no finding)"
        return REFERRAL_FROM.get(self.referral_output, f"output {self.referral_output}")

    @property
    def site_headed(self) -> bool:
        """Whether the referral score is a site head's, fitted on a site's labelled films."""
        return self.referral_output == SITE_REFERRAL

    def refuse_referral_head(self, source: str, copy: str) -> None:
        """Refuse (UsageError) to make `copy` (such as "a float16 copy") of a classifier with a referral
        head: its threshold was chosen on float32 scores, so a head stays with float32 models."""
        if self.referral_output:
            raise UsageError(
                f"{source} has a {self.referral_from}: {copy} would move its referral scores, and any "
                "threshold chosen on them"
            )

    def refuse_reduced_precision(self, source: str, what: str) -> None:
        """Refuse (UsageError) to make `what` from a float16 or int8 copy: the derived outputs and
        copies are made from the float32 model `cxrbatch export` wrote, whose scores they were set on."""
        precision = self.extra.get("precision")
        if precision in ("float16", "int8"):
            raise UsageError(
                f"{source} is {'an' if precision == 'int8' else 'a'} {precision} copy: make {what} from the float32 "
                "model `cxrbatch export` wrote"
            )

    def trained_without(self) -> tuple[str, ...]:
        """The manifest sources the model's training left out (`train --exclude-source`)."""
        training = self.extra.get("training")
        config = training.get("config") if isinstance(training, dict) else None
        left_out = config.get("exclude_sources") if isinstance(config, dict) else None
        return tuple(str(source) for source in left_out or ())

    def require_cam(self) -> str:
        """The name of the classifier's `cam` output, which heatmaps need; a clear error without one."""
        if not self.cam_output:
            raise ModelError("heatmaps need a classifier with a 'cam' output (export it with `cxrbatch export`)")
        return self.cam_output

    def to_metadata(self) -> dict[str, Any]:
        """The JSON record `from_metadata` reads back: the one writer of the schema."""
        extra_input = self.extra.get("input", {})
        inp = {**extra_input, **asdict(self.input), "name": self.input_name}
        outputs = {"scores": self.score_output}
        named = (("cam", self.cam_output), ("familiarity", self.familiarity_output), ("referral", self.referral_output))
        for key, name in named:
            if name:
                outputs[key] = name
        meta: dict[str, Any] = {
            **{k: v for k, v in self.extra.items() if k != "input"},
            "schema": SCHEMA,
            "role": self.role,
            "name": self.name,
            "version": self.version,
            "input": inp,
            "labels": list(self.labels),
            "outputs": outputs,
            "threshold": self.threshold,
        }
        for key in ("positive_label", "negative_label", "referral_threshold", "familiarity_threshold"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        return meta


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def copy_metadata(meta: dict[str, Any], precision: str, source: str) -> dict[str, Any]:
    """The record of a `precision` ("float16", "int8") copy of the model `source` whose record is
    `meta`: the same with its precision, less a referral threshold and its calibration record,
    which were chosen on the float32 scores the copy moves (as `referral-head` drops them when it
    changes the score); the copy is calibrated on its own scores instead."""
    if any(meta.get(key) is not None for key in CHOSEN_ON_SCORES):
        log.warning(
            "%s's referral threshold was chosen on its float32 scores, which the %s copy moves: the copy has "
            "none (its refer column stays empty); choose its own with `cxrbatch calibrate` on the site's films, "
            "--models a folder holding the copy as classifier.onnx",
            source,
            precision,
        )
    return {**{k: v for k, v in meta.items() if k not in CHOSEN_ON_SCORES}, "precision": precision}
