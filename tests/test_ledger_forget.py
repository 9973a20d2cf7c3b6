"""`cxrbatch forget`: a ledger's old nights taken out without a film reported twice or a report emptied."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import grey_image, make_classifier
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.ledger import Ledger

runner = CliRunner()
OLD, CUT = "2025-01-01T02:00:00+00:00", "2025-06-01"  # a night long ago, and a day after it


def _run(folder: Path, models: Path, ledger: Path, out: Path, *extra: str) -> tuple[int, list[str], str]:
    """One nightly run into `out`: its exit code, the file names its report holds, its log."""
    result = runner.invoke(
        app, ["run", str(folder), "--models", str(models), "--ledger", str(ledger), "--out", str(out), *extra]
    )
    rows = list(csv.DictReader(out.open(encoding="utf-8"))) if out.exists() else []
    return result.exit_code, sorted(Path(r["path"]).name for r in rows), result.stderr


def _forget(ledger: Path, *extra: str, before: str = CUT) -> tuple[int, dict, str]:  # type: ignore[type-arg]
    result = runner.invoke(app, ["forget", str(ledger), "--before", before, "--json", *extra])
    return result.exit_code, json.loads(result.stdout) if result.exit_code == 0 else {}, result.stderr


def _age(ledger: Path, *runs: int) -> None:
    """Make runs `runs` (ids) nights long ago."""
    with sqlite3.connect(ledger) as db:
        db.executemany("UPDATE runs SET started = ? WHERE id = ?", [(OLD, run) for run in runs])
    db.close()


def _stop_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """Make the next run stop at the crash point `point` (exit 1), as a signal there would end it."""

    def stop(name: str) -> None:
        if name == point:
            raise RuntimeError("stopped")

    monkeypatch.setattr("cxrbatch.ledger_run.crash_point", stop)


def _table(ledger: Path, sql: str) -> list[tuple]:  # type: ignore[type-arg]
    with sqlite3.connect(ledger) as db:
        rows = db.execute(sql).fetchall()
    db.close()
    return rows


def _dump(ledger: Path) -> list[str]:
    with sqlite3.connect(ledger) as db:
        lines = list(db.iterdump())
    db.close()
    return lines


def _inbox(tmp_path: Path, films: dict[str, int]) -> Path:
    """An incoming folder holding grey films `name: level`."""
    inbox = tmp_path / "incoming"
    inbox.mkdir()
    for name, level in films.items():
        grey_image(inbox / name, level)
    return inbox


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _inbox(tmp_path, {f"img{i}.png": level for i, level in enumerate((20, 110, 170, 250, 60))})


def _archived_night(folder: Path, models: Path, tmp_path: Path) -> Path:
    """Night 1 (long ago) screened img0-img4, then img0 and img1 were moved out; night 2 (today)
    screened img5. The ledger."""
    ledger = tmp_path / "l.db"
    assert _run(folder, models, ledger, tmp_path / "night1.csv")[:2] == (0, [f"img{i}.png" for i in range(5)])
    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("img0.png", "img1.png"):
        shutil.move(folder / name, archive / name)
    _age(ledger, 1)
    grey_image(folder / "img5.png", 200)
    assert _run(folder, models, ledger, tmp_path / "night2.csv")[:2] == (0, ["img5.png"])
    return ledger


def test_forget_takes_out_the_films_moved_away_and_keeps_those_still_in_place(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    code, done, err = _forget(ledger)
    assert code == 0, err
    assert {k: done[k] for k in ("runs", "films", "kept", "entries", "results", "files", "rows")} == {
        "runs": 1,
        "films": 2,
        "kept": 3,
        "entries": 2,
        "results": 2,
        "files": 2,
        "rows": 5,
    }
    assert done["before"] == "2025-06-01T00:00:00+00:00" and not done["dry_run"]
    left = sorted(Path(p).name for (p,) in _table(ledger, "SELECT path FROM entries"))
    assert left == ["img2.png", "img3.png", "img4.png", "img5.png"]
    assert sorted(Path(p).name for (p,) in _table(ledger, "SELECT path FROM files")) == left
    assert len(_table(ledger, "SELECT * FROM results")) == 4
    assert _table(ledger, "SELECT DISTINCT run FROM run_rows") == [(2,)]
    assert len(_table(ledger, "SELECT * FROM runs")) == 2  # the nights themselves are kept
    # the films still in the folder are neither screened nor reported again
    before = _table(ledger, "SELECT sha256, inferences FROM results ORDER BY sha256")
    assert _run(folder, tiny_models, ledger, tmp_path / "night3.csv")[:2] == (0, [])
    assert _table(ledger, "SELECT sha256, inferences FROM results ORDER BY sha256") == before
    # a forgotten film put back is news again: screened and reported as a new film
    shutil.move(tmp_path / "archive" / "img0.png", folder / "img0.png")
    assert _run(folder, tiny_models, ledger, tmp_path / "night4.csv")[:2] == (0, ["img0.png"])
    view = runner.invoke(app, ["ledger", str(ledger), "--json"])
    assert json.loads(view.stdout)["forgotten_before"] == "2025-06-01T00:00:00+00:00"
    assert json.loads(view.stdout)["files"] == 5  # img0 and img2-img5
    view = runner.invoke(app, ["ledger", str(ledger)])
    assert "forgotten: what runs before 2025-06-01T00:00:00+00:00 delivered" in view.stdout


def test_a_film_still_in_place_is_not_reported_again_under_other_settings(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    # other settings screen every film again (--no-draft; an upgrade's preprocessing version); a
    # film whose result comes out the same is no news: that needs its entries under the old settings
    ledger = _archived_night(folder, tiny_models, tmp_path)
    assert _forget(ledger)[0] == 0
    code, names, err = _run(folder, tiny_models, ledger, tmp_path / "night3.csv", "--no-draft")
    assert (code, names) == (0, []) and "4 to screen" in err, err


def test_a_path_that_holds_another_film_now_forgets_the_old_one(tiny_models: Path, tmp_path: Path) -> None:
    # a scanner that names every night's film scan.png: the old content's entries go, the new stay
    inbox = _inbox(tmp_path, {"scan.png": 30})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["scan.png"])
    _age(ledger, 1)
    grey_image(inbox / "scan.png", 220)
    assert _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")[:2] == (0, ["scan.png"])
    code, done, _ = _forget(ledger)
    assert code == 0 and (done["films"], done["kept"], done["entries"], done["results"]) == (0, 1, 1, 1)
    assert len(_table(ledger, "SELECT * FROM entries")) == 1
    assert _run(inbox, tiny_models, ledger, tmp_path / "n3.csv")[:2] == (0, [])


def test_a_dry_run_counts_the_same_and_changes_nothing(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    was = _dump(ledger)
    code, dry, _ = _forget(ledger, "--dry-run")
    assert code == 0 and dry["dry_run"] and dry["entries"] == 2
    assert _dump(ledger) == was
    code, done, _ = _forget(ledger)
    assert code == 0 and {**dry, "dry_run": False} == done
    assert _dump(ledger) != was


def test_results_a_killed_run_left_undelivered_are_kept(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    with sqlite3.connect(ledger) as db:  # as a run killed before its report leaves them
        db.execute("UPDATE entries SET delivered_run = NULL WHERE path LIKE '%img0.png'")
    db.close()
    code, done, _ = _forget(ledger)
    assert code == 0 and done["films"] == 1 and done["entries"] == 1
    assert _run(folder, tiny_models, ledger, tmp_path / "night3.csv")[:2] == (0, ["img0.png"])


def test_a_report_only_forgotten_runs_wrote_is_refused_and_one_later_runs_wrote_keeps_theirs(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    night1 = tmp_path / "night1.csv"
    was = night1.read_bytes()
    assert _forget(ledger)[0] == 0
    code, _, err = _run(folder, tiny_models, ledger, night1)
    assert code == 2 and "was written by runs before 2025-06-01" in err and "Name another report file" in err
    assert night1.read_bytes() == was
    # night 2's report, written again with a new film: night 2's row and the new one
    grey_image(folder / "img6.png", 90)
    assert _run(folder, tiny_models, ledger, tmp_path / "night2.csv")[:2] == (0, ["img5.png", "img6.png"])


def test_one_report_name_for_every_night_keeps_the_rows_of_later_runs(
    folder: Path, tiny_models: Path, tmp_path: Path
) -> None:
    ledger, report = tmp_path / "l.db", tmp_path / "report.csv"
    assert _run(folder, tiny_models, ledger, report)[:2] == (0, [f"img{i}.png" for i in range(5)])
    _age(ledger, 1)
    grey_image(folder / "img5.png", 200)
    assert _run(folder, tiny_models, ledger, report)[1] == [f"img{i}.png" for i in range(6)]  # the union
    assert _forget(ledger)[0] == 0
    grey_image(folder / "img6.png", 90)
    assert _run(folder, tiny_models, ledger, report)[:2] == (0, ["img5.png", "img6.png"])


def test_refusals_change_nothing(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    was = _dump(ledger)
    code, _, err = _forget(ledger, before="2025-13-01")
    assert code == 2 and "is not a day" in err
    code, _, err = _forget(ledger, before="2999-01-01")
    assert code == 2 and "in the future" in err
    code, _, err = _forget(tmp_path / "none.db")
    assert code == 2 and "Ledger not found" in err and not (tmp_path / "none.db").exists()
    code, _, err = _forget(tmp_path)
    assert code == 2 and "is a folder" in err
    with open(tmp_path / "l.db.lock", "w") as holder:  # a run going on
        fcntl.flock(holder, fcntl.LOCK_EX)
        code, _, err = _forget(ledger)
    assert code == 4 and "holds the ledger" in err and "nothing was forgotten" in err
    (tmp_path / "foreign.db").write_bytes(b"not a ledger at all, but sixteen bytes and more")
    assert _forget(tmp_path / "foreign.db")[0] == 1
    assert _dump(ledger) == was


def test_nothing_before_the_day_forgets_nothing(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "l.db"
    assert _run(folder, tiny_models, ledger, tmp_path / "r.csv")[0] == 0
    was = _dump(ledger)
    code, done, _ = _forget(ledger)
    assert code == 0 and (done["runs"], done["entries"], done["rows"]) == (0, 0, 0)
    assert _dump(ledger) == was  # not even the date: no run was forgotten


def test_compact_gives_the_space_back(tiny_models: Path, tmp_path: Path) -> None:
    inbox = _inbox(tmp_path, {f"f{i:02d}.png": 2 + 4 * i for i in range(60)})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "r.csv")[0] == 0
    shutil.rmtree(inbox)
    inbox.mkdir()
    _age(ledger, 1)
    code, done, err = _forget(ledger, "--compact")
    assert code == 0, err
    before, after = done["compacted_bytes"]
    assert done["films"] == 60 and after < before
    assert Path(ledger).stat().st_size == after
    assert _table(ledger, "SELECT count(*) FROM entries") == [(0,)]


def test_a_name_spelled_with_an_escape_is_kept_while_the_film_is_there(tiny_models: Path, tmp_path: Path) -> None:
    # the ledger keys an undecodable name byte as \\xNN: the film is found under its real name
    inbox = _inbox(tmp_path, {"caf\udce9.png": 80})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[0] == 0
    assert _table(ledger, "SELECT path FROM entries")[0][0].endswith("caf\\xe9.png")
    _age(ledger, 1)
    code, done, _ = _forget(ledger)
    assert code == 0 and (done["films"], done["kept"]) == (0, 1)
    assert _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")[:2] == (0, [])


def test_a_result_another_path_still_holds_is_kept(tiny_models: Path, tmp_path: Path) -> None:
    # the same film under two names; one moved out: its entry goes, the result its copy names stays
    inbox = _inbox(tmp_path, {"a.png": 40})
    shutil.copy(inbox / "a.png", inbox / "copy-of-a.png")
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["a.png", "copy-of-a.png"])
    (inbox / "a.png").unlink()
    _age(ledger, 1)
    code, done, _ = _forget(ledger)
    assert code == 0 and (done["films"], done["entries"], done["results"]) == (1, 1, 0)
    code, names, err = _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")
    assert (code, names) == (0, []) and "0 to screen" in err


def test_a_path_with_a_result_waiting_keeps_its_entries(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # which of a killed run's results are news is told by the path's other entries (ledger_news):
    # a path with one waiting keeps them all, though the film has gone since
    inbox = _inbox(tmp_path, {"scan.png": 30})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["scan.png"])
    grey_image(inbox / "scan.png", 220)
    _stop_at(monkeypatch, "before_report")  # as a SIGTERM after the results were committed
    assert _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")[0] == 1
    monkeypatch.undo()
    _age(ledger, 1, 2)
    shutil.move(inbox / "scan.png", tmp_path / "scan.png")
    code, done, _ = _forget(ledger)
    assert code == 0 and (done["films"], done["entries"], done["files"]) == (0, 0, 0)
    assert len(_table(ledger, "SELECT * FROM entries")) == 2
    shutil.move(tmp_path / "scan.png", inbox / "scan.png")
    assert _run(inbox, tiny_models, ledger, tmp_path / "n3.csv")[:2] == (0, ["scan.png"])  # the waiting one


@pytest.mark.parametrize("history", [2_000, 20_000])
def test_forgetting_costs_in_proportion_to_the_films_forgotten(
    history: int, monkeypatch: pytest.MonkeyPatch, tiny_models: Path, tmp_path: Path
) -> None:
    # counted in SQLite's virtual-machine steps (its progress handler), which do not depend on the
    # machine's speed: a statement run once per film over every film would grow with their square
    import tracemalloc
    from datetime import date

    import cxrbatch.ledger as ledger_module
    from benchmarks.ledger_history import add_history
    from cxrbatch.ledger_forget import forget

    inbox = _inbox(tmp_path, {"a.png": 90})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "r.csv")[0] == 0
    add_history(ledger, history, per_night=1000)  # dated 2026-01-01, their films gone
    steps = [0]

    def counted(path: Path, migrate: bool) -> sqlite3.Connection:
        db = real(path, migrate)
        db.set_progress_handler(lambda: steps.__setitem__(0, steps[0] + 1) or 0, 1000)
        return db

    real = ledger_module.connect
    monkeypatch.setattr(ledger_module, "connect", counted)
    tracemalloc.start()
    try:
        done = forget(ledger, date(2026, 6, 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (done.films, done.kept, done.entries, done.results, done.rows) == (history, 0, history, history, history)
    # 167 thousand steps a thousand films, at 2,000 films as at 20,000; Python held 0.2-0.3 MB
    assert steps[0] * 1000 < 200 * history, steps[0]
    assert peak < 2_000_000, peak


def test_a_film_whose_last_hashing_caught_it_half_copied_is_not_reported_again(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the same film copied in again over itself (a re-export), hashed half-way and done by its
    # decoding: that night has an error row for it, no entry; the film is still in its folder,
    # holding what it was delivered with, so a forget keeps it and the next night is silent
    inbox = _inbox(tmp_path, {"a.png": 80})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["a.png"])
    _age(ledger, 1)
    whole = (inbox / "a.png").read_bytes()
    (inbox / "a.png").write_bytes(whole[: len(whole) // 2])
    unchanged = Ledger.unchanged

    def copy_done(self: Ledger, path: Path) -> bool:
        (inbox / "a.png").write_bytes(whole)
        return unchanged(self, path)

    monkeypatch.setattr(Ledger, "unchanged", copy_done)
    code, names, err = _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")
    monkeypatch.undo()
    assert (code, names) == (3, ["a.png"]) and "changed while it was screened" in (tmp_path / "n2.csv").read_text()
    code, done, err = _forget(ledger)
    assert code == 0 and (done["films"], done["kept"], done["entries"]) == (0, 1, 0), err
    assert _run(inbox, tiny_models, ledger, tmp_path / "n3.csv")[:2] == (0, [])


def test_a_film_back_at_an_earlier_content_is_still_news_after_a_forget(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scan.png delivered dark, then light; put back dark, a run under other settings hashes it
    # and is killed before its result: the film back at an earlier content is news (the ledger's
    # rule), which needs the later content's entries, though the file as last hashed is dark
    inbox = _inbox(tmp_path, {"scan.png": 30})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["scan.png"])
    dark = (inbox / "scan.png").read_bytes()
    grey_image(inbox / "scan.png", 220)
    assert _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")[:2] == (0, ["scan.png"])
    (inbox / "scan.png").write_bytes(dark)

    def stop(*_: object) -> None:
        raise RuntimeError("stopped")  # as a SIGTERM while the night screens

    monkeypatch.setattr("cxrbatch.ledger.Ledger.store", stop)
    assert _run(inbox, tiny_models, ledger, tmp_path / "n3.csv", "--no-draft")[0] == 1
    monkeypatch.undo()
    _age(ledger, 1, 2, 3)
    assert _forget(ledger)[0] == 0
    assert _run(inbox, tiny_models, ledger, tmp_path / "n4.csv")[:2] == (0, ["scan.png"])


def test_a_film_in_place_back_at_a_content_it_had_is_news_under_the_settings_that_delivered_it_first(
    tiny_models: Path, tmp_path: Path
) -> None:
    # soak: scan.png delivered dark under the models, then light, then dark again under other
    # models (its news, under those); back at the first models its dark result, which differs
    # (review threshold), is news again: the light content's entry tells it, and the forget took
    # that entry out (a content the path no longer holds), so the night reported nothing
    newer = tmp_path / "newer-models"
    newer.mkdir()
    shutil.copy(tiny_models / "gate.onnx", newer / "gate.onnx")
    make_classifier(newer / "classifier.onnx", review_threshold=0.7)
    for forget in (False, True):
        (tmp_path / str(forget)).mkdir()
        inbox = _inbox(tmp_path / str(forget), {"scan.png": 40})  # confidence 0.66: reviewed at 0.7 only
        ledger, dark = tmp_path / str(forget) / "l.db", (inbox / "scan.png").read_bytes()
        assert _run(inbox, tiny_models, ledger, tmp_path / "n1.csv")[:2] == (0, ["scan.png"])
        grey_image(inbox / "scan.png", 220)
        assert _run(inbox, tiny_models, ledger, tmp_path / "n2.csv")[:2] == (0, ["scan.png"])
        (inbox / "scan.png").write_bytes(dark)
        assert _run(inbox, newer, ledger, tmp_path / "n3.csv")[:2] == (0, ["scan.png"])
        if forget:
            _age(ledger, 1, 2, 3)
            code, done, err = _forget(ledger)
            assert code == 0 and (done["films"], done["kept"]) == (0, 1), err
        # as without a forget: the film is reported once more, its result under these models
        assert _run(inbox, tiny_models, ledger, tmp_path / "n4.csv")[:2] == (0, ["scan.png"]), forget
        assert _run(inbox, tiny_models, ledger, tmp_path / "n5.csv")[:2] == (0, []), forget


def test_a_film_forget_may_not_look_at_is_kept(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # forget run by an account that may not enter the folder (or a share answering EIO): a film
    # it cannot look at is not known to be gone, so it is kept, not reported again as new
    ledger = _archived_night(folder, tiny_models, tmp_path)
    lstat = os.lstat

    def refused(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if os.fsdecode(path).startswith(str(folder)):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", path)
        return lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", refused)
    code, done, err = _forget(ledger)
    monkeypatch.undo()
    assert code == 0 and (done["films"], done["kept"], done["entries"]) == (0, 5, 0), err
    assert "cannot tell whether 5 paths are still there" in err and "Permission denied" in err
    assert _run(folder, tiny_models, ledger, tmp_path / "night3.csv")[:2] == (0, [])


def test_a_dry_run_does_not_upgrade_an_older_ledger(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    with sqlite3.connect(ledger) as db:  # as the version before schema 3 left it
        db.execute("ALTER TABLE files DROP COLUMN ctime_ns")
        db.execute("UPDATE meta SET value = 'cxrbatch.ledger/2' WHERE key = 'schema'")
    db.close()
    was = _dump(ledger)
    code, _, err = _forget(ledger, "--dry-run")
    assert _dump(ledger) == was
    assert code == 2 and "schema cxrbatch.ledger/2" in err and "nothing was done" in err


def test_a_report_a_killed_later_run_wrote_is_still_refused_and_a_deleted_one_is_written_afresh(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # night 1 (long ago) wrote r.csv; tonight's run wrote it again, 6 rows, and was killed after
    # its report, before the ledger marked it done: its rows count for no union, so after a forget
    # the same command run again would have written r.csv with tonight's row alone
    ledger, report = tmp_path / "l.db", tmp_path / "r.csv"
    assert _run(folder, tiny_models, ledger, report)[:2] == (0, [f"img{i}.png" for i in range(5)])
    _age(ledger, 1)
    grey_image(folder / "img5.png", 200)
    _stop_at(monkeypatch, "after_report")  # as a SIGKILL once the report is in place
    assert _run(folder, tiny_models, ledger, report)[:2] == (1, [f"img{i}.png" for i in range(6)])
    monkeypatch.undo()
    code, done, _ = _forget(ledger)
    assert code == 0 and done["rows"] == 5
    was = report.read_bytes()
    code, _, err = _run(folder, tiny_models, ledger, report)
    assert code == 2 and "by no completed run since" in err and report.read_bytes() == was
    report.unlink()  # nothing left to lose: written afresh, with what waits for delivery
    assert _run(folder, tiny_models, ledger, report)[:2] == (0, ["img5.png"])


def test_the_summary_reads_as_the_counts_say(folder: Path, tiny_models: Path, tmp_path: Path) -> None:
    ledger = _archived_night(folder, tiny_models, tmp_path)
    result = runner.invoke(app, ["forget", str(ledger), "--before", CUT, "--dry-run"])
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [
        "1 run started before 2025-06-01T00:00:00+00:00: would forget 2 films no longer in their folders "
        "(2 entries, 2 results, 2 file records, 5 report rows); kept 3 films still in place"
    ]


def _held_by_a_forget(ledger: Path) -> int:
    """Take the ledger's lock as `cxrbatch forget` does: the descriptor that holds it."""
    from cxrbatch.ledger_lock import FORGET, lock

    return lock(ledger, [], FORGET)


