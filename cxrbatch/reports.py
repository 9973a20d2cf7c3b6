"""CSV and JSON reports, written atomically.

Numbers are written with six decimals so that the same inputs and models give byte-identical
reports. A text cell that a spreadsheet would read as a formula is prefixed with a single quote.
Paths are written as UTF-8; bytes that are not valid UTF-8 in a file name appear as `\\xNN`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cxrbatch.errors import CxrBatchError
from cxrbatch.imaging import display_path
from cxrbatch.models import Model
from cxrbatch.pipeline import Result, Summary

JSON_SCHEMA = "cxrbatch.report/1"
BASE_COLUMNS = ("path", "status", "gate_score", "label", "confidence")
TAIL_COLUMNS = ("needs_review", "error", "gate_model", "classifier_model")
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
DECIMALS = 6


def columns(labels: tuple[str, ...], extra: tuple[str, ...] = ()) -> list[str]:
    """The CSV header: fixed columns, one p_<LABEL> per classifier label, the rest, then `extra`."""
    return [*BASE_COLUMNS, *(f"p_{label}" for label in labels), *TAIL_COLUMNS, *extra]


def result_record(
    result: Result, labels: tuple[str, ...], gate: Model, classifier: Model, heatmap: bool = False
) -> dict[str, Any]:
    """One result as a flat record with the report's field names and typed values."""
    probs = result.probabilities or {}
    record: dict[str, Any] = {
        "path": display_path(result.path),
        "status": result.status,
        "gate_score": _round(result.gate_score),
        "label": result.label,
        "confidence": _round(result.confidence),
    }
    for label in labels:
        record[f"p_{label}"] = _round(probs.get(label))
    record.update(
        needs_review=result.needs_review,
        error=result.error,
        gate_model=gate.short_hash,
        classifier_model=classifier.short_hash,
    )
    if heatmap:
        record["heatmap"] = display_path(result.heatmap) if result.heatmap else None
    return record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)


def csv_cell(value: Any) -> str:
    """Render one CSV cell: fixed decimals, true/false, and formula-looking text defused."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.{DECIMALS}f}"
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def render_csv(records: list[dict[str, Any]], labels: tuple[str, ...], extra: tuple[str, ...] = ()) -> str:
    """Render records as CSV text with the contract's header (plus `extra` columns)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    header = columns(labels, extra)
    writer.writerow(header)
    for record in records:
        writer.writerow([csv_cell(record.get(c)) for c in header])
    return buf.getvalue()


def render_json(records: list[dict[str, Any]], models: dict[str, Any], summary: Summary, started: str) -> str:
    """Render the JSON report document."""
    doc = {
        "schema": JSON_SCHEMA,
        "started": started,
        "models": models,
        "summary": summary.as_dict(),
        "results": records,
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_text(target: str | Path, text: str, stdout: IO[str] | None = None) -> None:
    """Write a report to a file atomically, or to stdout when target is '-'."""
    if str(target) == "-":
        out = stdout or sys.stdout
        out.write(text)
        out.flush()
        return
    atomic_write(Path(target), lambda fh: fh.write(text))


def atomic_write(path: Path, write: Callable[[IO[str]], object]) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`."""
    folder = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise CxrBatchError(f"Cannot write report {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise CxrBatchError(f"Cannot write report {path}: {exc.strerror or exc}") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def check_writable(target: str | Path) -> None:
    """Fail before screening when a report could not be written at the end."""
    if str(target) == "-":
        return
    path = Path(target)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise CxrBatchError(f"Cannot write report {path}: folder {folder} does not exist")
    if path.is_dir():
        raise CxrBatchError(f"Cannot write report {path}: it is a directory")
    if not os.access(folder, os.W_OK):
        raise CxrBatchError(f"Cannot write report {path}: folder {folder} is not writable")
