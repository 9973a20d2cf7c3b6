"""A run with a ledger, the part of it that decides what a report file holds: the union of its runs' rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cxrbatch.ledger_run import union
from cxrbatch.records import Record


def test_union_keeps_earlier_rows_first_and_each_row_once() -> None:
    a, b, c = (Record.of(f"{n}.png", "rejected", "g", "c", gate_score=0.1) for n in "abc")
    assert union([a, b], [b, c]) == [a, b, c]
    assert union([], [c, a]) == [c, a]
    broken = Record.of("a.png", "error", "g", "c", error="corrupt or truncated image: x")
    assert union([broken, b], [a, c]) == [a, b, c]  # the mended row takes the failed one's place
    assert union([a.with_problem("heatmap not written: No space left on device"), b], [a]) == [a, b]


def test_union_folds_the_rows_of_every_earlier_run(tmp_path: Path) -> None:
    # Each run's rows are kept: a film unreadable on the first run and mended on the second was
    # there twice in the third run's report.
    a, b = (Record.of(tmp_path / n, "classified", "g", "c", label="NORMAL", confidence=0.9) for n in ("a.png", "b.png"))
    broken = Record.of(tmp_path / "a.png", "error", "g", "c", error="corrupt or truncated image")
    folder = Record.of(tmp_path, "error", "g", "c", error="folder cannot be read")
    assert union([broken, b, a], []) == [a, b] and union([broken, b, a], [b]) == [a, b]
    assert union([folder, b], []) == [b]  # its files were listed later
    assert union([b, folder], []) == [b, folder]  # not the other way round
    assert union([folder, b, folder], []) == [b, folder]  # it failed again: shown again (it was dropped as seen)
    assert union([b, folder, b], []) == [b]  # listed again (--report-all): its old error goes
    assert union([broken, a, broken], []) == [a, broken]  # a failure after a result comes after it


def test_union_keeps_a_delivered_result_that_another_films_row_follows(tmp_path: Path) -> None:
    # A referred film whose heatmap could not be written, replaced by another film of the same
    # name before the rerun: the new film's NORMAL row took its place, and the referral was in no report.
    referred = Record.of(tmp_path / "b.png", "classified", "g", "c", label="TUBERCULOSIS", confidence=0.9, refer=True)
    unwritten = referred.with_problem("heatmap not written: No space left on device")
    other = Record.of(tmp_path / "b.png", "classified", "g", "c", label="NORMAL", confidence=0.8, refer=False)
    assert union([unwritten], [other]) == [unwritten, other]
    drawn = replace(referred, heatmap="/maps/0123456789abcdef.png")
    assert union([unwritten], [drawn]) == [drawn]  # the same result, its heatmap drawn: in its place
    assert union([unwritten, other], [drawn]) == [unwritten, other, drawn]  # b.png's last row is the other film's
