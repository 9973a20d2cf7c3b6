"""Decoding in processes (`--decoders`): the same results as the threads, a process that dies on
a file costs that file only, and a run leaves no process behind."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from helpers import make_dicom, ramp
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.decoding import CRASHED
from cxrbatch.discovery import iter_images
from cxrbatch.models import load_models
from cxrbatch.pipeline import Screener, screen_all
from cxrbatch.runner import RunOptions
from cxrbatch.runner import run as run_screening

runner = CliRunner()
CLI = "import sys\nfrom cxrbatch.cli import app\napp(sys.argv[1:])\n"


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return {Path(row["path"]).name: row for row in csv.DictReader(fh)}


def test_processes_give_what_the_threads_give(tiny_models: Path, incoming: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    paths = list(iter_images([incoming]))
    threads, _ = screen_all(Screener(gate, classifier, batch_size=2, workers=2), paths)
    processes = Screener(gate, classifier, batch_size=2, workers=2, decoders=2)
    try:
        decoded, _ = screen_all(processes, paths)
        pictures = list(processes.class_maps(paths))
        assert len(multiprocessing.active_children()) >= 2  # the processes did decode (no fallback)
    finally:
        processes.close()
    # every field, scores to the last bit: the same pixels reach the same models
    assert [asdict(r) for r in decoded] == [asdict(r) for r in threads]
    assert {r.status for r in decoded} == {"classified", "rejected", "error"}
    # a heatmap's picture and map come back from a process as they are made in a thread
    in_thread = Screener(gate, classifier, batch_size=2, workers=2)
    for (mine, cam, probs), (theirs, their_cam, their_probs) in zip(pictures, in_thread.class_maps(paths), strict=True):
        assert mine.error == theirs.error
        assert (cam is None) == (their_cam is None) == (probs is None) == (their_probs is None)
        if cam is not None:
            np.testing.assert_array_equal(cam, their_cam)
            np.testing.assert_array_equal(probs, their_probs)
            assert mine.picture is not None and theirs.picture is not None
            assert mine.picture.tobytes() == theirs.picture.tobytes()


def test_a_process_that_dies_on_a_file_costs_that_file_only(tmp_path: Path, tiny_models: Path, incoming: Path) -> None:
    base = [sys.executable, "-c", CLI, "run", str(incoming), "--models", str(tiny_models), "--batch-size", "2", "-q"]
    clean = subprocess.run([*base, "--out", str(tmp_path / "clean.csv")], capture_output=True, timeout=120)
    assert clean.returncode == 3  # the broken JPEG
    env = {**os.environ, "CXRBATCH_CRASH_AT": "decoding c_light.PNG"}  # kill -9 of the process decoding it
    died = subprocess.run(
        [*base, "--decoders", "2", "--out", str(tmp_path / "died.csv")],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert died.returncode == 3
    assert "a decoding process died" in died.stderr and f"c_light.PNG: {CRASHED}" in died.stderr
    rows, reference = _rows(tmp_path / "died.csv"), _rows(tmp_path / "clean.csv")
    assert rows.keys() == reference.keys()
    lost = rows.pop("c_light.PNG")
    assert lost["status"] == "error" and lost["error"] == CRASHED and lost["label"] == ""
    assert reference.pop("c_light.PNG")["status"] == "classified"
    # the other file of its batch, and the batch in flight beside it, were decoded again
    assert rows == reference


def test_a_hangup_of_the_whole_group_stops_the_run_in_one_line(
    tmp_path: Path, tiny_models: Path, incoming: Path
) -> None:
    # A closed terminal sends SIGHUP to every process of the group: the run, its decoding processes,
    # multiprocessing's fork server and resource tracker. The two helpers died of it: "a decoding
    # process died" and pages of the tracker's tracebacks before the run's own line.
    env = {
        **os.environ,
        "CXRBATCH_CRASH_AT": "decoding c_light.PNG",
        "CXRBATCH_CRASH_SIGNAL": str(signal.SIGHUP.value),
        "CXRBATCH_CRASH_GROUP": "1",
    }
    args = ["run", str(incoming), "--models", str(tiny_models), "--batch-size", "2", "--decoders", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", *args, "--out", str(tmp_path / "r.csv")],  # main(): its handlers
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        start_new_session=True,  # a group of its own: the hangup reaches the run, not the tests
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),  # heard even if the tests run under nohup
    )
    assert done.returncode == 129, done.stderr
    assert "Traceback" not in done.stderr and "died" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].endswith(
        "[error] stopped by SIGHUP (exit 129): what it had not yet written is not written"
    )


def test_a_run_leaves_no_decoding_process_behind(tmp_path: Path, tiny_models: Path, incoming: Path) -> None:
    out = tmp_path / "r.csv"
    summary = run_screening(
        RunOptions(inputs=[incoming], csv_out=str(out), models_dir=tiny_models, batch_size=2, decoders=2)
    )
    assert summary.by_status == {"classified": 4, "rejected": 1, "error": 1}
    assert multiprocessing.active_children() == []


def test_the_json_report_names_the_decoding_processes(tmp_path: Path, tiny_models: Path, incoming: Path) -> None:
    args = ["run", str(incoming), "--models", str(tiny_models), "-q", "--workers", "1"]
    with_processes = runner.invoke(app, [*args, "--decoders", "3", "--json", str(tmp_path / "p.json")])
    in_threads = runner.invoke(app, [*args, "--json", str(tmp_path / "t.json")])
    assert with_processes.exit_code == in_threads.exit_code == 3
    report = json.loads((tmp_path / "p.json").read_text(encoding="utf-8"))
    assert report["engine"] == {"name": "local", "threads": 1, "decoding_processes": 3}
    assert json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["engine"] == {"name": "local", "threads": 1}
    assert report["results"] == json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))["results"]
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(
        app, [*args[:1], str(empty), *args[2:], "--decoders", "3", "--json", str(tmp_path / "e.json")]
    )
    assert nothing.exit_code == 5  # no file, so no process started: none named
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["engine"]["decoding_processes"] == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--decoders", "-1"], "-1 is not in the range x>=0"),
        (["--decoders", "2", "--engine", "ray"], "Ray actors decode in their own processes already"),
    ],
)
def test_decoders_refused_where_they_make_no_sense(
    tiny_models: Path, incoming: Path, extra: list[str], message: str
) -> None:
    result = runner.invoke(app, ["run", str(incoming), "--models", str(tiny_models), *extra])
    assert result.exit_code == 2
    assert message in result.stderr


def test_more_processes_than_cores_get_a_thread_each(tiny_models: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier, decoders=64)
    assert screener.workers == 64  # a thread waits on each process's batch
    assert Screener(gate, classifier, workers=2, decoders=64).workers == 2  # unless told otherwise
    with pytest.raises(ValueError, match="decoders at least 0"):
        Screener(gate, classifier, decoders=-1)


UNGUARDED = """\
import sys
from pathlib import Path
from cxrbatch.runner import RunOptions, run
run(RunOptions(inputs=[Path(sys.argv[1])], csv_out=sys.argv[2], models_dir=Path(sys.argv[3]), batch_size=2, decoders=2,
               json_out=sys.argv[4]))
