"""The report contract: columns and order, cell formats, formula escaping, atomic writes."""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import tiny_spec

from cxrbatch.errors import CxrBatchError
from cxrbatch.files import atomic_write
from cxrbatch.records import CLASSIFIED, ERROR, Record, RecordError, Summary
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


def test_a_defused_cell_reads_back_as_the_name_it_was() -> None:
    # `=x.png` and a file really named `'=x.png` both became the cell `'=x.png`: a program could
    # not tell which file a row was about. A cell that starts with `'` gets one more, so dropping
    # one leading `'` gives every name back.
    names = ["=x.png", "'=x.png", "''=x.png", "'quoted.png", "-2.png", "plain.png"]
    records = [Record.of(Path(n), ERROR, "g" * 12, "c" * 12, error="x") for n in names]
    cells = [r["path"] for r in csv.DictReader(io.StringIO(render_csv(records, LABELS)))]
    assert len(set(cells)) == len(names)
    assert [c[1:] if c.startswith("'") else c for c in cells] == names


def test_line_breaks_in_a_file_name_stay_inside_their_cell() -> None:
    # A bare carriage return split the row (and its second half began with an undefused formula).
    names = ["scan\r=cmd|' -C calc'!A0", "two\nlines.png", "crlf\r\nname.png"]
    records = [Record.of(Path(n), ERROR, "g" * 12, "c" * 12, error="x") for n in names]
    text = render_csv(records, LABELS)
    assert text.endswith("\n") and not text.endswith("\r\n") and text.count("\n") == 1 + 1 + 2 + 2
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert [r[0] for r in rows[1:]] == names
    assert {len(r) for r in rows} == {len(columns(LABELS))}


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


def _flagged(k: int, n: int, model: str = "c") -> list[Record]:
    return [Record.of(f"{i}.png", "classified", "g", model, label="NORMAL", unfamiliar=i < k) for i in range(n)]


def test_the_site_check_holds_a_run_against_the_reference_films_by_fishers_test() -> None:
    from cxrbatch.metrics import hypergeometric_at_least
    from cxrbatch.sitecheck import Reference, check

    validation = Reference("validation films", 9, 910)
    rejected = Record.of("r.png", "rejected", "g", "c", gate_score=0.1)  # no familiarity: not counted
    earlier = _flagged(30, 30, model="old")  # rows another classifier judged: not counted
    usual = check([*_flagged(2, 100), rejected, *earlier], validation, "c")
    assert usual is not None and (usual.films, usual.unfamiliar) == (100, 2)
    assert usual.p == pytest.approx(hypergeometric_at_least(2, 100, 11, 1010)) and usual.warning() is None
    # a site a little more often unfamiliar than the validation films is not warned however many films it screens
    assert not check(_flagged(140, 10000), validation, "c").unlike_reference  # type: ignore[union-attr]
    odd = check(_flagged(40, 958), validation, "c")
    assert odd is not None and odd.unlike_reference
    assert odd.warning().startswith(  # type: ignore[union-attr]
        "40 of 958 classified films (4.2%) are unfamiliar, against 9 of the 910 validation films (p = "
    )
    assert "unlike the collections the classifier was trained on" in str(odd.warning())
    assert "(cxrbatch calibrate --site-head)" in str(odd.warning())  # the remedy for a new site's ranking
    assert odd.as_dict() == {
        "films": 958, "unfamiliar": 40, "against": "validation films", "reference": {"films": 910, "unfamiliar": 9},
        "p": float(f"{odd.p:.3g}"), "unlike_reference": True,
    }  # fmt: skip
    calibrated = check(_flagged(20, 20), Reference("calibration films", 27, 54), "c")
    assert calibrated is not None and "against 27 of the 54 calibration films" in str(calibrated.warning())
    assert "Calibrate again on recent labelled films" in str(calibrated.warning())
    assert not check(_flagged(25, 50), Reference("calibration films", 27, 54), "c").unlike_reference  # type: ignore[union-attr]
    assert check(_flagged(5, 50), None, "c") is None and check([rejected], validation, "c") is None


