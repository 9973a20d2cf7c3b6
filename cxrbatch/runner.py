"""One screening run from inputs to written reports: the library behind `cxrbatch run`."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrbatch.discovery import iter_images
from cxrbatch.imaging import display_path
from cxrbatch.ledger import Ledger, crash_point, now
from cxrbatch.models import Model, default_models_dir, load_models
from cxrbatch.pipeline import Result, Screener, Summary, screen_all
from cxrbatch.reports import check_writable, render_csv, render_json, result_record, write_text
from cxrbatch.review import render_html

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class RunOptions:
    """What `cxrbatch run` was asked to do."""

    inputs: list[Path]
    csv_out: str | None = "-"
    json_out: str | None = None
    models_dir: Path | None = None
    batch_size: int = 8
    workers: int = 2
    device: str = "auto"
    draft: bool = True
    ledger: Path | None = None
    report_all: bool = False
    heatmaps: Path | None = None
    heatmaps_for: str = "all"
    html: str | None = None
    reporter: Progress | None = field(default=None, repr=False)


def run(options: RunOptions) -> Summary:
    """Screen every input file and write the requested reports; return the summary."""
    started = now()
    targets = [t for t in (options.csv_out, options.json_out, options.html) if t is not None]
    for target in targets:
        check_writable(target)
    skip = [Path(t) for t in targets if t != "-"]
    if options.ledger is not None:
        skip.append(options.ledger)
    if options.heatmaps is not None:
        options.heatmaps.mkdir(parents=True, exist_ok=True)
        skip.append(options.heatmaps)
    paths = list(iter_images(options.inputs, skip=skip))
    log.info("found %d files to screen", len(paths))
    gate, classifier = load_models(options.models_dir or default_models_dir(), options.device)
    screener = Screener(
        gate,
        classifier,
        options.batch_size,
        options.workers,
        options.draft,
        heatmaps=options.heatmaps,
        heatmaps_for=options.heatmaps_for,
    )
    report = Report(options, gate, classifier, started)
    if options.ledger is None:
        results, summary = screen_all(screener, paths, _progress_hook(len(paths), options.reporter))
        report.write([report.record(r) for r in results], summary)
        return summary
    with Ledger.open(options.ledger) as ledger:
        return _run_with_ledger(ledger, options, screener, paths, report)


class Report:
    """Turns results into the requested CSV, JSON and HTML reports."""

    def __init__(self, options: RunOptions, gate: Model, classifier: Model, started: str) -> None:
        self.options, self.gate, self.classifier, self.started = options, gate, classifier, started
        self.labels = classifier.spec.labels
        self.extra = ("heatmap",) if options.heatmaps is not None else ()

    def record(self, result: Result) -> dict[str, Any]:
        """The report record of one result."""
        return result_record(result, self.labels, self.gate, self.classifier, heatmap=bool(self.extra))

    def render(self, records: list[dict[str, Any]], summary: Summary) -> dict[str, str]:
        """Report texts by target."""
        texts = {}
        models = {"gate": self.gate.describe(), "classifier": self.classifier.describe()}
        if self.options.csv_out is not None:
            texts[self.options.csv_out] = render_csv(records, self.labels, self.extra)
        if self.options.json_out is not None:
            texts[self.options.json_out] = render_json(records, models, summary, self.started)
        if self.options.html is not None:
            texts[self.options.html] = render_html(records, models, summary, self.started, Path(self.options.html))
        return texts

    def write(self, records: list[dict[str, Any]], summary: Summary) -> None:
        """Render and write every requested report."""
        for target, text in self.render(records, summary).items():
            write_text(target, text)
            log.info("report written: %s", target)


def _run_with_ledger(
    ledger: Ledger, options: RunOptions, screener: Screener, paths: list[Path], report: Report
) -> Summary:
    """Screen only what the ledger has no result for; report what no completed run delivered."""
    run_id = ledger.begin_run()
    models = f"{screener.gate.sha256}:{screener.classifier.sha256}"
    hashes = ledger.content_hashes(paths)
    known = {p: h for p, h in hashes.items() if h is not None}
    cached = ledger.cached(known.values(), models)
    todo, later = _to_screen(paths, hashes, cached)
    reused = len(paths) - len(todo)
    log.info("run %d: %d files, %d already screened, %d to screen", run_id, len(paths), reused, len(todo))
    ledger.note_entries(((p, h) for p, h in known.items() if h in cached), models)
    fresh, seconds = _screen_into(ledger, screener, todo, known, models, report, options.reporter)
    ledger.note_entries(((p, known[p]) for p in later), models)  # same content as a file screened now
    if options.report_all:
        rows = ledger.for_paths(known.items(), models)
    else:
        rows = ledger.undelivered()
    records = [{**rec, "path": display_path(Path(path))} for path, rec in rows]
    records += [fresh[p] for p in todo if p not in known]  # unreadable files: reported, never stored
    records = [{k: v for k, v in r.items() if not k.startswith("_")} for r in records]
    summary = Summary(seconds=seconds)
    for r in records:
        summary.count(r["status"], r.get("label"))
    crash_point("before_report")
    report.write(records, summary)
    crash_point("after_report")
    ledger.finish([p for p, _ in rows], len(todo), reused)
    log.info("run %d: screened %d, reused %d, reported %d", run_id, len(todo), reused, len(records))
    return summary


def _screen_into(
    ledger: Ledger,
    screener: Screener,
    todo: list[Path],
    known: dict[Path, str],
    models: str,
    report: Report,
    reporter: Progress | None,
) -> tuple[dict[Path, dict[str, Any]], float]:
    """Screen `todo`, committing results to the ledger batch by batch; return the records and seconds."""
    fresh: dict[Path, dict[str, Any]] = {}
    pending: list[tuple[Path, str | None, dict[str, Any]]] = []
    started = time.perf_counter()
    for result in screener.screen(todo, _progress_hook(len(todo), reporter)):
        fresh[result.path] = report.record(result)
        pending.append((result.path, known.get(result.path), fresh[result.path]))
        if len(pending) >= screener.batch_size:
            ledger.store(pending, models)  # a crash loses at most the batch in flight
            crash_point("batch_committed")
            pending = []
    ledger.store(pending, models)
    return fresh, time.perf_counter() - started


def _to_screen(
    paths: list[Path], hashes: dict[Path, str | None], cached: dict[str, dict[str, Any]]
) -> tuple[list[Path], list[Path]]:
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


def _progress_hook(total: int, reporter: Progress | None) -> Callable[[Result], None]:
    """Count results; tell the reporter, or log a plain line every tenth of the way (cron-friendly)."""
    done = 0
    step = max(1, total // 10)

    def hook(result: Result) -> None:
        nonlocal done
        done += 1
        if reporter is not None:
            reporter(done, total)
        elif done % step == 0 or done == total:
            log.info("screened %d/%d", done, total)

    return hook
