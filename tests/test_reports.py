"""The report contract: columns and order, cell formats, formula escaping, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from cxrbatch.errors import CxrBatchError
from cxrbatch.files import atomic_write
from cxrbatch.records import ERROR, Record, Summary
from cxrbatch.reports import check_writable, columns, csv_cell, render_csv, render_json

LABELS = ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")

EXPECTED_HEADER = (
    "path,status,gate_score,label,confidence,p_COVID19,p_NORMAL,p_PNEUMONIA,p_TUBERCULOSIS,"
    "needs_review,error,gate_model,classifier_model,referral_score,refer,familiarity,unfamiliar"
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


def test_records_and_csv_rows(tmp_path: Path) -> None:
    probs = {"COVID19": 0.1, "NORMAL": 0.7000004, "PNEUMONIA": 0.15, "TUBERCULOSIS": 0.05}
    ok = Record.of(
        Path("=evil.png"),
        "classified",
        "g" * 12,
        "c" * 12,
        gate_score=0.99,
        label="NORMAL",
        confidence=0.7000004,
        probabilities=probs,
        needs_review=False,
    )
    bad = Record.of(
        tmp_path / "b.png", ERROR, "g" * 12, "c" * 12, error="not a readable image (unknown or corrupt format)"
    )
    assert ok.confidence == 0.7 and ok.probabilities == {**probs, "NORMAL": 0.7}  # rounded when made
    rows = list(csv.DictReader(io.StringIO(render_csv([ok, bad], LABELS))))
    assert rows[0]["path"] == "'=evil.png"
    assert rows[0]["p_NORMAL"] == "0.700000" and rows[0]["needs_review"] == "false"
    assert rows[0]["gate_model"] == "g" * 12 and rows[0]["classifier_model"] == "c" * 12
    assert rows[1]["status"] == "error" and rows[1]["label"] == "" and rows[1]["p_NORMAL"] == ""
    assert rows[1]["error"] == "not a readable image (unknown or corrupt format)"
    assert "heatmap" not in rows[0]
    with_maps = next(csv.DictReader(io.StringIO(render_csv([ok], LABELS, heatmap=True))))
    assert with_maps["heatmap"] == ""


def test_record_survives_the_ledger_round_trip_and_reads_schema_1_rows() -> None:
    probs = {"COVID19": 0.1, "NORMAL": 0.7, "PNEUMONIA": 0.15, "TUBERCULOSIS": 0.05}
    ok = Record.of(
        "a.png",
        "classified",
        "g",
        "c",
        gate_score=0.99,
        label="NORMAL",
        confidence=0.7,
        probabilities=probs,
        needs_review=False,
    )
    assert Record.from_json("a.png", ok.to_json()) == ok
    old = json.dumps(
        {
            "status": "classified",
            "gate_score": 0.99,
            "label": "NORMAL",
            "confidence": 0.7,
            **{f"p_{k}": v for k, v in probs.items()},
            "needs_review": False,
            "error": None,
            "gate_model": "g",
            "classifier_model": "c",
        }
    )
    assert Record.from_json("a.png", old) == ok
    rejected = json.dumps(
        {
            "status": "rejected",
            "gate_score": 0.01,
            **{f"p_{k}": None for k in probs},
            "gate_model": "g",
            "classifier_model": "c",
        }
    )
    assert Record.from_json("b.png", rejected).probabilities is None


def test_json_document_shape(tmp_path: Path) -> None:
    record = Record.of(tmp_path / "x.png", "rejected", "g" * 12, "c" * 12, gate_score=0.01)
    summary = Summary.of([record], found=1, screened=1, seconds=0.5)
    models = {"gate": {"sha256": "g" * 64}}
    doc = json.loads(render_json([record], LABELS, models, summary, "2026-01-01T00:00:00+00:00"))
    assert doc["schema"] == "cxrbatch.report/1"
    assert doc["summary"]["by_status"] == {"classified": 0, "rejected": 1, "error": 0}
    assert doc["summary"]["images_per_second"] == 2.0 and doc["summary"]["reused"] is None
    assert doc["models"]["gate"]["sha256"] == "g" * 64
    assert list(doc["results"][0]) == columns(LABELS)
    assert doc["results"][0]["gate_score"] == 0.01 and doc["results"][0]["label"] is None


def test_summary_counts_rows_and_rates_only_what_was_screened_now() -> None:
    rows = [Record.of(f"{i}.png", "classified", "g", "c", label="NORMAL") for i in range(40)]
    summary = Summary.of(rows, found=40, screened=0, reused=40, seconds=0.01)
    assert summary.images_per_second == 0.0
    assert summary.line() == (
        "40 files: 40 classified, 0 rejected, 0 errors (40 NORMAL); 0 screened in 0.0 s, 0.0 images/s, "
        "40 reused from the ledger"
    )
    one = Summary.of(rows[:1], found=1, screened=1, seconds=0.5)
    assert one.line() == "1 file: 1 classified, 0 rejected, 0 errors (1 NORMAL) in 0.5 s, 2.0 images/s"
    problem = Summary.of([rows[0].with_problem("heatmap not written: No space left on device")], screened=1)
    assert problem.failed and problem.problems == 1 and "1 heatmap not written" in problem.line()


def test_the_site_check_tests_the_unfamiliar_share_against_the_expected_one() -> None:
    from cxrbatch.metrics import binomial_at_least

    def rows(k: int, n: int) -> list[Record]:
        return [Record.of(f"{i}.png", "classified", "g", "c", label="NORMAL", unfamiliar=i < k) for i in range(n)]

    rejected = Record.of("r.png", "rejected", "g", "c", gate_score=0.1)  # no familiarity: not in the base
    usual = Summary.of([*rows(2, 100), rejected], unfamiliar_expected=0.01)  # P(>= 2 of 100) = 0.26
    odd = Summary.of([*rows(5, 50), rejected], unfamiliar_expected=0.01)  # P(>= 5 of 50) = 1.46e-4
    assert usual.familiarity_checked == 100 and usual.unfamiliar_p == pytest.approx(binomial_at_least(2, 100, 0.01))
    assert not usual.unlike_training and usual.site_warning() is None
    assert odd.unlike_training and odd.unfamiliar_p == pytest.approx(1.457e-4, rel=1e-3)
    assert odd.site_warning().startswith("5 of 50 classified films (10.0%) are unfamiliar, against about 1%")
    p = float(f"{odd.unfamiliar_p:.3g}")
    expected = {"films": 50, "unfamiliar": 5, "expected_share": 0.01, "p": p, "unlike_training": True}
    assert odd.as_dict()["site_check"] == expected
    assert odd.recount(rows(0, 10)).unfamiliar_expected == 0.01  # a report file's rows keep the model's share
    unknown = Summary.of(rows(5, 50))  # a classifier whose metadata gives no expected share
    assert unknown.unfamiliar_p is None and unknown.as_dict()["site_check"] is None and unknown.site_warning() is None


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
