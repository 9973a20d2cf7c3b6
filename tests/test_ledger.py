"""Nightly runs with a ledger: never screen twice, report each result exactly once, one run at a time."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import grey_image, make_classifier, make_gate
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.ledger import fingerprint, key_of
from cxrbatch.ledger_schema import _TABLES as TABLES
from cxrbatch.ledger_schema import LedgerError, connect

runner = CliRunner()


def _run(folder: Path, models: Path, ledger: Path, out: Path, *extra: str) -> tuple[int, list[dict[str, str]], str]:
    """One nightly run into a report file of its own (`r.csv`, then `r.2.csv`, ...): the rows it delivered."""
    target = _night(out)
    result = runner.invoke(
        app, ["run", str(folder), "--models", str(models), "--ledger", str(ledger), "--out", str(target), *extra]
    )
    rows = list(csv.DictReader(target.open(encoding="utf-8"))) if target.exists() else []
    return result.exit_code, rows, result.stderr


def _night(out: Path) -> Path:
    """The first report path after `out` that no run has written yet (a new day's report)."""
    n = 1
    while (target := out if n == 1 else out.with_name(f"{out.stem}.{n}{out.suffix}")).exists():
        n += 1
    return target


def _only_header(report: Path) -> bool:
    return report.read_text(encoding="utf-8").splitlines() == [report.read_text(encoding="utf-8").splitlines()[0]]


def _names(rows: list[dict[str, str]]) -> list[str]:
    return sorted(Path(r["path"]).name for r in rows)


def _inferences(ledger: Path) -> list[int]:
    with sqlite3.connect(ledger) as db:
        return [n for (n,) in db.execute("SELECT inferences FROM results ORDER BY sha256")]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170, 250, 60)):
        grey_image(inbox / f"img{i}.png", level)
    return inbox


