"""The report contract: columns and order, cell formats, formula escaping, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from cxrbatch.errors import CxrBatchError
from cxrbatch.models import load_models
from cxrbatch.pipeline import ERROR, Result, Summary
from cxrbatch.reports import atomic_write, check_writable, columns, csv_cell, render_csv, render_json, result_record

EXPECTED_HEADER = (
    "path,status,gate_score,label,confidence,p_COVID19,p_NORMAL,p_PNEUMONIA,p_TUBERCULOSIS,"
    "needs_review,error,gate_model,classifier_model"
)


def test_header_follows_the_contract() -> None:
    assert ",".join(columns(("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"))) == EXPECTED_HEADER


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("x")', '\'=HYPERLINK("x")'),
        ("+1", "'+1"),
        ("-2", "'-2"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("ok.png", "ok.png"),
        (0.5, "0.500000"),
        (True, "true"),
        (False, "false"),
        (None, ""),
    ],
)
def test_csv_cells(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


def test_records_and_csv_rows(tiny_models: Path, tmp_path: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    labels = classifier.spec.labels
    ok = Result(
        Path("=evil.png"),
        "classified",
        0.99,
        "NORMAL",
        0.7,
        {"COVID19": 0.1, "NORMAL": 0.7, "PNEUMONIA": 0.15, "TUBERCULOSIS": 0.05},
        False,
    )
    bad = Result(tmp_path / "b.png", ERROR, error="not a readable image (unknown or corrupt format)")
    records = [result_record(r, labels, gate, classifier) for r in (ok, bad)]
    rows = list(csv.DictReader(io.StringIO(render_csv(records, labels))))
    assert rows[0]["path"] == "'=evil.png"
    assert rows[0]["p_NORMAL"] == "0.700000" and rows[0]["needs_review"] == "false"
    assert rows[0]["gate_model"] == gate.short_hash and rows[0]["classifier_model"] == classifier.short_hash
    assert rows[1]["status"] == "error" and rows[1]["label"] == "" and rows[1]["p_NORMAL"] == ""
    assert rows[1]["error"] == "not a readable image (unknown or corrupt format)"


def test_json_document_shape(tiny_models: Path, tmp_path: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    summary = Summary()
    result = Result(tmp_path / "x.png", "rejected", 0.01)
    summary.add(result)
    records = [result_record(result, classifier.spec.labels, gate, classifier)]
    doc = json.loads(render_json(records, {"gate": gate.describe()}, summary, "2026-01-01T00:00:00+00:00"))
    assert doc["schema"] == "cxrbatch.report/1"
    assert doc["summary"]["by_status"] == {"classified": 0, "rejected": 1, "error": 0}
    assert doc["models"]["gate"]["sha256"] == gate.sha256
    assert list(doc["results"][0]) == columns(classifier.spec.labels)
    assert doc["results"][0]["gate_score"] == 0.01 and doc["results"][0]["label"] is None


def test_atomic_write_keeps_old_report_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    target.write_text("good old report\n", encoding="utf-8")

    def explode(fh: object) -> None:
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, explode)
    assert target.read_text(encoding="utf-8") == "good old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]  # no temp file left behind


def test_unwritable_targets_fail_early(tmp_path: Path) -> None:
    with pytest.raises(CxrBatchError, match="does not exist"):
        check_writable(tmp_path / "no" / "such" / "report.csv")
    with pytest.raises(CxrBatchError, match="is a directory"):
        check_writable(tmp_path)
    check_writable("-")
    check_writable(tmp_path / "fine.csv")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(CxrBatchError, match="not writable"):
            check_writable(ro / "r.csv")
