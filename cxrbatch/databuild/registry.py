"""The source registry: one reviewed TOML file listing every collection a training tree is built from.

A source is a GitHub repository at a commit (`repo` + `commit`, read from a local mirror), a
wheel (`package` = "name==version", read from a .whl file among the mirrors) or a `dataset`
folder already built in this project's format (a MANIFEST.csv and `split/LABEL/id.jpg`, such as
the developer set), whose rows keep their own provenance. `[[source.files]]` rules label a
repository's or wheel's files: the first rule whose glob matches a path decides its label,
collection and patient id; unmatched files are not used. Patient ids are namespaced by the
collection, or by `patient_namespace` where a rule gives one (the developer set's are `nih`,
`ieee8023`, `kermany`, `cxnet`, `actualmed`, `figure1`): a film of an NIH patient from another
repository then shares its cluster with that patient's films in the developer set.

A rule may give its files a `split` of their own, as a dataset's rows have one (a cluster holding
them takes the most held-out split among its films). Films labelled `ABNORMAL` (read as abnormal,
no class named: a site's normal/abnormal reads) must be given `val` or `test`: they can calibrate
and evaluate a model, never train one. A registry of such films (`export/sites.toml`) builds
evaluation sites the same way the training registry builds the training tree.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from cxrbatch.datasets import ABNORMAL, SPLITS
from cxrbatch.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

LABELS = ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")
AGE_GROUPS = ("adult", "pediatric", "unknown")

# Reserved for independent evaluation: never a training source, nor any file named like them.
RESERVED_REPOS = frozenset(
    {
        "pi-null-mezon/openist",
        "ml-workgroup/covid-19-image-repository",
        "kishorenmproject/lung_disease",
        "mlmed/torchxrayvision",
    }
)
RESERVED_FILE = re.compile(r"(?:^|/)(?:tuberculosis|normal)-\d+\.png$", re.IGNORECASE)
# The one reserved repository whose films a dataset source may carry, at this commit only: the
# developer set's kaggle-curated films (that repository's test/ folder), which its README lists
# as a source with every cluster touching a reserved set removed (models/README.md). A dataset's
# row of any other reserved repository, or named like a reserved file, is skipped.
ADMITTED_IN_DATASETS = frozenset({("kishorenmproject/lung_disease", "7c68edc76a9398cf886f8caaab6d2ba2d802061d")})

# The keys each kind of entry takes: any other is refused, never ignored. A dataset's rows are
# taken whole, with their own labels, licences and splits: no file rules, no exclusions.
SOURCE_KEYS = {
    "repo": frozenset({"repo", "commit", "licence", "age_group", "note", "files", "exclude"}),
    "package": frozenset({"package", "licence", "age_group", "note", "files", "exclude"}),
    "dataset": frozenset({"dataset", "age_group", "note", "collections"}),
}
RULE_KEYS = frozenset({"glob", "label", "collection", "patient", "patient_namespace", "age_group", "split"})


@dataclass(frozen=True)
class FileRule:
    """How the files under one glob are labelled."""

    glob: str
    label: str
    collection: str
    patient: re.Pattern[str] | None = None
    age_group: str | None = None
    patient_namespace: str = ""  # ids are "<namespace>:<id>"; the collection unless given
    split: str = ""  # the files' own split; "" lets their cluster's hash decide

    def patient_key(self, path: str) -> str:
        """The patient link of `path` ("" without an id): the same key joins films across sources."""
        patient = self.patient_of(path)
        return f"{self.patient_namespace or self.collection}:{patient}" if patient else ""

    def matches(self, path: str) -> bool:
        """Whether `path` (inside the source) falls under this rule."""
        return fnmatchcase(path, self.glob)

    def patient_of(self, path: str) -> str:
        """The patient id the rule's regex reads from `path` ("" without one)."""
        found = self.patient.search(path) if self.patient else None
        return found.group(1) if found else ""


@dataclass(frozen=True)
class Source:
    """One entry of the registry."""

    kind: str  # "repo", "package" or "dataset"
    name: str  # owner/name, package name, or the dataset's folder as written
    version: str  # the commit, the package version, or "" for a dataset
    licence: str
    age_group: str
    note: str = ""
    rules: tuple[FileRule, ...] = ()
    exclude: tuple[str, ...] = ()
    collections: dict[str, str] = field(default_factory=dict)  # dataset: manifest source -> collection

    def rule_for(self, path: str) -> FileRule | None:
        """The first rule that takes `path`, or None when the file is not used."""
        if any(fnmatchcase(path, pattern) for pattern in self.exclude):
            return None
        return next((rule for rule in self.rules if rule.matches(path)), None)

    def idle_patterns(self, paths: list[str]) -> list[str]:
        """The rules that take none of `paths`, the patient regexes that read an id from none of
        their rule's files, and the exclusions that leave them all: at a pinned commit, a typo (or
        a rule an earlier one shadows), never a choice. An idle patient regex links no films of
        one patient, which then fall into different splits."""
        taken: dict[int, list[str]] = {}
        for path in paths:
            taken.setdefault(id(self.rule_for(path)), []).append(path)
        idle = []
        for rule in self.rules:
            mine = taken.get(id(rule), [])
            if not mine:
                idle.append(f"rule {rule.glob!r}")
            elif rule.patient and not any(rule.patient_of(path) for path in mine):
                idle.append(f"patient '{rule.patient.pattern}' of rule {rule.glob!r}")
        return idle + [f"exclude {g!r}" for g in self.exclude if not any(fnmatchcase(p, g) for p in paths)]

    @property
    def label(self) -> str:
        """How the source is named in the manifest's `source` column."""
        return f"pypi:{self.name}" if self.kind == "package" else self.name