def test_the_summary_carries_the_runs_site_check_into_report_files_that_hold_earlier_rows() -> None:
    from cxrbatch.sitecheck import Reference, check

    rows = _flagged(40, 958)
    summary = Summary.of(rows, site=check(rows, Reference("validation films", 9, 910), "c"))
    assert summary.site_warning() and summary.as_dict()["site_check"]["unfamiliar"] == 40  # type: ignore[index]
    union = summary.recount([*rows, *_flagged(0, 500, model="older")])
    assert union.site == summary.site and union.unfamiliar == 40 and union.files == 1458
    assert Summary.of(rows).as_dict()["site_check"] is None and Summary.of(rows).site_warning() is None


def test_the_reference_is_the_less_familiar_of_the_calibration_and_validation_films() -> None:
    from cxrbatch.sitecheck import Reference, check, reference_of

    familiarity = {"familiarity": {"val_films": 910, "val_unfamiliar": 9, "percentile": 99.0}}
    spec = tiny_spec("classifier", 0.6, familiarity_output="familiarity", familiarity_threshold=0.3)
    spec.extra.update(familiarity)
    assert reference_of(spec) == Reference("validation films", 9, 910)
    calibration = {"unfamiliar": 27, "familiarity_threshold": 0.3, "counts": {"NORMAL": 24, "PNEUMONIA": 30}}
    spec.extra["calibration"] = calibration
    assert reference_of(spec) == Reference("calibration films", 27, 54)  # a site less familiar than val
    for unfamiliar in (0, 1):  # as familiar as val, or not beyond chance (1 of 54: a site like val, often)
        spec.extra["calibration"] = {**calibration, "unfamiliar": unfamiliar}
        reference = reference_of(spec)
        assert reference == Reference("validation films", 9, 910) and reference is not None and reference.calibrated
    night = check(_flagged(20, 20), reference, "c")  # the advice is a calibrated model's: calibrate again
    assert night is not None and "Calibrate again on recent labelled films" in str(night.warning())
    headed = replace(spec, referral_output="site_referral")  # a site head, which calibrate refuses: its source
    night = check(_flagged(20, 20), reference_of(headed), "c")
    assert night is not None and "Calibrate the models it was made from" in str(night.warning())
    assert "--site-head" in str(night.warning())
    flood = check(_flagged(400, 400), reference_of(headed), "c")  # its tail underflows to 0.0
    assert flood is not None and flood.p == 0.0 and "(p < 1e-300)" in str(flood.warning())
    spec.extra["calibration"] = {**calibration, "unfamiliar": 0}
    del spec.extra["familiarity"]
    assert reference_of(spec) == Reference("calibration films", 0, 54)  # the only reference there is
    spec.extra.update(familiarity)
    spec.extra["calibration"] = {**calibration, "familiarity_threshold": 67.66}  # counted under another output
    assert reference_of(spec) == Reference("validation films", 9, 910)
    del spec.extra["familiarity"]
    assert reference_of(spec) is None  # metadata from before the counts were kept
    assert reference_of(tiny_spec("classifier", 0.6)) is None  # no familiarity output


def test_atomic_write_keeps_old_report_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    target.write_text("good old report\n", encoding="utf-8")

    def explode(fh: object) -> None:
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, explode)
    assert target.read_text(encoding="utf-8") == "good old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.csv"]  # no temp file left behind


def test_unwritable_targets_fail_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CxrBatchError, match="does not exist"):
        check_writable(tmp_path / "no" / "such" / "report.csv")
    with pytest.raises(CxrBatchError, match="is a directory"):
        check_writable(tmp_path)
    check_writable("-")
    check_writable(tmp_path / "fine.csv")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    real_access = os.access
    # as for any user but root (CI runs as root): only the read-only folder is refused
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro and real_access(path, mode))
    with pytest.raises(CxrBatchError, match="is not writable"):
        check_writable(ro / "r.csv")


def test_a_report_is_never_renamed_over_a_device_or_a_pipe_and_goes_through_a_link(tmp_path: Path) -> None:
    import stat

    pipe = tmp_path / "pipe.csv"
    os.mkfifo(pipe)
    with pytest.raises(CxrBatchError, match="it is a device or a pipe, not a file"):
        check_writable(pipe)
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    (tmp_path / "reports").mkdir()
    day = tmp_path / "reports" / "day1.csv"
    day.write_text("old\n", encoding="utf-8")
    latest = tmp_path / "latest.csv"
    latest.symlink_to(day)
    check_writable(latest)
    atomic_write(latest, lambda fh: fh.write("new\n"))
    assert latest.is_symlink() and day.read_text(encoding="utf-8") == "new\n"
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["day1.csv"]  # no temporary file left


