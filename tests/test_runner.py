"""One run from inputs to reports: heatmaps after screening, the run fingerprint, honest rates."""

from __future__ import annotations

import csv
import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import grey_image
from PIL import Image
from typer.testing import CliRunner

from cxrbatch import files
from cxrbatch.cli import app
from cxrbatch.discovery import HEATMAPS_MARKER
from cxrbatch.ledger_view import inspect
from cxrbatch.runner import RunOptions, run

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stderr


def _rows(report: Path) -> dict[str, dict[str, str]]:
    return {Path(r["path"]).name: r for r in csv.DictReader(report.open(encoding="utf-8"))}


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A folder on a 64 KiB tmpfs that is already full (root only: CI runs as root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,nr_inodes=64", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        with open(mount / "filler", "wb", buffering=0) as fh:
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_writing_heatmaps_loses_no_result(
    tiny_models: Path, incoming: Path, tmp_path: Path, full_disk: Path
) -> None:
    report = tmp_path / "r.csv"
    code, err = _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(report),
                        "--heatmaps", str(full_disk / "maps"), "--html", str(tmp_path / "review.html"))  # fmt: skip
    assert code == 3 and "Traceback" not in err
    rows = _rows(report)
    assert len(rows) == 6  # every file is still reported
    for name in ("a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"):
        assert rows[name]["status"] == "classified" and rows[name]["label"]  # the result stands
        assert rows[name]["heatmap"] == ""
        assert rows[name]["error"] == "heatmap not written: No space left on device"
    assert rows["f_broken.jpg"]["error"].startswith("corrupt or truncated image")
    assert "4 heatmaps not written" in err
    assert "No space left on device" in (tmp_path / "review.html").read_text(encoding="utf-8")  # the page says so
    left = [p.name for p in (full_disk / "maps").iterdir() if p.name.startswith(".")]
    assert left == [HEATMAPS_MARKER]  # no temp file left, only the mark that keeps later runs out