"""


def test_processes_that_cannot_start_leave_the_decoding_to_the_threads(
    tmp_path: Path, tiny_models: Path, incoming: Path
) -> None:
    # a script without `if __name__ == "__main__":` cannot start processes that import it again
    script = tmp_path / "nightly.py"
    script.write_text(UNGUARDED, encoding="utf-8")
    out, reference = tmp_path / "r.csv", tmp_path / "t.csv"
    proc = subprocess.run(
        [sys.executable, str(script), str(incoming), str(out), str(tiny_models), str(tmp_path / "r.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "decoding processes could not start" in proc.stderr
    assert CRASHED not in out.read_text(encoding="utf-8")
    run_screening(RunOptions(inputs=[incoming], csv_out=str(reference), models_dir=tiny_models, batch_size=2))
    assert _rows(out) == _rows(reference)
    engine = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["engine"]
    assert engine["decoding_processes"] == 0  # the JSON says what decoded, not what was asked for
    assert engine["decoding_processes_unavailable"] in proc.stderr


def _marked(mark: str) -> list[int]:
    """The processes whose environment carries `mark`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux's /proc to find the processes")
def test_a_killed_run_leaves_no_decoding_process_behind(tmp_path: Path, tiny_models: Path, incoming: Path) -> None:
    mark = f"CXRBATCH_TEST_MARK={os.getpid()}-{tmp_path.name}"
    key, value = mark.split("=")
    env = {**os.environ, key: value, "CXRBATCH_CRASH_AT": "batch_committed"}  # kill -9 after a first batch
    args = ["run", str(incoming), "--models", str(tiny_models), "--ledger", str(tmp_path / "l.db"), "--decoders", "2"]
    proc = subprocess.run(
        [sys.executable, "-c", CLI, *args, "--batch-size", "2", "-q"], env=env, capture_output=True, timeout=120
    )
    assert proc.returncode == -9
    deadline = time.monotonic() + 10
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(mark) == []


@pytest.mark.parametrize("where", ["cxrbatch.imaging.Image.open", "cxrbatch.decoding.model_pixels"])
def test_a_film_decoded_out_of_memory_is_an_error_row_that_says_so(
    tiny_models: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """ulimit -v or a container's limit: the row must not call a good film corrupt."""
    gate, classifier = load_models(tiny_models)
    screener = Screener(gate, classifier, batch_size=2, workers=1)

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(where, no_memory)
    decoded = screener.decode(incoming / "a_dark.png")
    assert decoded.error is not None
    assert "out of memory" in decoded.error
    assert "corrupt" not in decoded.error and "unexpected" not in decoded.error


@pytest.mark.parametrize("where", ["pydicom.dcmread", "pydicom.dataset.Dataset.pixel_array"])
def test_a_dicom_film_decoded_out_of_memory_is_an_error_row_that_says_so(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The DICOM reader's own `except Exception` called the film unreadable or undecodable."""
    pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")
    gate, classifier = load_models(tiny_models)
    screener = Screener(gate, classifier, batch_size=2, workers=1)
    film = make_dicom(tmp_path / "fine.dcm", ramp())

    def no_memory(*args: object, **kwargs: object) -> None:
        raise MemoryError

    monkeypatch.setattr(where, property(no_memory) if where.endswith("pixel_array") else no_memory)
    decoded = screener.decode(film)
    assert decoded.error is not None
    assert "out of memory" in decoded.error
    assert "unreadable" not in decoded.error and "cannot be decoded" not in decoded.error
