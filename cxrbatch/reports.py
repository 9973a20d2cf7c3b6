"""CSV and JSON reports of records, written atomically.

Numbers are written with six decimals so that the same inputs and models give byte-identical
reports. A text cell that a spreadsheet would read as a formula, or that starts with a single
quote, is prefixed with a single quote: a program drops one leading quote to read it back.
Paths are written as UTF-8; bytes that are not valid UTF-8 in a file name appear as `\\xNN`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from cxrbatch.errors import ReportError
from cxrbatch.files import atomic_write, written_at
from cxrbatch.records import DECIMALS, Record, Summary

JSON_SCHEMA = "cxrbatch.report/1"
BASE_COLUMNS = ("path", "status", "gate_score", "label", "confidence")
TAIL_COLUMNS = ("needs_review", "error", "gate_model", "classifier_model")
REFERRAL_COLUMNS = ("referral_score", "refer", "familiarity", "unfamiliar")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
# A cell that starts with the quote itself gets one more: dropping one leading quote gives every
# cell back (`=x.png` and a file named `'=x.png` wrote the same cell).
QUOTED_STARTS = (*FORMULA_STARTS, "'")


def columns(labels: Sequence[str], heatmap: bool = False) -> list[str]:
    """The CSV header: fixed columns, one p_<LABEL> per classifier label, the rest, then `heatmap` if drawn."""
    probs = (f"p_{label}" for label in labels)
    return [*BASE_COLUMNS, *probs, *TAIL_COLUMNS, *REFERRAL_COLUMNS, *(("heatmap",) if heatmap else ())]


def report_fields(record: Record, labels: Sequence[str], heatmap: bool = False) -> dict[str, Any]:
    """One record's report fields, in column order."""
    fields = record.fields(labels)
    return {c: fields[c] for c in columns(labels, heatmap)}


def csv_cell(value: Any) -> str:
    """Render one CSV cell: fixed decimals, true/false, and formula-looking text defused."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.{DECIMALS}f}"
    text = str(value)
    return "'" + text if text.startswith(QUOTED_STARTS) else text


def render_csv(records: Sequence[Record], labels: Sequence[str], heatmap: bool = False) -> str:
    """Render records as CSV text with the contract's header (plus the heatmap column)."""
    buf, row = io.StringIO(), io.StringIO()
    # The csv module quotes a cell holding a character of its line terminator: with "\r\n" a bare
    # "\r" in a file name is quoted too (with "\n" alone it would split the row). Rows end in "\n".
    writer = csv.writer(row, lineterminator="\r\n")

    def write(cells: Sequence[str]) -> None:
        row.seek(0)
        row.truncate()
        writer.writerow(cells)
        buf.write(row.getvalue()[:-2] + "\n")

    write(columns(labels, heatmap))
    for record in records:
        write([csv_cell(v) for v in report_fields(record, labels, heatmap).values()])
    return buf.getvalue()


def render_json(
    records: Sequence[Record],
    labels: Sequence[str],
    models: dict[str, Any],
    summary: Summary,
    started: str,
    heatmap: bool = False,
    engine: dict[str, Any] | None = None,
) -> str:
    """Render the JSON report document."""
    doc = {
        "schema": JSON_SCHEMA,
        "started": started,
        **({"engine": engine} if engine is not None else {}),
        "models": models,
        "summary": summary.as_dict(),
        "results": [report_fields(r, labels, heatmap) for r in records],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_text(target: str | Path, text: str, stdout: IO[str] | None = None) -> None:
    """Write a report to a file atomically, or to stdout when target is '-': UTF-8 either way (a
    report on stdout in the locale's encoding failed on a non-ASCII name under an ASCII locale)."""
    if str(target) == "-":
        out = stdout or sys.stdout
        try:
            raw = getattr(out, "buffer", None)  # a text stream without one (a test's) takes the text
            if raw is None:
                out.write(text)
                out.flush()
            else:
                out.flush()  # whatever was written as text goes first
                raw.write(text.encode("utf-8"))
                raw.flush()
        except OSError as exc:  # a full disk or a closed pipe behind stdout
            raise ReportError(f"Cannot write the report to stdout: {exc.strerror or exc}", exc.strerror or "") from None
        return
    atomic_write(Path(target), lambda fh: fh.write(text))


def _through_dev(path: Path) -> bool:
    """Whether `path`, or a symbolic link on the way from it, names something under /dev or /proc
    (/dev/shm, a memory file system for files, aside)."""
    for _ in range(40):  # as the kernel, give up on a longer chain of links
        path = path.absolute()
        if str(path).startswith(("/dev/", "/proc/")) and not str(path).startswith("/dev/shm/"):
            return True
        if not path.is_symlink():
            return False
        path = path.parent / os.readlink(path)
    return False


def check_writable(target: str | Path) -> None:
    """Fail before screening when a report could not be written at the end."""
    if str(target) == "-":
        if sys.stdout is None:  # descriptor 1 closed (`>&-`): found at the end, after the night's screening
            raise ReportError("Cannot write the report to stdout: it is closed (`>&-`); give a file name instead of -")
        return
    if _through_dev(Path(target)):
        # /dev/stdout leads to whatever stdout is (a cron log it would replace, a pipe it cannot rename over)
        raise ReportError(f"Cannot write report {target}: not a file of its own (for stdout, give -)")
    path = written_at(Path(target))
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ReportError(f"Cannot write report {path}: folder {folder} does not exist")
    if path.is_dir():
        raise ReportError(f"Cannot write report {path}: it is a directory")
    if path.exists() and not path.is_file():  # replaced by a rename, a device node would be gone for everyone
        raise ReportError(f"Cannot write report {target}: it is a device or a pipe, not a file (stdout is -)")
    if not os.access(folder, os.W_OK):
        raise ReportError(f"Cannot write report {path}: folder {folder} is not writable")