def test_a_ledger_reached_through_a_symbolic_link_has_the_same_lock(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    (tmp_path / "link.db").symlink_to(ledger)
    with open(tmp_path / "l.db.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, tmp_path / "link.db", out)
    assert code == 4 and "Another cxrbatch run holds the ledger" in err


def test_a_folder_named_through_dot_dot_is_the_same_files(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    (tmp_path / "other").mkdir()
    code, rows, _ = _run(tmp_path / "other" / ".." / folder.name, tiny_models, ledger, out)
    assert code == 0 and rows == []  # nothing new: the same five files, not five moved ones


def test_a_key_keeps_a_dot_dot_that_follows_a_symbolic_link(tmp_path: Path) -> None:
    # data/current -> mnt/day/2: data/current/../archive is mnt/day/archive, not data/archive
    (tmp_path / "mnt" / "day" / "2").mkdir(parents=True)
    (tmp_path / "mnt" / "day" / "archive").mkdir()
    (tmp_path / "data" / "archive").mkdir(parents=True)
    (tmp_path / "data" / "current").symlink_to(tmp_path / "mnt" / "day" / "2")
    through_link = tmp_path / "data" / "current" / ".." / "archive" / "film.png"
    assert key_of(through_link) == str(through_link)
    assert key_of(through_link) != key_of(tmp_path / "data" / "archive" / "film.png")
    plain = tmp_path / "data" / "archive" / ".." / "archive" / "film.png"
    assert key_of(plain) == str(tmp_path / "data" / "archive" / "film.png")


def test_second_run_with_nothing_new_reports_nothing(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)]
    assert f"new ledger {ledger}: every file is screened" in err  # by its full path (a relative one is easily another)
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and rows == [] and "new ledger" not in err
    assert _only_header(tmp_path / "r.2.csv")
    assert "0 files: 0 classified" in err
    assert _inferences(ledger) == [1] * 5


def test_new_and_changed_files_are_screened_and_reported(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    grey_image(folder / "img1.png", 240)  # new content under an old name
    grey_image(folder / "new.png", 100)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and _names(rows) == ["img1.png", "new.png"]
    assert next(r for r in rows if r["path"].endswith("img1.png"))["label"] == "TUBERCULOSIS"
    assert _inferences(ledger) == [1] * 7


def test_content_written_with_its_size_and_mtime_put_back_is_screened_again(tiny_models: Path, tmp_path: Path) -> None:
    # An export that rewrites a film of fixed size and stamps it with the study time (or `cp -p`,
    # `touch -r`) kept the old content's result: size and mtime were all that was compared.
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    film = grey_image(inbox / "film.bmp", 110)
    before = film.stat()
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and rows[0]["label"] == "NORMAL"
    grey_image(film, 240)  # another film, the same number of bytes
    os.utime(film, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = film.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and [r["label"] for r in rows] == ["TUBERCULOSIS"]
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and rows == []  # unchanged since: neither hashed into a new result nor delivered again


def test_a_schema_2_ledger_is_upgraded_and_only_hashes_its_files_again(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    with sqlite3.connect(ledger) as db:  # as schema 2 left it: no change times
        db.execute("ALTER TABLE files DROP COLUMN ctime_ns")
        db.execute("UPDATE meta SET value = 'cxrbatch.ledger/2' WHERE key = 'schema'")
    db.close()
    viewed = runner.invoke(app, ["ledger", str(ledger), "--json"])  # a monitoring job, before the upgrade
    assert viewed.exit_code == 0 and json.loads(viewed.stdout)["files"] == 5
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and rows == [] and "upgraded from cxrbatch.ledger/2 to cxrbatch.ledger/3" in err
    assert _inferences(ledger) == [1] * 5  # nothing screened again, nothing delivered again
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT count(*) FROM files WHERE ctime_ns = -1").fetchone() == (0,)  # hashed once more
    db.close()


def test_a_schema_2_ledger_of_preprocessing_1_screens_again_but_reports_only_what_changed(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # Every schema-2 version screened with preprocessing version 1: after the upgrade each film is
    # screened again, and the next night's report held every film again, the same results it
    # had already delivered (the README promised a schema-2 upgrade "screens and reports nothing again").
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    with sqlite3.connect(ledger) as db:  # as a schema-2 version left it
        ((text,),) = db.execute("SELECT settings FROM settings").fetchall()
        settings = {**json.loads(text), "preprocessing": 1}
        old = fingerprint(settings)
        db.execute("UPDATE settings SET fingerprint = ?, settings = ?", (old, json.dumps(settings, sort_keys=True)))
        for table in ("results", "entries"):
            db.execute(f"UPDATE {table} SET fingerprint = ?", (old,))
        changed = key_of(folder / "img2.png")  # a film that version read otherwise (an inverted TIFF, say)
        db.execute(
            "UPDATE results SET record = json_set(record, '$.confidence', 0.5) "
            "WHERE sha256 = (SELECT sha256 FROM entries WHERE path = ?)",
            (changed,),
        )
        db.execute(  # the sixth decimal moves with a batch's make-up and the machine: no news
            "UPDATE results SET record = json_set(record, '$.confidence', json_extract(record, '$.confidence') "
            "+ 0.000001) WHERE sha256 = (SELECT sha256 FROM entries WHERE path = ?)",
            (key_of(folder / "img3.png"),),
        )
        db.execute("ALTER TABLE files DROP COLUMN ctime_ns")
        db.execute("UPDATE meta SET value = 'cxrbatch.ledger/2' WHERE key = 'schema'")
    db.close()
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and "5 to screen" in err  # new settings: screened again, once
    assert [r["path"] for r in rows] == [changed]  # only the result that changed is news
    assert _run(folder, tiny_models, ledger, out)[:2] == (0, [])
    status = _view(ledger)
    assert status["undelivered"] == 0 and status["files"] == 5


def test_a_ledger_of_a_newer_schema_is_refused_as_a_newer_versions_untouched(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # A rollback to an older install: the ledger was called "not a cxrbatch ledger".
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    with sqlite3.connect(ledger) as db:
        db.execute("UPDATE meta SET value = 'cxrbatch.ledger/99' WHERE key = 'schema'")
    db.close()
    before = ledger.read_bytes()
    for args in (["ledger", str(ledger)], ["run", str(folder), "--models", str(tiny_models), "--ledger", str(ledger)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1 and "schema cxrbatch.ledger/99, which a newer cxrbatch made" in result.stderr
    assert ledger.read_bytes() == before


def test_renamed_file_is_reported_without_inference(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    (folder / "sub").mkdir()
    (folder / "img2.png").rename(folder / "sub" / "moved.png")
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and _names(rows) == ["moved.png"]
    assert rows[0]["label"] == "PNEUMONIA"
    assert _inferences(ledger) == [1] * 5  # no new inference
    assert "0 to screen" in err


def test_new_models_screen_everything_again(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    make_gate(tiny_models / "gate.onnx", threshold=0.4)  # a different gate file: a different hash
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and len(rows) == 5
    assert len({r["gate_model"] for r in rows}) == 1
    assert len(_inferences(ledger)) == 10


def test_report_all_repeats_delivered_results(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    code, rows, _ = _run(folder, tiny_models, ledger, out, "--report-all")
    assert code == 0 and len(rows) == 5
    assert _inferences(ledger) == [1] * 5
    assert runner.invoke(app, ["run", str(folder), "--models", str(tiny_models), "--report-all"]).exit_code == 2


def test_unreadable_files_are_reported_each_run(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 3 and len(rows) == 6
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and rows == []  # same broken content: its error row was delivered once


CRASH_SCRIPT = """
import sys
import threading
import time
from cxrbatch.cli import app
app(sys.argv[1:])
"""


@pytest.mark.parametrize("point", ["batch_committed", "before_report", "after_report"])
def test_kill_9_then_rerun_reports_every_file_once(folder: Path, tiny_models: Path, tmp_path: Path, point: str) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    args = [
        "run",
        str(folder),
        "--models",
        str(tiny_models),
        "--ledger",
        str(ledger),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "CXRBATCH_CRASH_AT": point}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9  # killed as by kill -9
    committed = len(_inferences(ledger))
    assert committed == (2 if point == "batch_committed" else 5)
    code, rows, err = _run(folder, tiny_models, ledger, out, "--batch-size", "2")
    assert code == 0
    assert _names(rows) == [f"img{i}.png" for i in range(5)]  # every file exactly once
    assert _inferences(ledger) == [1] * 5  # nothing committed was inferred again
    assert f"{5 - committed} to screen" in err
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and rows == []


def test_a_killed_runs_results_under_other_settings_are_not_reported_beside_this_runs(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # killed before its report, then run again with other settings (new models, --no-draft): the
    # killed run's results and the new ones were both delivered, two rows for each film (on the
    # bench set with --no-draft, 510 rows for 294 films)
    ledger, out, newer = tmp_path / "l.db", tmp_path / "r.csv", _other_models(tiny_models, tmp_path)
    assert _killed_at("before_report", folder, tiny_models, ledger, out) == -9 and len(_inferences(ledger)) == 5
    code, rows, err = _run(folder, newer, ledger, out)
    assert code == 0 and "5 to screen" in err  # other settings: screened again
    assert _names(rows) == [f"img{i}.png" for i in range(5)]  # each film once, as now screened
    assert {r["classifier_model"] for r in rows} == {_sha12(newer / "classifier.onnx")}
    assert _run(folder, newer, ledger, out)[:2] == (0, [])
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # back to the killed run's models: its results, once
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)]
    assert {r["classifier_model"] for r in rows} == {_sha12(tiny_models / "classifier.onnx")}
    assert _run(folder, tiny_models, ledger, out)[:2] == (0, [])


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def test_sigterm_while_a_report_is_written_leaves_no_temporary_file(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # cron's `timeout` sends SIGTERM: Python died at once and left `.r.csv.*.tmp` beside the report.
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    args = ["run", str(folder), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "writing r.csv", "CXRBATCH_CRASH_SIGNAL": "15"}
    cli = "from cxrbatch.cli import main; main()"  # the console script: argv after -c are its arguments
    proc = subprocess.run([sys.executable, "-c", cli, *args], env=env, capture_output=True, timeout=120, text=True)
    assert proc.returncode == 143 and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".r.csv")) == [] and not out.exists()
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # the rerun delivers what the stopped run could not
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)] and _inferences(ledger) == [1] * 5


def test_second_run_on_a_held_ledger_exits_4(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    with open(tmp_path / "l.db.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 4
    assert "Another cxrbatch run holds the ledger" in err
    assert not out.exists()
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # released with its holder
    assert code == 0 and len(rows) == 5


# the last: another program's SQLite file with a table of the ledger's own table's name
@pytest.mark.parametrize("content", [b"this is not a database at all" * 10, "patients", "meta"])
def test_foreign_or_corrupt_ledger_is_refused_untouched(
    folder: Path, tiny_models: Path, tmp_path: Path, content: bytes | str
) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    if isinstance(content, str):
        with sqlite3.connect(ledger) as db:
            db.execute(f"CREATE TABLE {content} (name TEXT)")
            db.execute(f"INSERT INTO {content} VALUES ('x')")
        db.close()
    else:
        ledger.write_bytes(content)
    before = ledger.read_bytes()
    code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 1
    assert "is not a" in err and "cxrbatch ledger" in err and "left untouched" in err
    assert ledger.read_bytes() == before and not out.exists()
    viewed = runner.invoke(app, ["ledger", str(ledger)])  # the view, which never writes, says so too
    assert viewed.exit_code == 1 and "cxrbatch ledger" in viewed.stderr and "cannot be written" not in viewed.stderr


def test_ledger_command_shows_counts_and_last_run(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    grey_image(folder / "late.png", 20)
    result = runner.invoke(app, ["ledger", str(ledger)])
    assert result.exit_code == 0
    assert "5 files in the ledger; 0 results not yet delivered" in result.stdout
    assert "by status: classified 5" in result.stdout
    assert "by label: COVID19 2, NORMAL 1, PNEUMONIA 1, TUBERCULOSIS 1" in result.stdout
    assert "last run #1: done" in result.stdout and "screened 5, reused 0, reported 5" in result.stdout
    assert runner.invoke(app, ["ledger", str(tmp_path / "none.db")]).exit_code == 2


def test_duplicate_content_in_one_run_is_inferred_once(tmp_path: Path, tiny_models: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    grey_image(inbox / "a.png", 170)
    grey_image(inbox / "copy_of_a.png", 170)
    code, rows, _ = _run(inbox, tiny_models, tmp_path / "l.db", tmp_path / "r.csv")
    assert code == 0 and _names(rows) == ["a.png", "copy_of_a.png"]
    assert {r["label"] for r in rows} == {"PNEUMONIA"}
    assert _inferences(tmp_path / "l.db") == [1]


def test_undecodable_file_names_are_kept_in_the_ledger(tmp_path: Path, tiny_models: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    grey_image(inbox / os.fsdecode(b"scan-\xff.png"), 170)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and [Path(r["path"]).name for r in rows] == ["scan-\\xff.png"]
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and rows == []  # recognised on the second run


def test_a_file_unreadable_then_readable_replaces_its_error_row_in_the_same_report(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root in CI, where chmod cannot lock a file; simulate what open() says. The
    # folder is named relative to the working directory, as a cron line names it.
    monkeypatch.chdir(folder.parent)
    locked = folder / "img1.png"
    real_open = open

    def deny(file: object, *args: object, **kwargs: object) -> object:
        if Path(str(file)).absolute() == locked:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    args = ["run", folder.name, "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
    monkeypatch.setattr("builtins.open", deny)
    assert runner.invoke(app, args).exit_code == 3
    monkeypatch.setattr("builtins.open", real_open)
    assert runner.invoke(app, args).exit_code == 0  # the same day's report path, now readable
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 5 and len({r["path"] for r in rows}) == 5
    assert all(Path(r["path"]).is_absolute() for r in rows)
    [row] = [r for r in rows if Path(r["path"]).name == "img1.png"]
    assert row["status"] != "error" and row["error"] == ""


def test_a_folder_unlistable_then_listable_gives_way_to_its_films_in_the_same_report(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked = folder / "sub"
    locked.mkdir()
    grey_image(locked / "deep.png", 90)
    real_scandir, real_listdir = os.scandir, os.listdir

    def deny(real):  # type: ignore[no-untyped-def]
        def call(path: object) -> object:
            if Path(str(path)) == locked:
                raise PermissionError(13, "Permission denied")
            return real(path)

        return call

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    args = ["run", str(folder), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
    monkeypatch.setattr(os, "scandir", deny(real_scandir))
    monkeypatch.setattr(os, "listdir", deny(real_listdir))
    assert runner.invoke(app, args).exit_code == 3
    first = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["path"] for r in first if r["status"] == "error"] == [str(locked)]
    monkeypatch.setattr(os, "scandir", real_scandir)
    monkeypatch.setattr(os, "listdir", real_listdir)
    assert runner.invoke(app, args).exit_code == 0  # the same day's report, the folder readable now
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert sorted(Path(r["path"]).name for r in rows) == ["deep.png", *sorted(f"img{i}.png" for i in range(5))]
    assert all(r["status"] != "error" for r in rows)


@pytest.mark.parametrize("left", ["header", "tables", "schema-1 tables"])
def test_a_ledger_whose_creation_was_interrupted_is_created_by_the_next_run(
    folder: Path, tiny_models: Path, tmp_path: Path, left: str
) -> None:
    # What a full disk or a kill during creation left: SQLite's header alone (journal_mode=WAL writes
    # it), or, from earlier versions of this code, the tables committed without their schema row.
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    with sqlite3.connect(ledger) as db:
        db.execute("PRAGMA journal_mode=WAL")
        if left == "tables":
            db.executescript(TABLES)
        elif left == "schema-1 tables":  # the same names, other columns
            db.executescript(TABLES.replace("fingerprint", "models"))
    db.close()
    assert ledger.stat().st_size > 0
    view = runner.invoke(app, ["ledger", str(ledger)])
    assert view.exit_code == 1 and "holds no ledger yet" in view.stderr
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and len(rows) == 5
    assert runner.invoke(app, ["ledger", str(ledger)]).exit_code == 0


def test_ledger_creation_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A creation that fails part way (here: a statement after the first tables) leaves no tables behind.
    ledger = tmp_path / "l.db"
    monkeypatch.setattr("cxrbatch.ledger_schema._TABLES", TABLES + "CREATE TABLE broken (;")
    with pytest.raises(LedgerError):
        connect(ledger, migrate=True)
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)
    db.close()


@pytest.mark.parametrize("damage", ["{not json", "{}", "null", '{"status": "classified", "label": 7}'])
def test_a_damaged_result_is_screened_again_not_a_traceback_every_night(
    folder: Path, tiny_models: Path, tmp_path: Path, damage: str
) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    with sqlite3.connect(ledger) as db:
        (sha,) = db.execute("SELECT sha256 FROM results ORDER BY sha256 LIMIT 1").fetchone()
        db.execute("UPDATE results SET record = ? WHERE sha256 = ?", (damage, sha))
    db.close()
    viewed = runner.invoke(app, ["ledger", str(ledger)])
    assert viewed.exit_code == 0 and "1 stored results cannot be read" in viewed.stdout, viewed.stderr
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 0 and "Traceback" not in err and "a result in the ledger cannot be read" in err
    assert rows == [] and "1 screened" in err  # screened again and replaced; delivered already, so not again
    status = _view(ledger)
    assert "damaged_results" not in status and status["files"] == 5


def test_the_ledger_command_reads_a_ledger_it_may_not_write(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A monitoring account that may not write the ledger's folder: a read-write open failed with
    # "attempt to write a readonly database", though nothing needs writing to read it.
    ledger = tmp_path / "l.db"
    _run(folder, tiny_models, ledger, tmp_path / "r.csv")
    opened = sqlite3.connect

    class Refused:  # what a read-write connection gives where the user may not write the folder
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        def close(self) -> None:
            pass

    def read_only_folder(target: object, *args: object, **kwargs: object) -> object:
        return opened(target, *args, **kwargs) if kwargs.get("uri") else Refused()  # type: ignore[arg-type]

    monkeypatch.setattr("cxrbatch.ledger.sqlite3.connect", read_only_folder)
    viewed = runner.invoke(app, ["ledger", str(ledger), "--json"])
    assert viewed.exit_code == 0, viewed.stderr
    assert json.loads(viewed.stdout)["files"] == 5


def test_a_damaged_row_of_a_report_is_taken_again_from_the_result_that_run_delivered(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # A same-day rerun rewrites the report with the rows it received before: a damaged one was lost.
    ledger, out = tmp_path / "l.db", tmp_path / "day.csv"
    args = ["run", str(folder), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    before = out.read_text(encoding="utf-8")
    with sqlite3.connect(ledger) as db:
        db.execute("UPDATE run_rows SET record = 'garbage' WHERE seq = 2")
    db.close()
    grey_image(folder / "later.png", 90)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "cannot be read back" not in again.stderr
    rows = out.read_text(encoding="utf-8").splitlines()
    assert rows[: len(before.splitlines())] == before.splitlines() and rows[-1].split(",")[0].endswith("later.png")


def test_the_ledger_command_counts_only_the_newest_result_of_a_path(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    _run(folder, tiny_models, ledger, out)
    with sqlite3.connect(ledger) as db:
        (sha,) = db.execute("SELECT sha256 FROM results ORDER BY sha256 LIMIT 1").fetchone()
        db.execute("UPDATE results SET record = 'garbage' WHERE sha256 = ?", (sha,))
    db.close()
    _run(folder, tiny_models, ledger, out, "--no-draft")  # other settings: a newer result for every path
    status = _view(ledger)
    assert "damaged_results" not in status and status["files"] == 5  # the damaged one is superseded


def test_a_ledger_with_a_write_ahead_log_is_not_read_without_it(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read as it lies (immutable), the main file lacks what the log of a run that died still holds.
    ledger = tmp_path / "l.db"
    _run(folder, tiny_models, ledger, tmp_path / "r.csv")
    (tmp_path / "l.db-wal").write_bytes(b"\0" * 4096)  # as a killed run leaves it

    class Refused:
        def execute(self, *args: object) -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        def close(self) -> None:
            pass

    monkeypatch.setattr("cxrbatch.ledger.sqlite3.connect", lambda *args, **kwargs: Refused())
    viewed = runner.invoke(app, ["ledger", str(ledger)])
    assert viewed.exit_code == 1 and "its write-ahead log needs write access to its folder" in viewed.stderr


def test_a_film_replaced_between_its_hashing_and_its_decoding_gives_no_film_its_result(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch.ledger import Ledger

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    hashed = Ledger.content_hashes
    original = (folder / "img1.png").read_bytes()

    def then_replaced(self: Ledger, paths: list[Path]) -> dict[Path, str | None]:
        found = hashed(self, paths)
        grey_image(folder / "new.png", 250)  # rsync's way: another film renamed over the path
        os.replace(folder / "new.png", folder / "img1.png")
        return found

    monkeypatch.setattr(Ledger, "content_hashes", then_replaced)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    row = next(r for r in rows if r["path"].endswith("img1.png"))
    assert code == 3 and row["status"] == "error" and "changed while it was screened" in row["error"]
    monkeypatch.undo()
    (tmp_path / "archive").mkdir()
    (tmp_path / "archive" / "old.png").write_bytes(original)  # the content that was hashed, elsewhere
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # the film now there is screened, as it is
    assert code == 0 and [Path(r["path"]).name for r in rows] == ["img1.png"] and rows[0]["status"] != "error"
    code, rows, _ = _run(tmp_path / "archive", tiny_models, ledger, out)
    alone = runner.invoke(app, ["run", str(tmp_path / "archive"), "--models", str(tiny_models), "--out", "-"])
    expected = next(csv.DictReader(alone.stdout.splitlines()))
    assert code == 0 and rows[0]["p_NORMAL"] == expected["p_NORMAL"]  # its own result, not the replacement's


def test_what_a_stopped_run_left_undelivered_waits_for_a_run_over_its_own_folder(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ward_b = tmp_path / "ward-b"
    ward_b.mkdir()
    grey_image(ward_b / "b.png", 130)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"

    def stop(name: str) -> None:
        if name == "before_report":
            raise RuntimeError("stopped")  # as a SIGTERM after the results were committed

    monkeypatch.setattr("cxrbatch.ledger_run.crash_point", stop)
    assert _run(folder, tiny_models, ledger, out)[0] == 1
    monkeypatch.undo()
    code, rows, _ = _run(ward_b, tiny_models, ledger, out)  # another job on the same ledger
    assert code == 0 and _names(rows) == ["b.png"]
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)]


def test_a_copy_whose_twin_changed_while_screened_is_screened_itself_and_a_chmod_changes_nothing(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch.ledger import Ledger

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    (folder / "img1_copy.png").write_bytes((folder / "img1.png").read_bytes())  # screened once, as its twin
    (folder / "img3.png").chmod(0o644)
    hashed = Ledger.content_hashes

    def then_changed(self: Ledger, paths: list[Path]) -> dict[Path, str | None]:
        found = hashed(self, paths)
        grey_image(folder / "new.png", 250)
        os.replace(folder / "new.png", folder / "img1.png")  # the twin replaced
        (folder / "img3.png").chmod(0o600)  # only img3's metadata (ctime) moves
        return found

    monkeypatch.setattr(Ledger, "content_hashes", then_changed)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    status = {Path(r["path"]).name: r["status"] for r in rows}
    assert code == 3 and len(rows) == 6 and status["img1.png"] == "error"  # every file has its row
    assert status["img1_copy.png"] != "error" and status["img3.png"] != "error"


def test_a_report_that_is_a_link_to_a_film_is_refused(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    link = tmp_path / "latest.csv"
    link.symlink_to(folder / "img4.png")
    before = (folder / "img4.png").read_bytes()
    result = runner.invoke(app, ["run", str(folder), "--models", str(tiny_models), "--out", str(link)])
    assert result.exit_code == 2 and "would be written over a film" in result.stderr
    assert (folder / "img4.png").read_bytes() == before


def _other_models(models: Path, tmp_path: Path) -> Path:
    """A models folder beside `models` with the same gate and another classifier: other settings."""
    newer = tmp_path / "newer-models"
    newer.mkdir()
    shutil.copy(models / "gate.onnx", newer / "gate.onnx")
    make_classifier(newer / "classifier.onnx", review_threshold=0.7)
    return newer


def _killed_at(point: str, folder: Path, models: Path, ledger: Path, out: Path, *extra: str) -> int:
    """A nightly run killed at the crash point `point` (SIGKILL): its exit status."""
    args = ["run", str(folder), "--models", str(models), "--ledger", str(ledger), "--out", str(out), "--quiet", *extra]
    env = {**os.environ, "CXRBATCH_CRASH_AT": point}
    return subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, timeout=120
    ).returncode


def _view(ledger: Path) -> dict:  # type: ignore[type-arg]
    result = runner.invoke(app, ["ledger", str(ledger), "--json"])
    assert result.exit_code == 0, result.stderr
    return dict(json.loads(result.stdout))


def test_a_file_back_at_an_earlier_content_is_reported_again(tiny_models: Path, tmp_path: Path) -> None:
    # NORMAL, then another film written over it, then the first film put back (a mistaken overwrite
    # undone): the third night reported nothing, and the view counted the file by the second film
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    film = inbox / "film.png"
    labels = []
    for level in (110, 240, 110):
        grey_image(film, level)
        code, rows, err = _run(inbox, tiny_models, ledger, out)
        assert code == 0, err
        labels.append([r["label"] for r in rows])
    assert labels == [["NORMAL"], ["TUBERCULOSIS"], ["NORMAL"]]
    assert _view(ledger)["by_label"] == {"NORMAL": 1}
    code, rows, _ = _run(inbox, tiny_models, ledger, out)
    assert code == 0 and rows == []  # delivered once


def test_an_error_that_now_reads_is_delivered_for_the_files_that_hold_it_now(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an unreadable film (a DICOM before the extra was installed) filed away by a sorting script:
    # once it read, its result was delivered under its old path too, which no longer held it
    from cxrbatch import decoding
    from cxrbatch.errors import ImageError

    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    grey_image(inbox / "other.png", 20)
    scan = grey_image(inbox / "scan.png", 170)
    unreadable, real = scan.read_bytes(), decoding.load_image

    def no_decoder(path, draft_size=None):  # type: ignore[no-untyped-def]
        if Path(path).read_bytes() == unreadable:
            raise ImageError("DICOM file, but pydicom is not installed")
        return real(path, draft_size=draft_size)

    monkeypatch.setattr(decoding, "load_image", no_decoder)
    assert _run(inbox, tiny_models, ledger, out)[0] == 3
    (inbox / "sorted").mkdir()
    scan.rename(inbox / "sorted" / "scan.png")
    assert _run(inbox, tiny_models, ledger, out)[0] == 3
    monkeypatch.undo()
    code, rows, err = _run(inbox, tiny_models, ledger, out)
    assert code == 0, err
    assert [(Path(r["path"]).relative_to(inbox).as_posix(), r["status"]) for r in rows] == [
        ("sorted/scan.png", "classified")
    ]


def test_a_dead_run_is_shown_interrupted_as_soon_as_the_next_run_holds_the_lock(
    tiny_models: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # it was marked so only once the next run had walked its folder and loaded its models: until
    # then `cxrbatch ledger` showed the dead run as still running
    from cxrbatch import runner as runner_module
    from cxrbatch.ledger_view import inspect

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    args = ["run", str(folder), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "batch_committed"}
    code = "from cxrbatch.cli import main; main()"
    dead = subprocess.run([sys.executable, "-c", code, *args, "--batch-size", "2"], env=env, capture_output=True)
    assert dead.returncode == -9
    seen, walk = [], runner_module._discover

    def walking(options, targets):  # type: ignore[no-untyped-def]
        seen.append(inspect(ledger)["last_run"]["status"])
        return walk(options, targets)

    monkeypatch.setattr(runner_module, "_discover", walking)
    assert _run(folder, tiny_models, ledger, tmp_path / "r2.csv")[0] == 0
    assert seen == ["interrupted"]


def test_a_ledger_on_a_nearly_full_disk_is_refused_before_anything_is_done(
    tiny_models: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite maps its shared-memory index into memory: a page the disk cannot back killed the run
    # with SIGBUS (exit 135, no log line) at a few tens of KiB free
    from cxrbatch import ledger as ledger_module

    statvfs = os.statvfs

    def full(path):  # type: ignore[no-untyped-def]
        st = statvfs(path)
        return os.statvfs_result((st.f_bsize, st.f_frsize, st.f_blocks, st.f_bfree, 24 * 1024 // st.f_frsize,
                                  *tuple(st)[5:]))  # fmt: skip

    monkeypatch.setattr(ledger_module.os, "statvfs", full)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    code, rows, err = _run(folder, tiny_models, ledger, out)
    assert code == 1 and rows == [] and not ledger.exists()
    assert f"Ledger {ledger}: only 24 KiB free on its file system; free some space and run again" in err


def test_a_file_alternating_between_two_films_is_reported_each_night(tiny_models: Path, tmp_path: Path) -> None:
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    nights = []
    for level in (110, 240, 110, 240, 240):
        grey_image(inbox / "film.png", level)
        code, rows, err = _run(inbox, tiny_models, ledger, out)
        assert code == 0, err
        nights.append([r["label"] for r in rows])
    assert nights == [["NORMAL"], ["TUBERCULOSIS"], ["NORMAL"], ["TUBERCULOSIS"], []]


def test_a_file_put_back_is_the_last_row_of_a_report_that_runs_share(tiny_models: Path, tmp_path: Path) -> None:
    # the same --out three times (a fixed report.csv): the third run's row for the film put back
    # was dropped from the union as one shown before, leaving the other film as the file's last row
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "report.csv"
    inbox.mkdir()
    for level in (110, 240, 110):
        grey_image(inbox / "film.png", level)
        result = runner.invoke(
            app, ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(out)]
        )
        assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert [r["label"] for r in rows] == ["TUBERCULOSIS", "NORMAL"]


def test_the_free_space_check_looks_where_a_linked_ledger_lies(
    tiny_models: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch import ledger as ledger_module

    (tmp_path / "small").mkdir()
    (tmp_path / "l.db").symlink_to(tmp_path / "small" / "l.db")
    asked, statvfs = [], os.statvfs

    def recording(path):  # type: ignore[no-untyped-def]
        asked.append(os.fsdecode(path))
        return statvfs(path)

    monkeypatch.setattr(ledger_module.os, "statvfs", recording)
    assert _run(folder, tiny_models, tmp_path / "l.db", tmp_path / "r.csv")[0] == 0
    assert asked[0] == os.path.realpath(tmp_path / "small")


def test_the_view_shows_a_run_that_started_during_its_read_as_running(
    tiny_models: Path, folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the lock was checked before the read: a run starting in between was shown `interrupted`
    from cxrbatch import ledger_view

    ledger = tmp_path / "l.db"
    assert _run(folder, tiny_models, ledger, tmp_path / "r.csv")[0] == 0
    with sqlite3.connect(ledger) as db:  # the state a run that has just begun leaves
        db.execute("INSERT INTO runs (started, status) VALUES ('2026-12-07T03:00:00+00:00', 'running')")
    held = iter([False, True])  # free when checked, taken by the time the rows were read
    monkeypatch.setattr(ledger_view, "_lock_is_held", lambda path: next(held))
    assert ledger_view.inspect(ledger)["last_run"]["status"] == "running"


def test_view_during_the_next_runs_open_shows_a_dead_run_interrupted(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a run killed last night (still 'running' in the ledger); `cxrbatch ledger` finds the lock free
    # and reads; the next night's run takes the lock as the read ends, and has not yet marked the
    # dead run interrupted (Ledger.open: _lock, then statvfs and connect, then the UPDATE) when the
    # view checks the lock again: the view re-reads and shows the dead run as running
    from cxrbatch import ledger_view
    from cxrbatch.ledger_lock import lock_path

    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(3):
        grey_image(inbox / f"f{i}.png", 20 + 60 * i)
    ledger = tmp_path / "l.db"
    args = ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--out", str(tmp_path / "r.csv")]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "batch_committed"}
    dead = subprocess.run([sys.executable, "-c", "from cxrbatch.cli import main; main()", *args, "--batch-size", "1"],
                          env=env, capture_output=True)  # fmt: skip
    assert dead.returncode == -9
    assert ledger_view.inspect(ledger)["last_run"]["status"] == "interrupted"  # nobody holds the lock

    real_read, taken = ledger_view._read, []

    def next_run_opens() -> None:  # Ledger.open after its flock: statvfs, connect, then the UPDATE
        time.sleep(0.2)
        with sqlite3.connect(ledger) as db:
            db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")

    def read_then_next_run_flocks(path, live):  # type: ignore[no-untyped-def]
        status = real_read(path, live)
        if not taken:  # the next run takes the lock as the read ends
            fd = os.open(lock_path(path), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            taken.append(fd)
            taken.append(threading.Thread(target=next_run_opens))
            taken[1].start()
        return status

    monkeypatch.setattr(ledger_view, "_read", read_then_next_run_flocks)
    try:
        shown = ledger_view.inspect(ledger)["last_run"]
    finally:
        taken[1].join()
        os.close(taken[0])
    assert shown["status"] == "interrupted", f"the dead run {shown['id']} is shown {shown['status']!r}"


def test_a_shared_report_survives_a_path_that_was_a_file_then_a_folder_then_the_file_again(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # incoming/x: a film (NORMAL), another film (TUBERCULOSIS), a folder that cannot be listed (an
    # error row), the folder with a film in it, and the first film put back: union() looks up
    # latest["…/x"], which the folder's row took away when the folder's files came
    import shutil

    from cxrbatch import discovery

    inbox, ledger, out = tmp_path / "incoming", tmp_path / "l.db", tmp_path / "report.csv"
    inbox.mkdir()
    x = inbox / "x.png"  # a film, or a folder of that name
    real_scandir, locked = os.scandir, []

    def scandir(path):  # type: ignore[no-untyped-def]
        if locked and isinstance(path, (str, os.PathLike)) and Path(path) == x:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(discovery.os, "scandir", scandir)

    def night() -> int:
        result = runner.invoke(app, ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger),
                                     "--out", str(out)])  # fmt: skip
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result.exit_code

    codes = []
    for step in ("A", "B", "locked folder", "folder", "A"):
        if x.is_dir():
            shutil.rmtree(x)
        elif x.exists():
            x.unlink()
        locked[:] = [True] if step == "locked folder" else []
        if step in ("A", "B"):
            grey_image(tmp_path / "film.png", 110 if step == "A" else 240)
            (tmp_path / "film.png").rename(x)
        else:
            x.mkdir()
            grey_image(x / "f.png", 20)
        codes.append(night())
    assert codes[-1] == 0, codes


@pytest.mark.parametrize("change", ["kept", "replaced", "deleted"])
def test_a_mended_result_reaches_a_copy_a_later_run_finds_still_holding_its_content(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    # an unreadable film in incoming/a and incoming/b, both delivered as error rows; once it reads,
    # a run over incoming/a alone screens it. The next night over incoming delivers b's copy its
    # result if b still holds the film (it was left an error for ever, once), and nothing if the
    # copy was replaced or deleted meanwhile (it was given the old film's result, once)
    from cxrbatch import decoding
    from cxrbatch.errors import ImageError

    inbox, ledger = tmp_path / "incoming", tmp_path / "l.db"
    for sub in ("a", "b"):
        (inbox / sub).mkdir(parents=True)
    grey_image(inbox / "a" / "x.png", 170)
    unreadable = (inbox / "a" / "x.png").read_bytes()
    (inbox / "b" / "y.png").write_bytes(unreadable)
    real = decoding.load_image

    def no_decoder(path, draft_size=None):  # type: ignore[no-untyped-def]
        if Path(path).read_bytes() == unreadable:
            raise ImageError("DICOM file, but pydicom is not installed")
        return real(path, draft_size=draft_size)

    def night(folder: Path, out: str) -> list[tuple[str, str]]:
        _run(folder, tiny_models, ledger, tmp_path / out)
        rows = csv.DictReader((tmp_path / out).open(encoding="utf-8"))
        return [(Path(r["path"]).relative_to(inbox).as_posix(), r["status"]) for r in rows]

    monkeypatch.setattr(decoding, "load_image", no_decoder)
    assert night(inbox, "n1.csv") == [("a/x.png", "error"), ("b/y.png", "error")]
    if change != "kept":
        (inbox / "b" / "y.png").unlink()
    if change == "replaced":
        grey_image(inbox / "b" / "y.png", 20)
    assert night(inbox, "n2.csv") == ([("b/y.png", "classified")] if change == "replaced" else [])
    monkeypatch.undo()
    assert night(inbox / "a", "urgent.csv") == [("a/x.png", "classified")]
    assert night(inbox, "n3.csv") == ([("b/y.png", "classified")] if change == "kept" else [])


def test_a_file_put_back_under_other_settings_is_not_news_again_when_they_change_back(
    tiny_models: Path, tmp_path: Path
) -> None:
    # soak: a put-back film delivered under --no-draft (the same result) was reported again the
    # next night the default settings came back: the put-back rule saw only the entries of its own
    # settings, the content's older entry and another content after it
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    film = grey_image(inbox / "a.png", 110)
    first = film.read_bytes()
    assert _names(_run(inbox, tiny_models, ledger, out)[1]) == ["a.png"]
    grey_image(film, 250)  # overwritten by mistake
    assert _names(_run(inbox, tiny_models, ledger, out)[1]) == ["a.png"]
    film.write_bytes(first)  # put back, the night the operator tries --no-draft
    code, rows, _ = _run(inbox, tiny_models, ledger, out, "--no-draft")
    assert code == 0 and _names(rows) == ["a.png"] and rows[0]["label"] == "NORMAL"
    code, rows, _ = _run(inbox, tiny_models, ledger, out)  # back to the defaults: the same result, delivered
    assert (code, rows) == (0, [])
    grey_image(film, 250)  # a put back under these settings is still news
    assert _names(_run(inbox, tiny_models, ledger, out)[1]) == ["a.png"]


def test_a_killed_runs_result_that_a_run_under_other_settings_delivered_alike_is_not_reported_again(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # killed before its report, then run with other settings that give the same results (--no-draft
    # on PNG films; the device of --device auto): those delivered each film; back at the killed run's
    # settings, its results, the same ones, were reported a second time
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _killed_at("before_report", folder, tiny_models, ledger, out) == -9 and len(_inferences(ledger)) == 5
    code, rows, _ = _run(folder, tiny_models, ledger, out, "--no-draft")
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)]
    code, rows, err = _run(folder, tiny_models, ledger, out)  # back at the killed run's settings
    assert code == 0 and "0 to screen" in err and rows == []
    status = _view(ledger)
    assert status["undelivered"] == 0
    assert _run(folder, tiny_models, ledger, out)[:2] == (0, [])


def test_a_result_a_killed_run_made_alike_after_other_settings_delivered_it_is_not_reported(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # soak: the films delivered under --no-draft (PNGs: the same results as under the defaults),
    # then a run under the defaults killed after committing its results, then the defaults again:
    # the killed run's results were reported, though a reader had seen them (delivered before the
    # killed run made its entries, and the rule asked for a delivery after)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _names(_run(folder, tiny_models, ledger, out, "--no-draft")[1]) == [f"img{i}.png" for i in range(5)]
    # killed while screening, with 2 films committed
    assert _killed_at("batch_committed", folder, tiny_models, ledger, out, "--batch-size", "2") == -9
    code, rows, err = _run(folder, tiny_models, ledger, out, "--batch-size", "2")
    assert code == 0 and "3 to screen" in err and rows == []
    assert _view(ledger)["undelivered"] == 0


def test_a_film_back_at_a_content_that_a_run_under_other_settings_delivered_alike_is_not_reported_again(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # settings that flip and flip back (--device auto, --no-draft on PNG films) with a film changed
    # and changed back between: its content was delivered again under the other settings, and the
    # first run back at the first ones reported it once more, the same result
    ledger, out, film = tmp_path / "l.db", tmp_path / "r.csv", folder / "img1.png"
    original = film.read_bytes()
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    grey_image(film, 200)
    assert _names(_run(folder, tiny_models, ledger, out)[1]) == ["img1.png"]
    film.write_bytes(original)
    assert _names(_run(folder, tiny_models, ledger, out, "--no-draft")[1]) == ["img1.png"]  # its news, once
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 0 and rows == []


def test_a_killed_runs_result_for_a_content_its_film_has_left_since_it_was_delivered_is_not_reported(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # killed before its report; a run with other models delivered each film; a film then changed
    # and was delivered again; back at the killed run's models, that film's row was the killed
    # run's result for the content it no longer holds, after the newer one was delivered
    ledger, out, newer = tmp_path / "l.db", tmp_path / "r.csv", _other_models(tiny_models, tmp_path)
    assert _killed_at("before_report", folder, tiny_models, ledger, out) == -9 and len(_inferences(ledger)) == 5
    assert len(_run(folder, newer, ledger, out)[1]) == 5
    grey_image(folder / "img1.png", 200)
    (changed,) = _run(folder, newer, ledger, out)[1]
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # back to the killed run's models
    assert code == 0 and _names(rows) == [f"img{i}.png" for i in range(5)]  # its results, once
    (img1,) = [r for r in rows if r["path"] == changed["path"]]  # img1.png once, as it is now
    assert (img1["label"], img1["confidence"]) == (changed["label"], changed["confidence"])


def test_a_killed_runs_error_row_for_a_file_mended_since_neither_shows_nor_counts(
    tiny_models: Path, tmp_path: Path
) -> None:
    # soak: a run killed while a film was truncated left its error row undelivered; the film was
    # mended and the next run's report held only the film's result (the error row gave way to it),
    # but its summary counted "1 error" in a report of 1 row with none, and it exited 3
    inbox, ledger, out = tmp_path / "in", tmp_path / "l.db", tmp_path / "r.csv"
    inbox.mkdir()
    good = grey_image(inbox / "a.png", 110).read_bytes()
    (inbox / "a.png").write_bytes(good[:80])  # still being copied, or truncated
    assert _killed_at("before_report", inbox, tiny_models, ledger, out) == -9
    (inbox / "a.png").write_bytes(good)  # mended
    code, rows, err = _run(inbox, tiny_models, ledger, out)
    assert [(r["status"], r["label"]) for r in rows] == [("classified", "NORMAL")]
    assert code == 0, err
    assert err.strip().splitlines()[-1].startswith("1 file: 1 classified, 0 rejected, 0 errors")
    assert _run(inbox, tiny_models, ledger, out)[:2] == (0, [])


def test_report_all_reports_a_killed_runs_result_for_an_earlier_content_as_a_plain_run_would(
    tiny_models: Path, tmp_path: Path
) -> None:
    # the soak (soak_more.py seed 5): a run killed after its report, the film overwritten, then a
    # run with --report-all over the folder: it reported the film's new result only, left the
    # killed run's result undelivered (`cxrbatch ledger`: undelivered 1 after a completed run over
    # all inputs), and the next plain run delivered it a night late; a plain run in its place
    # reports it. --report-all reports what a plain run would, and every result besides
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    film = grey_image(inbox / "a.png", 60)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _killed_at("after_report", inbox, tiny_models, ledger, out) == -9 and _view(ledger)["undelivered"] == 1
    grey_image(film, 200)  # another film written over it
    code, rows, _ = _run(inbox, tiny_models, ledger, tmp_path / "all.csv", "--report-all")
    assert code == 0 and len(rows) == 2  # the killed run's result for the first film, and the new one
    assert _view(ledger)["undelivered"] == 0
    assert _run(inbox, tiny_models, ledger, tmp_path / "next.csv")[:2] == (0, [])


def test_a_heatmap_not_written_one_night_is_not_delivered_again_into_the_next_nights_report(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the soak (soak_more.py seed 3): the README's `--html review.html` (one page for every night)
    # with a report named by its date; a heatmap could not be written one night, and the next
    # night's run drew it again because the page held the failed row, and delivered the film's
    # result a second time, into the next night's CSV ("a result is delivered once")
    import errno

    from cxrbatch import files

    inbox = tmp_path / "incoming"
    inbox.mkdir()
    grey_image(inbox / "a.png", 60)
    ledger, maps, page = tmp_path / "l.db", tmp_path / "maps", tmp_path / "review.html"

    def night(day: str) -> tuple[int, list[dict[str, str]]]:
        out = tmp_path / f"{day}.csv"
        result = runner.invoke(app, ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger),
                                     "--out", str(out), "--heatmaps", str(maps), "--html", str(page)])  # fmt: skip
        return result.exit_code, list(csv.DictReader(out.open(encoding="utf-8")))

    def no_room(src: str, dst: str) -> None:
        if str(dst).endswith(".png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.rename(src, dst)

    with monkeypatch.context() as full:
        full.setattr(files.os, "replace", no_room)
        code, rows = night("2026-12-01")
    assert code == 3 and [r["error"] for r in rows] == ["heatmap not written: No space left on device"]
    code, rows = night("2026-12-02")  # the next night, nothing new
    assert (code, rows) == (0, [])
    code, rows = night("2026-12-01")  # the failed night's report named again: mended there
    assert code == 0 and len(rows) == 1 and rows[0]["error"] == "" and Path(rows[0]["heatmap"]).is_file()


def test_report_all_after_a_killed_run_keeps_the_error_row_of_the_files_content_now(
    tiny_models: Path, tmp_path: Path
) -> None:
    # the soak (soak_more.py seed 1, with the fix above): a run killed after its report, the film
    # then truncated, a run with --report-all: the killed run's result must come before the error
    # row of the file as it is now, or the union lets it take the error row's place
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    film = grey_image(inbox / "a.png", 60)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _killed_at("after_report", inbox, tiny_models, ledger, out) == -9
    film.write_bytes(film.read_bytes()[:80])
    code, rows, _ = _run(inbox, tiny_models, ledger, tmp_path / "all.csv", "--report-all")
    assert code == 3 and [r["status"] for r in rows] == ["classified", "error"]


def test_a_film_deleted_between_its_hashing_and_its_decoding_is_not_promised_to_the_next_run(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An archiver moving films out of incoming/ while the night's run screens them: the row says
    the film went away, not that it changed and is screened again on the next run (it is not)."""
    from cxrbatch.ledger import Ledger

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    hashed = Ledger.content_hashes

    def then_moved_away(self: Ledger, paths: list[Path]) -> dict[Path, str | None]:
        found = hashed(self, paths)
        (folder / "img1.png").unlink()
        return found

    monkeypatch.setattr(Ledger, "content_hashes", then_moved_away)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    row = next(r for r in rows if r["path"].endswith("img1.png"))
    assert code == 3 and row["status"] == "error"
    assert "changed while it was screened" not in row["error"] and "deleted or moved away" in row["error"]


def test_a_killed_runs_error_row_is_not_delivered_by_a_run_that_its_film_left_while_screened(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the soak (soak_main16g.py seed 42): a killed run stored an unreadable film's error row; the
    # next run screened the film again (an error row is tried again on every run), an archiver moved
    # it away meanwhile, and its 'deleted or moved away' row took the error row's place in the report
    # (the union) while the ledger counted the error row delivered: once the film was back, no run
    # reported it, and no completed report ever held it
    from cxrbatch.ledger import Ledger

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    film, away = folder / "img1.png", tmp_path / "img1.png"
    film.write_bytes(film.read_bytes()[:80])
    assert _killed_at("after_report", folder, tiny_models, ledger, out) == -9
    hashed = Ledger.content_hashes

    def then_moved_away(self: Ledger, paths: list[Path]) -> dict[Path, str | None]:
        found = hashed(self, paths)
        film.rename(away)
        return found

    monkeypatch.setattr(Ledger, "content_hashes", then_moved_away)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 3 and [r["error"][:34] for r in rows if r["path"] == str(film)] == [
        "the file was deleted or moved away"
    ]
    monkeypatch.undo()
    away.rename(film)  # moved back: the run that finds it again reports it
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 3 and [r["error"][:26] for r in rows] == ["corrupt or truncated image"]


def test_a_killed_runs_error_row_is_not_delivered_by_a_run_that_could_not_read_its_film(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the case beside the soak's: a killed run stored an unreadable film's error row, and the next
    # run could not even read the film (its permissions changed): its 'permission denied' row took the
    # error row's place in the report while the ledger counted the error row delivered, and once the
    # film could be read again no run said what was wrong with it
    import builtins

    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    film = folder / "img1.png"
    film.write_bytes(film.read_bytes()[:80])
    assert _killed_at("after_report", folder, tiny_models, ledger, out) == -9
    real_open = builtins.open

    def denied(path: object, *args: object, **kwargs: object) -> object:
        if Path(str(path)) == film:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    film.chmod(0o600)  # what took this user's reading away changed its ctime: it is hashed again
    monkeypatch.setattr(builtins, "open", denied)
    code, rows, _ = _run(folder, tiny_models, ledger, out)
    assert code == 3 and [r["error"] for r in rows if r["path"] == str(film)] == ["permission denied"]
    monkeypatch.undo()
    code, rows, _ = _run(folder, tiny_models, ledger, out)  # readable again: what is wrong with it is said
    assert code == 3 and [r["error"][:26] for r in rows] == ["corrupt or truncated image"]


def test_a_run_that_has_held_the_ledger_for_a_day_is_stuck_not_busy(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped with Ctrl-Z, or hung on a dead mount, keeps the lock: every later night exited
    4 at [info], 'nothing more needed', and no film was screened for days without an alert."""
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    monkeypatch.setattr("cxrbatch.ledger_lock.now", lambda: "2026-12-05T02:00:01+00:00")  # that run's start
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    monkeypatch.undo()
    with open(tmp_path / "l.db.lock") as holder:  # as if that run were still going
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 1 and "[error]" in err and "(since 2026-12-05T02:00:01+00:00)" in err and "stuck" in err
    assert f"pid {os.getpid()}" in err  # the process to look at (here the test's own, which ran it)
    code, _, err = _run(folder, tiny_models, ledger, out)  # what the stuck run committed is kept
    assert code == 0


def test_a_run_that_started_moments_ago_is_busy_and_named(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, out)[0] == 0  # its lock file names it, and when it started
    with open(tmp_path / "l.db.lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 4 and "[info] Another cxrbatch run holds the ledger" in err and f"pid {os.getpid()}" in err


def test_a_lock_line_edited_by_hand_is_read_as_no_line(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    # a pid no process can have made os.kill raise OverflowError: a traceback, and the lock's fd left open
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    line = {"pid": 10**30, "started": "2026-12-05T02:00:01+00:00", "job": ["/elsewhere"]}
    (tmp_path / "l.db.lock").write_text(json.dumps(line) + "\n", encoding="utf-8")
    with open(tmp_path / "l.db.lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 4 and "[info] Another cxrbatch run holds the ledger" in err and "pid" not in err, err


def test_a_ledger_held_by_another_jobs_run_is_an_error_not_busy(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # Two jobs (two input folders) on one ledger whose nights overlap: the one that lost the lock
    # exited 4 at [info] ("the same job started twice needs nothing more") every night, and its
    # folder was never screened. The lock file names the holder's inputs: another job's is an error.
    ward_b = tmp_path / "ward-b"
    ward_b.mkdir()
    grey_image(ward_b / "b.png", 130)
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, out)[0] == 0  # its lock file names this process and the folder
    with open(tmp_path / "l.db.lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(ward_b, tiny_models, ledger, out)
        assert code == 1 and f"[error] Another job's run (pid {os.getpid()}" in err and str(folder) in err, err
        assert f"give this one ({ward_b}) a ledger of its own" in err
        assert _run(folder, tiny_models, ledger, out)[0] == 4  # the same job started twice: busy, as before


def test_a_report_file_another_jobs_ledger_wrote_is_replaced_with_a_warning(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    """Two jobs (two ledgers) whose cron lines name the same dated report: the second replaced the
    first's rows, which the first job's ledger counts as delivered, and not a line said so."""
    ward_b = tmp_path / "ward-b"
    ward_b.mkdir()
    grey_image(ward_b / "b.png", 130)
    shared = tmp_path / "2026-12-07.csv"
    args = ["--models", str(tiny_models), "--out", str(shared)]
    first = runner.invoke(app, ["run", str(folder), "--ledger", str(tmp_path / "a.db"), *args])
    assert first.exit_code == 0 and "[warning]" not in first.stderr
    second = runner.invoke(app, ["run", str(ward_b), "--ledger", str(tmp_path / "b.db"), *args])
    assert second.exit_code == 0  # the documented rule stands: a ledger serves one job, with its own reports
    assert f"[warning] report {shared} was written by no run of this ledger" in second.stderr
    again = runner.invoke(app, ["run", str(ward_b), "--ledger", str(tmp_path / "b.db"), *args])
    assert again.exit_code == 0 and "[warning]" not in again.stderr  # its own report, written again


def test_a_report_a_killed_run_of_this_ledger_wrote_is_mended_without_a_warning(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "r.csv"

    def stop(name: str) -> None:
        if name == "after_report":
            raise RuntimeError("stopped")  # as a SIGTERM after the report was renamed into place

    monkeypatch.setattr("cxrbatch.ledger_run.crash_point", stop)
    assert _run(folder, tiny_models, tmp_path / "l.db", out)[0] == 1 and out.exists()
    monkeypatch.undo()
    rerun = runner.invoke(app, ["run", str(folder), "--models", str(tiny_models), "--ledger", str(tmp_path / "l.db"),
                                "--out", str(out)])  # fmt: skip
    assert rerun.exit_code == 0 and "[warning]" not in rerun.stderr


def test_a_ledger_on_a_file_system_without_locks_is_refused_in_a_line(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NFS share without its lock service answers flock with ENOLCK: a traceback in cron mail."""

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr("cxrbatch.ledger_lock.fcntl.flock", no_locks)
    code, _, err = _run(folder, tiny_models, tmp_path / "l.db", tmp_path / "r.csv")
    assert code == 1 and "[error] Cannot lock the ledger" in err and "No locks available" in err
    assert "Traceback" not in err


def test_a_ledger_the_file_size_limit_keeps_from_being_written_is_not_called_foreign(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    """`ulimit -f` (a cron job's file-size limit): SQLite's write fails with 'disk I/O error', and the
    new ledger was called 'not a usable cxrbatch ledger … left untouched', which the next run repeated."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))  # Python ignores SIGXFSZ: writes fail

    script = "import sys\nfrom cxrbatch.cli import app\napp(sys.argv[1:])\n"
    args = ["run", str(folder), "--models", str(tiny_models), "--ledger", str(tmp_path / "l.db"), "-q"]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], preexec_fn=limited, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not a usable cxrbatch ledger" not in proc.stderr
    assert "cannot be written" in proc.stderr and "ulimit -f" in proc.stderr


def test_a_lock_line_left_by_a_finished_run_does_not_make_an_older_versions_holder_stuck(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An older cxrbatch holding the lock writes no line: the one there is a finished run's."""
    ledger, out = tmp_path / "l.db", tmp_path / "r.csv"
    monkeypatch.setattr("cxrbatch.ledger_lock.now", lambda: "2026-12-05T02:00:01+00:00")
    monkeypatch.setattr("cxrbatch.ledger_lock.os.getpid", lambda: gone.pid)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process that has ended: the line names no live run
    assert _run(folder, tiny_models, ledger, out)[0] == 0
    monkeypatch.undo()
    with open(tmp_path / "l.db.lock") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _run(folder, tiny_models, ledger, out)
    assert code == 4 and "[info] Another cxrbatch run holds the ledger" in err and "stuck" not in err
