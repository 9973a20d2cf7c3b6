"""The 3 a.m. operator: the README's cron line as cron runs it, file modes, the ledger view, the logs."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, grey_image
from typer.testing import CliRunner

from cxrbatch import __version__
from cxrbatch.cli import app

runner = CliRunner()
CXRBATCH = Path(sys.executable).parent / "cxrbatch"  # the console script of this environment
STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}"  # local time and its offset from UTC


def readme_cron_command(site: Path) -> str:
    """The README's cron line without its schedule, as cron would run it for a site folder `site`."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme.split("```cron", 1)[1].split("```", 1)[0]
    line = next(ln for ln in block.splitlines() if ln and not ln.startswith("#"))
    command = line.split(None, 5)[5].replace("\\%", "%")  # cron reads an unescaped % as a newline
    assert command.startswith("cd /srv/cxr && ") and ".venv/bin/cxrbatch run " in command
    return command.replace("cd /srv/cxr", f"cd {site}").replace(".venv/bin/cxrbatch", str(CXRBATCH))


def cron(site: Path, umask: str = "022", tools: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the README's cron line once, in a shell with cron's bare environment and a umask (and
    the commands in `tools` found before the system's)."""
    env = {"PATH": "/usr/bin:/bin" if tools is None else f"{tools}:/usr/bin:/bin", "HOME": str(site), "LANG": "C.UTF-8"}
    return subprocess.run(
        ["/bin/sh", "-c", f"umask {umask} && {readme_cron_command(site)}"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _report_rows(site: Path) -> tuple[Path, list[str], list[str]]:
    (csv_report,) = sorted((site / "reports").glob("*.csv"))
    names = [Path(r["path"]).name for r in csv.DictReader(csv_report.open(encoding="utf-8"))]
    doc = json.loads(csv_report.with_suffix(".json").read_text(encoding="utf-8"))
    return csv_report, names, [Path(r["path"]).name for r in doc["results"]]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh site folder as the README describes it: `incoming/` with two films, nothing else."""
    site = tmp_path / "cxr"
    (site / "incoming").mkdir(parents=True)
    for name in ("NORMAL2-IM-1437-0001.jpeg", "person1947_bacteria_4876.jpeg"):
        shutil.copy(REPO / "samples" / name, site / "incoming" / name)
    return site


def test_readme_cron_line_twice_a_day_never_empties_the_report(site: Path) -> None:
    first = cron(site)
    assert first.returncode == 0, first.stderr
    report, csv_names, json_names = _report_rows(site)
    expected = ["NORMAL2-IM-1437-0001.jpeg", "person1947_bacteria_4876.jpeg"]
    assert sorted(csv_names) == expected and sorted(json_names) == expected
    second = cron(site)  # a manual rerun the same day: nothing new
    assert second.returncode == 0
    assert _report_rows(site)[1:] == (csv_names, json_names)  # the day's report still holds both rows
    shutil.copy(REPO / "samples" / "chelsea.png", site / "incoming" / "chelsea.png")
    third = cron(site)
    assert third.returncode == 0
    _, csv_names, json_names = _report_rows(site)
    assert csv_names == [*csv_names[:2], "chelsea.png"] and sorted(csv_names[:2]) == expected
    assert json_names == csv_names
    doc = json.loads(report.with_suffix(".json").read_text(encoding="utf-8"))
    assert doc["summary"]["files"] == 3 and doc["summary"]["by_status"]["rejected"] == 1
    log = (site / "logs" / "cxrbatch.log").read_text(encoding="utf-8")
    assert re.search(rf"^{STAMP} \[info\] run 3: 3 files, 2 already screened, 1 to screen$", log, re.M)
    summaries = [ln for ln in log.splitlines() if not re.match(STAMP, ln)]  # the last line of each run
    assert re.match(r"0 files: 0 classified, 0 rejected, 0 errors; 0 screened in \d+\.\d s", summaries[1])
    assert summaries[2].startswith("1 file: 0 classified, 1 rejected, 0 errors; 1 screened in ")
    assert [s.endswith("reused from the ledger") for s in summaries] == [True] * 3


def test_readme_cron_line_names_both_reports_by_one_date_across_midnight(site: Path, tmp_path: Path) -> None:
    # `$(date +%F)` written twice is asked twice: a run started at midnight named its CSV by one
    # day and its JSON by the next. A `date` that says the next day from its second call on:
    tools = tmp_path / "tools"
    tools.mkdir()
    (tools / "date").write_text(
        '#!/bin/sh\nif [ -e "$0.asked" ]; then echo 2026-12-08; else touch "$0.asked"; echo 2026-12-07; fi\n',
        encoding="utf-8",
    )
    (tools / "date").chmod(0o755)
    done = cron(site, tools=tools)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (site / "reports").iterdir()) == ["2026-12-07.csv", "2026-12-07.json"]


def test_reports_get_the_umask_mode_and_keep_an_existing_one(site: Path) -> None:
    assert cron(site, umask="022").returncode == 0
    report, _, _ = _report_rows(site)
    for path in (report, report.with_suffix(".json")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    report.chmod(0o640)
    assert cron(site, umask="077").returncode == 0
    assert stat.S_IMODE(report.stat().st_mode) == 0o640  # an existing report keeps its mode
    assert stat.S_IMODE(report.with_suffix(".json").stat().st_mode) == 0o644


def test_review_page_and_heatmaps_are_readable_by_others(
    site: Path, tiny_models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(site)
    script = (
        f"umask 022 && {CXRBATCH} run incoming --models {tiny_models} --out r.csv --html review.html "
        "--heatmaps maps --quiet"
    )
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    maps = list((site / "maps").glob("*.png"))
    assert len(maps) == 2
    for path in (site / "review.html", site / "r.csv", *maps):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


CRASH_SCRIPT = "import sys\nfrom cxrbatch.cli import app\napp(sys.argv[1:])\n"


def test_ledger_shows_a_killed_run_as_interrupted(tmp_path: Path, tiny_models: Path) -> None:
    inbox, ledger = tmp_path / "in", tmp_path / "l.db"
    inbox.mkdir()
    for i, level in enumerate((20, 110, 170, 250, 60)):
        grey_image(inbox / f"img{i}.png", level)
    args = ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger), "--batch-size", "2", "-q"]
    env = {**os.environ, "CXRBATCH_CRASH_AT": "batch_committed"}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, *args], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9
    result = runner.invoke(app, ["ledger", str(ledger)])
    assert result.exit_code == 0
    assert "last run #1: interrupted" in result.stdout and "2 results committed before it ended" in result.stdout
    with open(tmp_path / "l.db.lock", "w") as holder:  # as if that run were still going
        fcntl.flock(holder, fcntl.LOCK_EX)
        result = runner.invoke(app, ["ledger", str(ledger), "--json"])
    assert result.exit_code == 0  # reading the ledger takes no lock
    assert json.loads(result.stdout)["last_run"]["status"] == "running"


def test_a_lock_this_user_may_not_open_does_not_make_a_run_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch import ledger_view

    (tmp_path / "l.db.lock").write_text("", encoding="utf-8")
    real_open = os.open

    def refused(path: str | os.PathLike[str], *args: int) -> int:
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args)

    monkeypatch.setattr(ledger_view.os, "open", refused)
    assert ledger_view._lock_is_held(tmp_path / "l.db") is None  # a monitoring account: it cannot tell
    (tmp_path / "l.db.lock").unlink()
    monkeypatch.undo()
    assert ledger_view._lock_is_held(tmp_path / "l.db") is False  # no lock file: no run ever held it


def test_error_lines_carry_a_timestamp_and_a_busy_ledger_is_no_error(tmp_path: Path, incoming: Path) -> None:
    result = runner.invoke(app, ["run", str(incoming), "--models", str(tmp_path / "none")])
    assert result.exit_code == 1
    assert re.search(rf"^{STAMP} \[error\] Models folder not found: ", result.stderr, re.M)
    ledger = tmp_path / "l.db"
    with open(tmp_path / "l.db.lock", "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        # the lock is taken first: neither the missing models nor a missing input are looked at
        busy = runner.invoke(app, ["run", str(incoming), "--models", str(tmp_path / "none"), "--ledger", str(ledger)])
        gone = runner.invoke(app, ["run", str(tmp_path / "nothing"), "--ledger", str(ledger)])
    for result in (busy, gone):
        assert result.exit_code == 4
        assert re.search(rf"^{STAMP} \[info\] Another cxrbatch run holds the ledger .*nothing was done", result.stderr)
        assert "[error]" not in result.stderr and "found" not in result.stderr


def test_skipped_files_are_counted_by_reason(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    (incoming / "scan.pdf").write_bytes(b"%PDF-1.4")
    result = runner.invoke(app, ["run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv")])
    assert "found 6 files to screen" in result.stderr
    assert "skipped 1 file: hidden, 2 files: not an image file name" in result.stderr


def test_an_empty_input_folder_warns_and_exits_5(tiny_models: Path, tmp_path: Path) -> None:
    empty, report = tmp_path / "mnt", tmp_path / "r.csv"
    empty.mkdir()
    result = runner.invoke(app, ["run", str(empty), "--models", str(tiny_models), "--out", str(report)])
    assert result.exit_code == 5
    assert re.search(
        rf"{STAMP} \[warning\] no image file found in .*mnt: is the folder empty, or not mounted", result.stderr
    )
    assert report.read_text(encoding="utf-8").count("\n") == 1  # the header: downstream still finds a report


def test_help_shows_choices_and_version() -> None:
    result = runner.invoke(app, ["run", "--help"], terminal_width=200)
    text = " ".join(result.stdout.split())
    assert "--device <auto|cpu|cuda>" in text and "--heatmaps-for <all|flagged>" in text and "<str>" not in text
    assert "5 no image file in the inputs" in text
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"cxrbatch {__version__}"


def test_heatmaps_for_without_heatmaps_is_a_usage_error(tiny_models: Path, incoming: Path) -> None:
    result = runner.invoke(app, ["run", str(incoming), "--models", str(tiny_models), "--heatmaps-for", "flagged"])
    assert result.exit_code == 2 and "--heatmaps-for needs --heatmaps" in result.stderr


def test_one_file_is_one_file(tiny_models: Path, tmp_path: Path) -> None:
    grey_image(tmp_path / "a.png", 110)
    result = runner.invoke(app, ["run", str(tmp_path / "a.png"), "--models", str(tiny_models), "--out", "-"])
    assert "found 1 file to screen" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("1 file: 1 classified, 0 rejected, 0 errors (1 NORMAL)")


SCHEMA_1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE results (sha256 TEXT NOT NULL, models TEXT NOT NULL, record TEXT NOT NULL, run INTEGER NOT NULL,
    inferences INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (sha256, models));
CREATE TABLE entries (path TEXT NOT NULL, sha256 TEXT NOT NULL, models TEXT NOT NULL, first_run INTEGER NOT NULL,
    delivered_run INTEGER, PRIMARY KEY (path, sha256, models));
CREATE TABLE runs (id INTEGER PRIMARY KEY, started TEXT NOT NULL, finished TEXT, status TEXT NOT NULL,
    screened INTEGER NOT NULL DEFAULT 0, reused INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0);
CREATE INDEX entries_undelivered ON entries (delivered_run);
INSERT INTO meta VALUES ('schema', 'cxrbatch.ledger/1');
INSERT INTO runs VALUES (1, '2026-11-30T02:00:00+00:00', NULL, 'running', 0, 0, 0);
"""


def test_a_schema_1_ledger_is_upgraded_without_losing_rows(tiny_models: Path, tmp_path: Path) -> None:
    import sqlite3

    inbox, ledger = tmp_path / "in", tmp_path / "old.db"
    inbox.mkdir()
    grey_image(inbox / "new.png", 250)
    old = {"status": "classified", "gate_score": 0.98, "label": "NORMAL", "confidence": 0.7, "p_COVID19": 0.1,
           "p_NORMAL": 0.7, "p_PNEUMONIA": 0.1, "p_TUBERCULOSIS": 0.1, "needs_review": False, "error": None,
           "gate_model": "aaaaaaaaaaaa", "classifier_model": "bbbbbbbbbbbb"}  # fmt: skip
    with sqlite3.connect(ledger) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO results VALUES ('f' , 'g:c', ?, 1, 1)", (json.dumps(old),))
        db.execute("INSERT INTO entries VALUES (?, 'f', 'g:c', 1, NULL)", (f"{inbox}/killed-run.png",))
    db.close()
    inspected = runner.invoke(app, ["ledger", str(ledger)])
    assert inspected.exit_code == 1 and "the next `cxrbatch run --ledger` upgrades it" in inspected.stderr
    report = tmp_path / "r.csv"
    result = runner.invoke(app, ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger),
                                 "--out", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "upgraded from cxrbatch.ledger/1 to cxrbatch.ledger/3" in result.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(report.open(encoding="utf-8"))}
    assert sorted(rows) == ["killed-run.png", "new.png"]  # the dead run's undelivered row is delivered now
    assert rows["killed-run.png"]["p_NORMAL"] == "0.700000" and rows["new.png"]["label"] == "TUBERCULOSIS"
    status = json.loads(runner.invoke(app, ["ledger", str(ledger), "--json"]).stdout)
    assert status["runs"] == 2 and status["undelivered"] == 0 and status["files"] == 2


def test_ledger_view_of_an_empty_file_refuses_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    result = runner.invoke(app, ["ledger", str(empty)])
    assert result.exit_code == 1 and "is empty: not a cxrbatch ledger" in result.stderr
    assert empty.stat().st_size == 0


def test_ledger_view_of_a_folder_asks_for_the_ledger_file(tmp_path: Path) -> None:
    # "Ledger not found: site" for a folder that is there (the site folder, say) told nothing
    result = runner.invoke(app, ["ledger", str(tmp_path)])
    assert result.exit_code == 2 and f"{tmp_path} is a folder: give the ledger file" in result.stderr
    result = runner.invoke(app, ["ledger", str(tmp_path / "missing.db")])
    assert result.exit_code == 2 and "Ledger not found" in result.stderr