def load_registry(path: Path) -> list[Source]:
    """Read and check a registry file; every mistake is a UsageError naming the entry."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"Cannot read the registry {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"The registry {path} is not valid TOML: {exc}") from None
    entries = data.get("source")
    if not isinstance(entries, list) or not entries:
        raise UsageError(f"The registry {path} lists no [[source]] entries")
    sources = [_source(entry, i + 1) for i, entry in enumerate(entries)]
    names = [s.label for s in sources]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(f"The registry {path} lists a source twice: {repeated}")
    return sources


def _source(entry: object, number: int) -> Source:
    where = f"source {number}"
    if not isinstance(entry, dict):
        raise UsageError(f"Registry {where}: write each source as a [[source]] table")
    kinds = [k for k in ("repo", "package", "dataset") if k in entry]
    if len(kinds) != 1:
        raise UsageError(f"Registry {where}: give exactly one of repo, package or dataset")
    kind = kinds[0]
    name = _text(entry, kind, where)
    where = f"source {number} ({name})"
    _refuse_unknown_keys(entry, SOURCE_KEYS[kind], where, f"a {kind} entry")
    version = ""
    if kind == "repo":
        version = _text(entry, "commit", where)
        if not re.fullmatch(r"[0-9a-f]{40}", version):
            raise UsageError(f"Registry {where}: `commit` must be the full 40-digit commit")
        if name.lower() in RESERVED_REPOS:
            raise UsageError(f"Registry {where} is reserved for independent evaluation and cannot be a training source")
    elif kind == "package":
        name, _, version = name.partition("==")
        if not version:
            raise UsageError(f"Registry {where}: a package is pinned as name==version")
    age = _text(entry, "age_group", where, "unknown")
    _check_choice(age, AGE_GROUPS, where, "age_group")
    rules = tuple(_rule(r, where) for r in _rule_tables(entry, where))
    if kind != "dataset" and not rules:
        raise UsageError(f"Registry {where}: a {kind} needs [[source.files]] rules")
    licence = _text(entry, "licence", where)
    if kind != "dataset" and not licence:
        raise UsageError(f"Registry {where}: state the licence as the source gives it (or 'none stated')")
    return Source(
        kind=kind,
        name=name,
        version=version,
        licence=licence,
        age_group=age,
        note=_text(entry, "note", where),
        rules=rules,
        exclude=_texts(entry, "exclude", where),
        collections=_collections(entry, where),
    )


def _rule(rule: dict[str, Any], where: str) -> FileRule:
    _refuse_unknown_keys(rule, RULE_KEYS, where, "a [[source.files]] rule")
    label = _text(rule, "label", where)
    _check_choice(label, (*LABELS, ABNORMAL), where, "label")
    split = _text(rule, "split", where)
    if split:
        _check_choice(split, SPLITS, where, "split")
    if label == ABNORMAL and split not in ("val", "test"):
        raise UsageError(
            f'Registry {where}: {ABNORMAL} films name no class to learn: give their rule split = "test" (or "val")'
        )
    if "glob" not in rule or "collection" not in rule:
        raise UsageError(f"Registry {where}: every [[source.files]] rule needs glob, label and collection")
    age = _text(rule, "age_group", where) if "age_group" in rule else None
    if age is not None:
        _check_choice(age, AGE_GROUPS, where, "age_group")
    try:
        patient = re.compile(regex) if (regex := _text(rule, "patient", where)) else None
    except re.error as exc:
        raise UsageError(f"Registry {where}: bad patient regex: {exc}") from None
    if patient is not None and patient.groups < 1:
        raise UsageError(f"Registry {where}: the patient regex needs a group for the id")
    return FileRule(
        _text(rule, "glob", where), label, _text(rule, "collection", where), patient, age,
        _text(rule, "patient_namespace", where), split,
    )  # fmt: skip


def _refuse_unknown_keys(table: dict[str, Any], allowed: frozenset[str], where: str, what: str) -> None:
    """A misspelt key (`patinet`, `spilt`) would otherwise be ignored, and what it was meant to do not done."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise UsageError(f"Registry {where}: unknown key {unknown[0]!r}; {what} takes {', '.join(sorted(allowed))}")


def _text(table: dict[str, Any], key: str, where: str, default: str = "") -> str:
    value = table.get(key, default)
    if not isinstance(value, str):
        raise UsageError(f"Registry {where}: {key} must be a string, not {value!r}")
    return value


def _texts(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    """A list of strings (`exclude = "a.png"` would otherwise be read as one glob per character)."""
    values = table.get(key, [])
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UsageError(f'Registry {where}: {key} must be a list of globs, e.g. {key} = ["img/1.png"]')
    return tuple(values)


def _rule_tables(entry: dict[str, Any], where: str) -> list[dict[str, Any]]:
    tables = entry.get("files", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UsageError(f"Registry {where}: write each file rule as a [[source.files]] table (double brackets)")
    return tables


def _collections(entry: dict[str, Any], where: str) -> dict[str, str]:
    collections = entry.get("collections", {})
    if not isinstance(collections, dict) or not all(isinstance(v, str) for v in collections.values()):
        raise UsageError(
            f'Registry {where}: give [source.collections] as a table of "manifest source" = "collection" lines'
        )
    return collections


def _check_choice(value: str, choices: tuple[str, ...], where: str, key: str) -> None:
    if value not in choices:
        raise UsageError(f"Registry {where}: {key} {value!r} is not one of {', '.join(choices)}")