def _no_space_for_pictures(src: str, dst: str) -> None:
    """`os.replace` on a disk with no room left for a picture (a heatmap); reports still fit."""
    if str(dst).endswith(".png"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.rename(src, dst)


def test_a_heatmap_that_cannot_be_written_is_a_row_problem(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(files.os, "replace", _no_space_for_pictures)
    report = tmp_path / "r.csv"
    code, err = _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(report),
                        "--heatmaps", str(tmp_path / "maps"), "--heatmaps-for", "flagged")  # fmt: skip
    assert code == 3 and "Traceback" not in err
    rows = _rows(report)
    flagged = [n for n, r in rows.items() if r["error"] == "heatmap not written: No space left on device"]
    assert sorted(flagged) == ["a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"]  # b_mid is unsure
    assert [p.name for p in (tmp_path / "maps").iterdir()] == [HEATMAPS_MARKER]


def test_a_rerun_into_the_same_report_draws_the_heatmaps_that_could_not_be_written(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Their rows were delivered: the rerun found nothing to report, exited 0, and the report kept
    # "heatmap not written" although the disk had room again.
    def night(report: Path) -> tuple[int, str]:
        return _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(report),
                       "--ledger", str(tmp_path / "l.db"), "--heatmaps", str(tmp_path / "maps"))  # fmt: skip

    report = tmp_path / "2026-12-01.csv"
    (incoming / "g_gone.png").write_bytes((incoming / "a_dark.png").read_bytes() + b"\0")  # leaves after night 1
    with monkeypatch.context() as full:
        full.setattr(files.os, "replace", _no_space_for_pictures)
        code, _ = night(report)
    assert code == 3 and sum(r["error"].startswith("heatmap not written") for r in _rows(report).values()) == 5
    (incoming / "g_gone.png").unlink()
    code, err = night(report)  # the same day, the disk freed
    lines = list(csv.DictReader(report.open(encoding="utf-8")))
    names = [Path(r["path"]).name for r in lines]
    assert code == 0 and "4 classified" in err and len(names) == len(set(names)) == 7  # the four mended, in place
    failed = {n for n in names if _rows(report)[n]["error"]}
    assert names.index("a_dark.png") == 0 and failed == {"f_broken.jpg", "g_gone.png"}  # gone: not drawn again
    drawn = [n for n, r in _rows(report).items() if r["heatmap"] and Path(r["heatmap"]).is_file()]
    assert sorted(drawn) == ["a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"]  # every classified film there
    before = report.read_bytes()
    code, err = night(report)  # mended: nothing more to draw, each row once, however many runs wrote it
    assert code == 0 and "0 classified" in err and report.read_bytes() == before
    code, _ = night(tmp_path / "2026-12-02.csv")  # the next night's report: a result is delivered once
    assert code == 0 and _rows(tmp_path / "2026-12-02.csv") == {}


def test_ledger_does_not_reuse_results_made_with_other_settings(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    ledger = tmp_path / "l.db"
    base = ["run", str(incoming), "--models", str(tiny_models), "--ledger", str(ledger)]
    code, err = _invoke(*base, "--out", str(tmp_path / "1.csv"))
    assert code == 3 and "6 screened" in err
    maps = tmp_path / "hm"
    code, err = _invoke(*base, "--out", str(tmp_path / "2.csv"), "--report-all", "--heatmaps", str(maps), "--no-draft")
    assert code == 3
    assert "6 screened" in err and "0 reused from the ledger" in err  # --no-draft is another fingerprint
    rows = _rows(tmp_path / "2.csv")
    assert all(rows[n]["heatmap"] for n in ("a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"))
    assert len(list(maps.glob("*.png"))) == 4


def test_heatmaps_are_drawn_for_results_reused_from_the_ledger(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    ledger, maps = tmp_path / "l.db", tmp_path / "hm"
    base = ["run", str(incoming), "--models", str(tiny_models), "--ledger", str(ledger)]
    _invoke(*base, "--out", str(tmp_path / "1.csv"))
    code, err = _invoke(*base, "--out", str(tmp_path / "2.csv"), "--report-all", "--heatmaps", str(maps))
    assert code == 3 and "5 already screened, 1 to screen" in err  # the unreadable file is tried again
    rows = _rows(tmp_path / "2.csv")
    for name in ("a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"):
        assert Image.open(rows[name]["heatmap"]).size[0] > 0
    assert rows["e_photo.png"]["heatmap"] == "" and rows["e_photo.png"]["status"] == "rejected"


def test_the_rate_counts_only_what_was_screened_now(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "l.db"
    (incoming / "f_broken.jpg").unlink()
    base = ["run", str(incoming), "--models", str(tiny_models), "--ledger", str(ledger)]
    _invoke(*base, "--out", str(tmp_path / "1.csv"))
    code, err = _invoke(*base, "--out", str(tmp_path / "2.csv"), "--report-all")
    summary = err.strip().splitlines()[-1]
    assert code == 0 and summary.startswith("5 files: 4 classified, 1 rejected, 0 errors")
    assert re.search(r"; 0 screened in \d+\.\d s, 0\.0 images/s, 5 reused from the ledger$", summary)
    (incoming / "new.png").write_bytes((incoming / "a_dark.png").read_bytes()[:-20] + b"x" * 20)  # new content
    code, err = _invoke(*base, "--out", str(tmp_path / "3.csv"))
    summary = err.strip().splitlines()[-1]
    assert code == 3 and summary.startswith("1 file: 0 classified, 0 rejected, 1 error")
    assert "; 1 screened in " in summary and summary.endswith("5 reused from the ledger")


def test_an_error_is_tried_again_and_delivered_once_it_reads(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
    from helpers import make_dicom, ramp

    inbox, ledger = tmp_path / "in", tmp_path / "l.db"
    inbox.mkdir()
    make_dicom(inbox / "chest.dcm", ramp(64, 64, 1000, 1100))
    base = ["run", str(inbox), "--models", str(tiny_models), "--ledger", str(ledger)]
    monkeypatch.setitem(sys.modules, "pydicom", None)  # night 1: the dicom extra is missing
    code, _ = _invoke(*base, "--out", str(tmp_path / "1.csv"))
    assert code == 3 and _rows(tmp_path / "1.csv")["chest.dcm"]["error"].startswith("DICOM file, but pydicom")
    code, _ = _invoke(*base, "--out", str(tmp_path / "2.csv"))
    assert code == 0 and _rows(tmp_path / "2.csv") == {}  # the same error is not delivered twice
    monkeypatch.delitem(sys.modules, "pydicom")  # the operator installs it
    code, err = _invoke(*base, "--out", str(tmp_path / "3.csv"))
    assert code == 0 and "0 already screened, 1 to screen" in err
    assert _rows(tmp_path / "3.csv")["chest.dcm"]["status"] == "classified"


def test_a_pipe_in_the_folder_does_not_hang_a_ledger_run(tiny_models: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    os.mkfifo(inbox / "pipe.png")
    grey_image(inbox / "a.png", 110)
    grey_image(inbox / "z.png", 120)
    report = tmp_path / "r.csv"
    code, _ = _invoke("run", str(inbox), "--models", str(tiny_models), "--ledger", str(tmp_path / "l.db"),
                      "--out", str(report))  # fmt: skip
    assert code == 3
    rows = _rows(report)
    assert rows["pipe.png"]["error"] == "not a regular file (a pipe, socket or device)"
    assert list(rows) == ["a.png", "pipe.png", "z.png"]  # input order: the unhashable row came last


def test_run_returns_the_summary_and_writes_the_union_of_a_report_path(tiny_models: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    grey_image(inbox / "a.png", 20)
    report, ledger = tmp_path / "r.csv", tmp_path / "l.db"
    options = RunOptions(inputs=[inbox], csv_out=str(report), models_dir=tiny_models, ledger=ledger)
    first = run(options)
    assert (first.found, first.screened, first.reused, first.files) == (1, 1, 0, 1)
    grey_image(inbox / "b.png", 250)
    second = run(options)
    assert (second.found, second.screened, second.reused, second.files) == (2, 1, 1, 1)
    assert sorted(_rows(report)) == ["a.png", "b.png"]  # the earlier row is still in the file
    status = inspect(ledger)
    assert status["last_run"]["status"] == "done" and status["undelivered"] == 0


def test_heatmaps_folder_that_is_a_file_is_a_usage_error(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    taken = tmp_path / "maps"
    taken.write_text("not a folder", encoding="utf-8")
    code, err = _invoke("run", str(incoming), "--models", str(tiny_models), "--heatmaps", str(taken))
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err


def test_outputs_that_would_destroy_an_input_the_ledger_or_each_other_are_refused_before_screening(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    film = incoming / "b_mid.jpg"
    before = film.read_bytes()
    ledger = tmp_path / "night.db"
    models = ("--models", str(tiny_models))
    other_films = tmp_path / "last-night"  # marked, its films would be hidden from every later run
    (other_films / "deep").mkdir(parents=True)
    grey_image(other_films / "deep" / "old.png", 120)
    refused = {
        "over a film in the folder": (str(incoming), "--out", str(film)),
        "over a film named as input": (str(film), "--html", str(film)),
        "a report named like an image": (str(incoming), "--json", str(tmp_path / "report.png")),
        "two reports in one file": (str(incoming), "--out", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.csv")),
        "two reports on stdout": (str(incoming), "--out", "-", "--html", "-"),
        "over the ledger": (str(incoming), "--ledger", str(ledger), "--out", str(ledger)),
        "over the ledger's log": (str(incoming), "--ledger", str(ledger), "--json", f"{ledger}-wal"),
        "heatmaps holding the inputs": (str(incoming / "sub"), "--heatmaps", str(incoming)),
        "heatmaps beside a named film": (str(film), "--heatmaps", str(incoming)),
        "heatmaps in another folder of films": (str(film), "--heatmaps", str(other_films)),
    }
    expected = {
        "over a film in the folder": "would be written over a film (or be screened as one)",
        "over a film named as input": "would be written over a film",
        "a report named like an image": "would be written over a film (or be screened as one)",
        "two reports in one file": "is named for two reports",
        "two reports on stdout": "only one report can go to stdout",
        "over the ledger": "would be written over the ledger",
        "over the ledger's log": "would be written over the ledger",
        "heatmaps holding the inputs": "would hold the films of",
        "heatmaps beside a named film": "would hold the films of",
        "heatmaps in another folder of films": "already holds films no run drew (old.png among them)",
    }
    for case, args in refused.items():
        code, err = _invoke("run", *args, *models)
        assert code == 2 and expected[case] in err and "Traceback" not in err, case
    assert film.read_bytes() == before and not (tmp_path / "r.csv").exists() and not (tmp_path / "report.png").exists()
    assert not list(other_films.rglob(".cxrbatch*"))
    maps = tmp_path / "maps"  # heatmaps this tool wrote, its mark lost: taken
    code, _ = _invoke("run", str(film), "--heatmaps", str(maps), "--out", str(tmp_path / "m.csv"), *models)
    (maps / HEATMAPS_MARKER).unlink()
    assert code == 0 and [p.suffix for p in maps.iterdir()] == [".png"]
    code, err = _invoke("run", str(film), "--heatmaps", str(maps), "--out", str(tmp_path / "m.csv"), *models)
    assert code == 0 and (maps / HEATMAPS_MARKER).is_file(), err
    hex_named = tmp_path / "incoming-2026-12-02"  # films named like heatmaps are still films
    hex_named.mkdir()
    grey_image(hex_named / "3f2a9c0d1e4b5a67.png", 120)
    code, err = _invoke("run", str(film), "--heatmaps", str(hex_named), "--out", str(tmp_path / "h.csv"), *models)
    assert code == 2 and "3f2a9c0d1e4b5a67.png among them" in err and "touch" in err
    assert not (hex_named / HEATMAPS_MARKER).exists()
    code, _ = _invoke("run", str(incoming), "--ledger", str(ledger), "--out", str(tmp_path / "night.db.csv"), *models)
    assert code == 3 and (tmp_path / "night.db.csv").is_file()  # a name that only begins like the ledger's is fine


def test_heatmaps_inside_the_screened_folder_are_never_screened_by_a_later_run(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    maps = incoming / "maps"
    first, second = tmp_path / "first.csv", tmp_path / "second.csv"
    code, _ = _invoke("run", str(incoming), "--models", str(tiny_models), "--heatmaps", str(maps), "--out", str(first))
    assert code == 3 and any(p.suffix == ".png" for p in maps.iterdir())
    code, _ = _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(second))  # no --heatmaps now
    assert code == 3 and set(_rows(second)) == set(_rows(first))
    assert not any("maps" in Path(r["path"]).parts for r in _rows(second).values())


def test_the_review_page_alone_can_go_to_stdout(tiny_models: Path, incoming: Path) -> None:
    # The CSV went to stdout by default beside it, and the two were refused as two reports on stdout.
    result = runner.invoke(app, ["run", str(incoming / "b_mid.jpg"), "--models", str(tiny_models), "--html", "-"])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.lstrip().startswith("<!DOCTYPE html>") and "path,status" not in result.stdout


def test_the_models_load_while_the_run_starts_and_their_error_still_comes_after_the_outputs(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command line starts loading the models before the run's modules are imported (a
    # one-film run's start-up); a mistake in the outputs is still reported before a models error.
    import threading

    from cxrbatch import models

    loaded_in: list[str] = []
    real = models.load_models

    def recording(*args: object, **kwargs: object) -> object:
        loaded_in.append(threading.current_thread().name)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(models, "load_models", recording)
    code, _ = _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv"))
    assert code == 3 and len(loaded_in) == 1 and loaded_in[0].startswith("models")  # once, in its own thread
    missing = ("--models", str(tmp_path / "no-models"))
    code, err = _invoke("run", str(incoming), *missing, "--out", str(incoming / "b_mid.jpg"))
    assert code == 2 and "would be written over a film" in err  # the output's mistake first
    code, err = _invoke("run", str(incoming), *missing, "--out", str(tmp_path / "none.csv"))
    assert code == 1 and "Models folder not found" in err and not (tmp_path / "none.csv").exists()
    code, err = _invoke("run", str(tmp_path / "nowhere"), "--models", str(tiny_models), "--out", "-")
    assert code == 2 and "Input not found" in err and "loaded" not in err  # no model's line before or after it
    code, err = _invoke("run", str(incoming), "--models", str(tiny_models), "--out", "-")
    assert err.index("found 6 files") < err.index("loaded gate") < err.index("loaded classifier")  # said in turn


@pytest.mark.parametrize(
    ("option", "code", "message"),
    [
        ("input", 2, "Input not found"),
        ("--out", 1, "File name too long"),
        ("--json", 1, "File name too long"),
        ("--html", 1, "File name too long"),
        ("--heatmaps", 1, "File name too long"),
    ],
)
def test_a_path_the_system_will_not_look_at_is_refused_in_a_line_not_a_traceback(
    option: str, code: int, message: str, tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    # pathlib's is_dir/is_file/exists raise on a name longer than the system allows, and for a
    # user that may not search a folder on the way (root, as CI runs, may search every folder)
    beyond = tmp_path / ("x" * 300) / "report.csv"
    where = [str(beyond)] if option == "input" else [str(incoming), option, str(beyond)]
    out = [] if option == "--out" else ["--out", str(tmp_path / "r.csv")]
    result = runner.invoke(app, ["run", *where, *out, "--models", str(tiny_models)])
    assert not isinstance(result.exception, OSError), result.exception
    assert result.exit_code == code and message in result.stderr
    assert "screened" not in result.stderr


def test_a_heatmap_the_process_had_no_memory_for_is_drawn_by_a_rerun_into_the_same_report(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `ulimit -v` the heatmap step's decode can fail where screening did not: the film is
    fine, and like a heatmap a full disk kept from being written, a rerun draws it."""

    def night() -> tuple[int, str]:
        return _invoke("run", str(incoming), "--models", str(tiny_models), "--out", str(report),
                       "--ledger", str(tmp_path / "l.db"), "--heatmaps", str(tmp_path / "maps"))  # fmt: skip

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    report = tmp_path / "2026-12-01.csv"
    with monkeypatch.context() as tight:
        tight.setattr("cxrbatch.decoding.display_copy", no_memory)  # the heatmap's picture only
        code, _ = night()
    problems = [r["error"] for r in _rows(report).values() if r["status"] == "classified"]
    assert code == 3 and len(problems) == 4 and all("out of memory" in p for p in problems)
    code, _ = night()  # the same day, with memory to spare
    drawn = [n for n, r in _rows(report).items() if r["heatmap"] and Path(r["heatmap"]).is_file()]
    assert code == 0 and sorted(drawn) == ["a_dark.png", "b_mid.jpg", "c_light.PNG", "d_white.jpeg"]