def test_a_run_waits_for_a_forget_that_holds_the_ledger(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a forget that runs into the night's start: the night waits for it instead of doing nothing
    ledger = tmp_path / "l.db"
    assert _run(folder, tiny_models, ledger, tmp_path / "n1.csv")[0] == 0
    monkeypatch.setattr("cxrbatch.ledger_lock.WAIT_STEP_S", 0.1)
    held = _held_by_a_forget(ledger)
    done = threading.Timer(1.0, os.close, (held,))
    done.start()
    grey_image(folder / "img5.png", 200)
    try:
        code, names, err = _run(folder, tiny_models, ledger, tmp_path / "n2.csv")
    finally:
        done.join()
    assert (code, names) == (0, ["img5.png"]), err
    assert f"cxrbatch forget (pid {os.getpid()}" in err and "waiting for it" in err


def test_a_run_gives_up_on_a_forget_that_holds_the_ledger_too_long(
    folder: Path, tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = tmp_path / "l.db"
    assert _run(folder, tiny_models, ledger, tmp_path / "n1.csv")[0] == 0
    monkeypatch.setattr("cxrbatch.ledger_lock.WAIT_STEP_S", 0.1)
    monkeypatch.setattr("cxrbatch.ledger_lock.FORGET_WAIT_S", 0.3)
    held = _held_by_a_forget(ledger)
    try:
        code, _, err = _run(folder, tiny_models, ledger, tmp_path / "n2.csv")
    finally:
        os.close(held)
    assert code == 4 and "cxrbatch forget (pid" in err and "of waiting; nothing was done" in err
    assert not (tmp_path / "n2.csv").exists()


def _limited_forget(ledger: Path, limit: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """`cxrbatch forget` under `ulimit -f LIMIT` bytes (a cron job's file-size limit, or a full
    disk as SQLite meets it: a write that fails part-way)."""
    import resource

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # Python ignores SIGXFSZ: writes fail

    script = "import sys\nfrom cxrbatch.cli import app\napp(sys.argv[1:])\n"
    return subprocess.run(
        [sys.executable, "-c", script, "forget", str(ledger), "--before", CUT, *extra],
        preexec_fn=limited,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_forget_that_cannot_write_changes_nothing_and_a_compact_that_cannot_keeps_the_forget(
    tiny_models: Path, tmp_path: Path
) -> None:
    inbox = _inbox(tmp_path, {f"f{i:02d}.png": 2 + 4 * i for i in range(60)})
    ledger = tmp_path / "l.db"
    assert _run(inbox, tiny_models, ledger, tmp_path / "r.csv")[0] == 0
    shutil.rmtree(inbox)
    _age(ledger, 1)
    was = _dump(ledger)
    proc = _limited_forget(ledger, 64 * 1024)  # room to open it (33 KB), not for the forget's writes (170 KB)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "nothing was forgotten (disk I/O error; this process may write files of at most" in proc.stderr
    assert _dump(ledger) == was
    # VACUUM copies the ledger: room for the forget's own writes, not for the copy
    proc = _limited_forget(ledger, ledger.stat().st_size + 1, "--compact")
    assert proc.returncode == 1 and "what was forgotten is committed, but it could not be compacted" in proc.stderr
    assert _table(ledger, "SELECT count(*) FROM entries") == [(0,)]
