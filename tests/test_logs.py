"""Log lines: their format, and file names written as the reports write them."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cxrbatch.logs import LineFormatter


def _line(message: str, *args: object) -> str:
    record = logging.LogRecord("cxrbatch", logging.ERROR, __file__, 1, message, args, None)
    return LineFormatter().format(record)


def test_a_line_has_a_time_a_level_word_and_the_message() -> None:
    line = _line("%s: %s", "a.png", "corrupt image")
    assert line.endswith(" [error] a.png: corrupt image") and line[4] == "-" and line[13] == ":"


def test_the_hour_a_clock_goes_back_is_told_apart_by_its_offset(monkeypatch) -> None:
    # Berlin's clocks went back at 01:00 UTC on 2026-10-25: 00:30 and 01:30 UTC are both 02:30
    # there, and a night's log could not say which of two runs came first.
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")  # Berlin, with no tz database needed
    time.tzset()
    try:
        lines = []
        for created in (1792888200.0, 1792891800.0):  # 2026-10-25 00:30 and 01:30 UTC
            record = logging.LogRecord("cxrbatch", logging.INFO, __file__, 1, "found 1 file to screen", (), None)
            record.created = created
            lines.append(LineFormatter().format(record))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert lines == [
        "2026-10-25 02:30:00 +0200 [info] found 1 file to screen",
        "2026-10-25 02:30:00 +0100 [info] found 1 file to screen",
    ]


def test_undecodable_bytes_of_a_file_name_are_written_as_the_report_writes_them() -> None:
    name = os.fsdecode(b"scan-\xff\xfe.png")  # a Latin-1 name on a UTF-8 system
    assert _line("%s: corrupt image", name).endswith("[error] scan-\\xff\\xfe.png: corrupt image")
    assert _line("%s", "r\u00f6ntgen \u2014 ok.png").endswith("[error] r\u00f6ntgen \u2014 ok.png")  # text stays text
    assert _line("%s", "lone \ud800").endswith("[error] lone \ud800")  # no byte made it: left as it is


def test_a_file_name_cannot_write_a_line_of_its_own_into_the_log() -> None:
    # A film named with newlines wrote a fake `[error]` line and a fake summary line into the
    # cron log (a decoder's warning names the file); a terminal's escape codes came through too.
    fake = "a.jpg\n2026-12-07 02:00:09 [error] Gate model not found\r\n0 files: 0 errors\x1b[2K\u009b.jpg"
    line = _line("%s: UserWarning from the decoder: Tag data larger than file", fake)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\u009b" not in line
    assert line.count("[error]") == 2 and line.index("[error] a.jpg\\n2026-12-07") > 0
    assert line.endswith(
        "\\r\\n0 files: 0 errors\\x1b[2K\\u009b.jpg: UserWarning from the decoder: Tag data larger than file"
    )
    assert _line("%s", "tab\there.png").endswith("[error] tab\there.png")  # a tab breaks no line


def test_a_file_name_cannot_write_a_line_of_its_own_for_a_reader_that_splits_on_unicode_breaks() -> None:
    # Python's str.splitlines() (a monitoring script's) also ends a line at U+2028 and U+2029: a
    # multi-frame DICOM named with them wrote a fake `[error]` line into the log such a script read.
    fake = "x\u20282026-12-07 02:00:09 [error] Gate model not found\u2029mf.dcm"
    line = _line("%s: multi-frame DICOM (2 frames): screening the first frame only", fake)
    assert line.splitlines() == [line] and line.count("[error]") == 2
    assert "[error] x\\u20282026-12-07 02:00:09 [error] Gate model not found\\u2029mf.dcm: multi-frame" in line


def test_a_run_names_a_report_in_its_log_as_the_file_system_lists_it(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a picture")
    out = tmp_path / os.fsdecode(b"nacht-\xe4.csv")  # a report named in a Latin-1 shell
    done = subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", "run", str(folder), "--models", str(tiny_models), "--out", str(out)],
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 3 and out.is_file()
    assert b"report written: " in done.stderr and b"nacht-\\xe4.csv (1 row)" in done.stderr, done.stderr
    assert b"\\udce4" not in done.stderr