def test_a_report_that_stdout_cannot_take_is_an_error_not_a_traceback() -> None:
    from cxrbatch.reports import write_text

    class Full(io.StringIO):
        def flush(self) -> None:
            raise OSError(28, "No space left on device")

    with pytest.raises(CxrBatchError, match="Cannot write the report to stdout: No space left on device"):
        write_text("-", "path,status\n", stdout=Full())


def test_a_report_is_not_written_through_dev_or_proc(tmp_path: Path) -> None:
    for target in ("/dev/stdout", "/dev/null", "/proc/self/fd/1"):  # stdout may be a cron log it would replace
        with pytest.raises(CxrBatchError, match="not a file of its own"):
            check_writable(target)
    if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK):
        check_writable("/dev/shm/cxrbatch-report.csv")  # a memory file system for files: allowed
    link = tmp_path / "out.csv"
    link.symlink_to("/dev/stdout")
    with pytest.raises(CxrBatchError, match="not a file of its own"):
        check_writable(link)


def _stored(**changes: object) -> str:
    record = Record.of(
        "a.png", CLASSIFIED, "g" * 12, "c" * 12, gate_score=0.9, label="NORMAL", confidence=0.8,
        probabilities={"COVID19": 0.1, "NORMAL": 0.8, "PNEUMONIA": 0.05, "TUBERCULOSIS": 0.05},
        needs_review=False, referral_score=0.2, refer=False,
    )  # fmt: skip
    data = json.loads(record.to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize("changes", [{"confidence": True}, {"referral_score": float("nan")}])
def test_a_stored_record_with_a_number_that_is_not_one_is_a_record_error(changes: dict[str, object]) -> None:
    # "A record that is not one (damaged, or edited by hand) is a RecordError, never a wrong row"
    with pytest.raises(RecordError):
        Record.from_json("a.png", _stored(**changes))


def test_a_report_named_as_long_as_its_folder_allows_is_written(tmp_path: Path) -> None:
    # the temporary file's name (`.NAME.` + 8 characters + `.tmp`) went past the limit: a 255-byte
    # report name failed with "File name too long" after the whole run had been screened
    longest = tmp_path / ("r" * (os.pathconf(tmp_path, "PC_NAME_MAX") - 4) + ".csv")
    check_writable(longest)
    atomic_write(longest, lambda fh: fh.write("path,status\n"))
    assert longest.read_text(encoding="utf-8") == "path,status\n"
    assert [p.name for p in tmp_path.iterdir()] == [longest.name]  # no temporary file left


def test_the_same_result_is_every_cell_alike_and_the_scores_within_the_sixth_decimal() -> None:
    probs = {"COVID19": 0.1, "NORMAL": 0.7, "PNEUMONIA": 0.15, "TUBERCULOSIS": 0.05}
    base = Record.of("a.png", CLASSIFIED, "g", "c", gate_score=0.9, label="NORMAL", confidence=0.7,
                     probabilities=probs, needs_review=False, referral_score=0.3, refer=True)  # fmt: skip
    moved = replace(base, confidence=0.700001, probabilities={**probs, "NORMAL": 0.700001}, referral_score=0.299999)
    assert base.same_result(moved) and moved.same_result(base)
    assert not base.same_result(replace(base, confidence=0.70001))  # a score that moved
    assert not base.same_result(replace(base, probabilities={**probs, "NORMAL": 0.7001}))
    assert not base.same_result(replace(base, refer=False))  # a decision that changed
    assert not base.same_result(replace(base, classifier_model="d"))  # other models
    assert not base.same_result(replace(base, familiarity=0.2))  # a score that one of them lacks
    assert not base.same_result(replace(base, probabilities=None))


def test_the_same_result_takes_a_score_moved_by_its_tolerance_alike_at_any_value() -> None:
    # a score moved by 2e-6 (the default tolerance) was the same result at 0.000010 and news at
    # 0.500000: the difference of two six-decimal floats is 2e-6 give or take a last bit
    def at(score: float) -> Record:
        return Record.of("a.png", CLASSIFIED, "g", "c", gate_score=score, label="NORMAL", confidence=score)

    for score in (0.00001, 0.1, 0.5, 0.7, 0.999996):
        assert at(score).same_result(at(score + 2e-6)) and at(score + 2e-6).same_result(at(score))
        assert not at(score).same_result(at(score + 3e-6))
