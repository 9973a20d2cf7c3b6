"""A ledger's months of history: a night's run costs what its own files do.

A programme screening 20,000 films a night gathers millions of files, results and entries in its
ledger. A run read every one of them (every file's size and times, every result under its
settings) to look up its own few: over a ledger of a million earlier films a rerun of 1,000
took 3.75 s and 569 MB, against 0.52 s and 190 MB now (benchmarks/results/ledger_history.json),
and a year of such nights would pass any memory limit. The work is counted here in SQLite's
virtual-machine steps (its progress handler, called every 1,000 steps of a statement), which do
not depend on the machine's speed.
"""

from __future__ import annotations

import csv
import os
import sqlite3
import tracemalloc
from pathlib import Path

import pytest
from helpers import grey_image, make_classifier, make_gate
from typer.testing import CliRunner

import cxrbatch.ledger as ledger_module
from benchmarks.ledger_history import add_history
from cxrbatch.cli import app
from cxrbatch.ledger_view import inspect

runner = CliRunner()
HISTORY = 20_000  # earlier nights' films, none of them in tonight's folder
STEPS = 1000  # SQLite calls the counter every this many virtual-machine instructions


def _counted_run(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[int, int, str]:
    """Run `cxrbatch run ARGS`: its exit code, the thousands of steps the ledger's statements ran, stderr."""
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0  # go on

    def connect(path: Path, migrate: bool) -> sqlite3.Connection:
        db = real(path, migrate)
        db.set_progress_handler(count, STEPS)
        return db

    real = ledger_module.connect
    monkeypatch.setattr(ledger_module, "connect", connect)
    result = runner.invoke(app, ["run", *args])
    monkeypatch.undo()
    return result.exit_code, steps[0], result.stderr


def test_a_night_over_a_ledger_of_many_earlier_nights_reads_only_its_own_files(
    monkeypatch: pytest.MonkeyPatch, tiny_models: Path, tmp_path: Path
) -> None:
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170, 250, 60)):
        grey_image(inbox / f"img{i}.png", level)
    ledger = tmp_path / "ledger.db"

    def night(name: str, *extra: str) -> tuple[int, list[dict[str, str]]]:
        out = tmp_path / f"{name}.csv"
        args = [str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out), *extra]
        code, steps, err = _counted_run(monkeypatch, args)
        assert code == 0, err
        return steps, list(csv.DictReader(out.open(encoding="utf-8")))

    night("first")  # screens the five films
    grey_image(inbox / "new.png", 90)
    alone, rows = night("second")
    assert [Path(r["path"]).name for r in rows] == ["new.png"]
    alone_all, rows = night("second-all", "--report-all")
    assert len(rows) == 6

    add_history(ledger, HISTORY)
    grey_image(inbox / "newer.png", 200)
    among, rows = night("third")
    assert [Path(r["path"]).name for r in rows] == ["newer.png"]  # the history is not tonight's news
    among_all, rows = night("third-all", "--report-all")
    assert sorted(Path(r["path"]).name for r in rows) == sorted(p.name for p in inbox.iterdir())

    # each lookup goes by the night's own paths and contents (no statement here runs 1,000 steps);
    # reading the 20,000 earlier films' rows took 260 thousand steps, 940 with --report-all
    assert among <= alone + 20 and among_all <= alone_all + 20, (alone, among, alone_all, among_all)


def test_the_ledger_view_counts_many_earlier_nights_without_holding_them(
    monkeypatch: pytest.MonkeyPatch, tiny_models: Path, tmp_path: Path
) -> None:
    # `cxrbatch ledger` kept every path's newest result in memory to count them: 648 MB for a
    # ledger of 1,000,000 films; it now counts one path at a time (65 MB for the same ledger)
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    grey_image(inbox / "a.png", 90)
    ledger = tmp_path / "ledger.db"
    out = tmp_path / "r.csv"
    _counted_run(monkeypatch, [str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)])
    add_history(ledger, HISTORY)
    tracemalloc.start()
    try:
        status = inspect(ledger)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status["files"] == HISTORY + 1 and status["by_status"] == {"classified": HISTORY + 1}
    assert sum(status["by_label"].values()) == HISTORY + 1
    assert peak < 2_000_000, peak  # holding the 20,001 results took 23 MB


def test_lookups_split_into_many_statements_give_the_same_nights(tiny_models: Path, tmp_path: Path) -> None:
    # A night's lookups go 500 keys to a statement (`rows_for`); no other test has that many
    # files. With 2 keys to a statement every lookup here is split: the nights (new, changed and
    # copied files, a run killed before its report, other settings, --report-all) must report
    # what they report with every key in one statement.
    other = tmp_path / "other-models"
    other.mkdir()
    make_gate(other / "gate.onnx", threshold=0.45)  # other settings: every film is screened again
    make_classifier(other / "classifier.onnx")

    def killed(name: str) -> None:
        if name == "before_report":
            raise SystemExit(137)  # as kill -9 there: its results stored, none delivered

    def nights(root: Path, chunk: int) -> list[list[dict[str, str]]]:
        inbox = root / "incoming"
        for i, name in enumerate(("b.png", "a.png", "é.png", "Z.png", "sub/c.png", "sub/d.png", "😀.png")):
            (inbox / name).parent.mkdir(parents=True, exist_ok=True)
            grey_image(inbox / name, 20 + 30 * i)
        reports = []
        for n, (models, extra) in enumerate(
            [(tiny_models, []), (tiny_models, ["--report-all"]), (tiny_models, []), (other, []), (tiny_models, [])]
        ):
            if n == 1:
                grey_image(inbox / "new.png", 5)
                grey_image(inbox / "a.png", 250)  # changed
                (inbox / "copy.png").write_bytes((inbox / "b.png").read_bytes())
            if n == 2:
                grey_image(inbox / "sub" / "late.png", 15)
                grey_image(inbox / "é.png", 240)
            out = root / f"night-{n}.csv"
            args = [str(inbox), "--models", str(models), "--ledger", str(root / "l.db"), "--out", str(out), *extra]
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(ledger_module, "CHUNK", chunk)
                if n == 2:
                    patch.setattr("cxrbatch.ledger_run.crash_point", killed)
                result = runner.invoke(app, ["run", *args])
            assert result.exit_code == (137 if n == 2 else 0), result.stderr
            rows = list(csv.DictReader(out.open(encoding="utf-8"))) if out.exists() else []
            reports.append([{**row, "path": os.path.relpath(row["path"], root)} for row in rows])
        return reports

    split = nights(tmp_path / "split", 2)
    assert [len(rows) for rows in split] == [7, 9, 0, 10, 2], split
    assert split == nights(tmp_path / "whole", 1_000_000)
