"""A run with a ledger (`cxrbatch run --ledger`): screen only what it lacks, deliver each result once.

The nightly job's half of a run: which files need screening (one per new content), their
results committed batch by batch, the rows no completed run delivered, the heatmaps a failed
night could not write drawn again, and the union a report file gets of every run that wrote it,
so that a rerun mends a report instead of adding to it. `runner` puts the run together around it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from cxrbatch.crashes import crash_point
from cxrbatch.heatmaps import unwritten
from cxrbatch.ledger import Ledger, key_of
from cxrbatch.ledger_news import news
from cxrbatch.pipeline import Screener
from cxrbatch.progress import Progress, progress_hook
from cxrbatch.records import ERROR, Record, Summary, plural

if TYPE_CHECKING:
    from cxrbatch.runner import Report, RunOptions

log = logging.getLogger(__name__)

CHANGED = "the file changed while it was screened (still being copied, or replaced): screened again on the next run"
GONE = "the file was deleted or moved away while it was screened: not screened (a run that finds it again screens it)"


def run_with_ledger(
    ledger: Ledger, screener: Screener, paths: list[Path], report: Report, options: RunOptions
) -> Summary:
    """Screen only what the ledger has no result for; report what no completed run delivered."""
    fp = ledger.begin_run(screener.settings())
    hashes = ledger.content_hashes(paths)
    known = {p: h for p, h in hashes.items() if h is not None}
    cached = ledger.cached(known.values(), fp)
    todo, later = _to_screen(paths, hashes, cached)
    reused = len(paths) - len(todo)
    log.info(
        "run %d: %s, %d already screened, %d to screen", ledger.run_id, plural(len(paths), "file"), reused, len(todo)
    )
    ledger.note_entries(((p, h) for p, h in known.items() if h in cached), fp)
    unreadable, seconds, dropped = _screen_into(ledger, screener, todo, known, fp, options.reporter)
    while waiting := [p for p in later if known[p] in dropped]:  # a copy whose twin changed while screened
        again = _to_screen(waiting, hashes, set())[0]  # one per content, as before
        later = [p for p in later if p not in again]
        more, spent, dropped = _screen_into(ledger, screener, again, known, fp, options.reporter)
        unreadable, seconds, todo = unreadable + more, seconds + spent, todo + again
    reused = len(paths) - len(todo)
    ledger.note_entries(((p, known[p]) for p in later), fp)  # same content as a file screened now
    stored = news(ledger, ledger.undelivered(options.inputs), fp)
    if options.report_all:  # every result for the inputs besides, after older contents' (a killed run's)
        now = ledger.for_paths(known.items(), fp)
        have = {(s.key, s.sha256) for s in now}
        stored = [s for s in stored if (s.key, s.sha256) not in have] + now
    # a file that changed or went away while it was screened again (an error row is tried on every
    # run), or that could not be read at all now, has that row in place of what is stored for it:
    # a stored error row (a killed run's) would give way to it in the report, so it is not delivered
    # now but waits for a run that reads the file
    left = {(key_of(p), known[p]) for p, _ in unreadable if p in known}
    unread = {key_of(p) for p, row in unreadable if p not in known and row.status == ERROR}
    stored = [s for s in stored if (s.key, s.sha256) not in left and (s.key not in unread or s.record.status != ERROR)]
    by_key = {key_of(p): p for p in paths}
    # a row from a killed run for an older content of a path gets no heatmap drawn from the new one
    current = {key_of(p): h for p, h in known.items()}
    items: list[tuple[Path | None, Record]] = [
        (by_key.get(s.key, Path(s.key)) if current.get(s.key, s.sha256) == s.sha256 else None, s.record) for s in stored
    ]
    items += unreadable
    delivered = {target: ledger.delivered_to(target) for target in report.files()}  # read once, used twice
    for target in report.files():
        if os.path.lexists(target) and not ledger.wrote(target):  # its rows are another ledger's, or none's
            log.warning(
                "report %s was written by no run of this ledger (another job's ledger, or a run without --ledger): "
                "what it holds is replaced; give each job its own report files",
                target,
            )
    if options.heatmaps is not None:
        items += _maps_to_draw_again(delivered, by_key, {record.path for _, record in items})
    position = {key_of(p): i for i, p in enumerate(paths)}  # rows are keyed as the ledger keys paths
    items.sort(key=lambda item: position.get(item[1].path, len(paths)))  # input order, as without a ledger
    rows = union([], report.finish_rows(items))  # a killed run's error row gives way to its file's result now
    run = {"found": len(paths), "screened": len(todo), "reused": reused, "seconds": seconds}
    summary = screener.summary(rows, **run)
    crash_point("before_report")
    ledger.aim(report.files())  # a run killed after writing them still wrote them (no warning then)
    report.write(rows, summary, earlier=delivered.__getitem__)
    crash_point("after_report")
    ledger.finish(stored, rows, report.files(), len(todo), reused)
    log.info("run %d: screened %d, reused %d, reported %d", ledger.run_id, len(todo), reused, len(rows))
    return summary


def _maps_to_draw_again(
    delivered: dict[str, list[Record]], by_key: dict[str, Path], reported: set[str]
) -> list[tuple[Path | None, Record]]:
    """The rows this run's report files hold (`delivered`, by file) whose heatmap could not be
    written (a full disk), for files among the inputs and not reported now: drawn again, they take
    their failed rows' places (`union`), so a rerun into the same report mends it. A row is
    delivered once: another night's report does not get it again."""
    again: dict[str, tuple[Path | None, Record]] = {}
    failed: list[set[str]] = []  # per report file: the paths whose last row there failed so
    for rows in delivered.values():
        latest = {row.path: row for row in union(rows, [])}  # each file's last row there
        failed.append({path for path, row in latest.items() if unwritten(row)})
        for path, row in latest.items():
            if unwritten(row) and path in by_key and path not in reported:
                again[path] = (by_key[path], replace(row, error=None, heatmap=None))
    # drawn again, a row is delivered into every report file of this run: only where each of them
    # holds it failed (a rerun into the failed night's files), never into a new night's report
    # because another file of the run (a fixed --html review.html) held the failed row
    mend = set.intersection(*failed) if failed else set()
    return [item for path, item in again.items() if path in mend]


