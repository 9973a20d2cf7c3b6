"""The checks of a source registry that `cxrbatch data build` reads: a mistake is a UsageError
naming the entry, never a key or a pattern silently ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import entry, film, make_repo, png, rule

from cxrbatch.databuild.builder import build
from cxrbatch.databuild.registry import load_registry
from cxrbatch.errors import UsageError

COMMIT = "a" * 40
DATASET = '[[source]]\ndataset = "dev"\n[source.collections]\n"org/repo" = "dev"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            entry("a/b", COMMIT, rule("*", "NORMAL", "s") + "patinet = '(P\\d+)_'\n"),
            r"source 1 \(a/b\): unknown key 'patinet'; a \[\[source.files\]\] rule takes age_group, collection, glob, "
            r"label, patient, patient_namespace, split",
        ),
        (entry("a/b", COMMIT, rule("*", "NORMAL", "s") + 'spilt = "test"\n'), "unknown key 'spilt'"),
        (
            entry("a/b", COMMIT, rule("*", "NORMAL", "s")).replace("age_group", 'excludes = ["x"]\nage_group'),
            r"source 1 \(a/b\): unknown key 'excludes'; a repo entry takes age_group, commit, exclude, files",
        ),
        (DATASET.replace('"dev"\n', '"dev"\nexclude = ["x"]\n', 1), r"unknown key 'exclude'; a dataset entry takes"),
        (DATASET + rule("*", "NORMAL", "s"), r"source 1 \(dev\): unknown key 'files'; a dataset entry takes"),
        (entry("a/b", COMMIT, rule("*", "NORMAL", "s")) + '[source.collections]\n"x" = "y"\n', "unknown key 'coll"),
    ],
)
def test_unknown_keys_are_refused(tmp_path: Path, text: str, message: str) -> None:
    registry = tmp_path / "r.toml"
    registry.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_registry(registry)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            entry("a/b", COMMIT, rule("*", "NORMAL", "s").replace("[[source.files]]", "[source.files]")),
            "double brackets",
        ),
        (
            entry("a/b", COMMIT, 'files = "img/*.png"\n'),
            r"source 1 \(a/b\): write each file rule as a \[\[source.files",
        ),
        (DATASET.replace('"dev"\n', '"dev"\ncollections = ["org/repo"]\n', 1).split("[source.coll")[0], "a table of"),
        (
            entry("a/b", COMMIT, rule("*", "NORMAL", "s")).replace("age_group", 'exclude = "img/1.png"\nage_group'),
            r'source 1 \(a/b\): exclude must be a list of globs, e.g. exclude = \["img/1.png"\]',
        ),
        (
            entry("a/b", COMMIT, rule("*", "NORMAL", "s").replace('glob = "*"', "glob = 3")),
            "glob must be a string, not 3",
        ),
        ('source = ["a/b"]\n', r"source 1: write each source as a \[\[source\]\] table"),
    ],
)
def test_values_of_the_wrong_type_are_refused(tmp_path: Path, text: str, message: str) -> None:
    registry = tmp_path / "r.toml"
    registry.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_registry(registry)


def test_a_patient_regex_that_reads_no_id_stops_the_build(tmp_path: Path) -> None:
    """Patient ids are what keep one patient's films in one split: a regex that reads none (here
    lower case against upper-case names) would scatter them over train, val and test."""
    mirrors = tmp_path / "mirrors"
    files = {f"img/P{p:03d}_{k}.png": png(film(10 * p + k)) for p in range(3) for k in range(2)}
    files |= {f"other/{i}.png": png(film(100 + i)) for i in range(2)}
    commit = make_repo(mirrors, "o/r", files)
    registry = tmp_path / "r.toml"
    registry.write_text(
        entry("o/r", commit, rule("img/*.png", "NORMAL", "x", r"(p\d{3})_") + rule("other/*", "NORMAL", "x", r"(\d)"))
    )
    with pytest.raises(UsageError, match=r"match no file: o/r at [0-9a-f]{10}: patient '\(p\\d\{3\}\)_' of rule 'img/"):
        build(registry, mirrors, tmp_path / "out", tmp_path)
    assert not (tmp_path / "out").exists()
    registry.write_text(
        entry("o/r", commit, rule("img/*.png", "NORMAL", "x", r"(P\d{3})_") + rule("other/*", "NORMAL", "x"))
    )
    build(registry, mirrors, tmp_path / "out", tmp_path)