def _screen_into(
    ledger: Ledger,
    screener: Screener,
    todo: list[Path],
    known: dict[Path, str],
    fp: str,
    reporter: Progress | None,
) -> tuple[list[tuple[Path, Record]], float, set[str]]:
    """Screen `todo`, committing results to the ledger batch by batch; return the rows of the files
    that could not be hashed or changed while screened (reported, never stored), the seconds
    spent, and the contents that changed (their copies need screening of their own)."""
    unreadable: list[tuple[Path, Record]] = []
    dropped: set[str] = set()  # the contents of files that changed while they were screened
    pending: list[tuple[Path, str | None, Record]] = []
    started = time.perf_counter()
    for result in screener.screen(todo, progress_hook(len(todo), reporter)):
        record = screener.record(result)
        if result.path in known and not ledger.unchanged(result.path):  # its result is of no hashed content
            why = CHANGED if os.path.lexists(result.path) else GONE  # an archiver moving films out of the folder
            changed = Record.of(result.path, ERROR, record.gate_model, record.classifier_model, error=why)
            unreadable.append((result.path, replace(changed, path=key_of(result.path))))  # reported, never stored
            dropped.add(known[result.path])
            continue
        if result.path not in known:  # named as the ledger names every path, so a later row replaces it
            unreadable.append((result.path, replace(record, path=key_of(result.path))))
        pending.append((result.path, known.get(result.path), record))
        if len(pending) >= screener.batch_size:
            ledger.store(pending, fp)  # a crash loses at most the batch in flight
            crash_point("batch_committed")
            pending = []
    ledger.store(pending, fp)
    return unreadable, time.perf_counter() - started, dropped


def _to_screen(paths: list[Path], hashes: dict[Path, str | None], cached: set[str]) -> tuple[list[Path], list[Path]]:
    """Paths that need inference (one per new content) and the other paths sharing such content."""
    todo: list[Path] = []
    seen: set[str] = set()
    later: list[Path] = []
    for path in paths:
        sha = hashes[path]
        if sha is None:
            todo.append(path)
        elif sha in cached:
            continue
        elif sha in seen:
            later.append(path)
        else:
            seen.add(sha)
            todo.append(path)
    return todo, later


def union(earlier: list[Record], rows: list[Record]) -> list[Record]:
    """The rows a report file received before (oldest run first), then this run's, in that order,
    so that a rerun after exit 3 mends the report instead of adding to it, however many runs
    wrote it (each run's rows are kept, not the union it wrote). A row is shown once. A later row
    for a path takes the place of that path's latest row where that row failed without a result
    (unreadable then), or is the same result whose heatmap could not be written; any other later
    row (a result for new content, a failure after a result) comes after it, the earlier result
    kept. A row shown before moves to the end when its file held another content since (put
    back, it is the file's news again). A folder that could not be listed gives way to rows of
    its files (and comes back if it fails again)."""
    out: list[Record | None] = []
    latest: dict[str, int] = {}  # each path's latest row in `out`
    shown: set[Record] = set()  # the rows `out` holds now
    for row in [*earlier, *rows]:
        folder = os.path.dirname(row.path)
        while folder and folder != os.path.dirname(folder):  # a folder's row is no longer true
            at = latest.get(folder)
            if at is not None and (held := out[at]) is not None and held.status == ERROR:
                out[at] = None
                shown.discard(held)
                del latest[folder]
            folder = os.path.dirname(folder)
        if row in shown:
            if (at := latest.get(row.path)) is not None and out[at] == row:
                continue
            out[out.index(row)] = None  # the file back at an earlier content: its row moves to the end
        at = latest.get(row.path)
        held = None if at is None else out[at]
        if at is not None and held is not None and (held.status == ERROR or _redrawn(held, row)):
            shown.discard(held)
            out[at] = row
        else:
            latest[row.path] = len(out)
            out.append(row)
        shown.add(row)
    return [row for row in out if row is not None]


def _redrawn(held: Record, row: Record) -> bool:
    """Whether `row` is `held`'s result again, `held` having had a problem after screening (a
    heatmap not written): the same cells but the heatmap's and the error's."""
    return held.has_problem and replace(held, heatmap=None, error=None) == replace(row, heatmap=None, error=None)
