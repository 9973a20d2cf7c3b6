"""One screening run from inputs to written reports: the library behind `cxrbatch run`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cxrbatch.discovery import iter_images
from cxrbatch.models import default_models_dir, load_models
from cxrbatch.pipeline import Result, Screener, Summary, screen_all
from cxrbatch.reports import check_writable, render_csv, render_json, result_record, write_text

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class RunOptions:
    """What `cxrbatch run` was asked to do."""

    inputs: list[Path]
    csv_out: str | None = "-"
    json_out: str | None = None
    models_dir: Path | None = None
    batch_size: int = 16
    workers: int = 2
    device: str = "auto"
    draft: bool = True
    reporter: Progress | None = field(default=None, repr=False)


def run(options: RunOptions) -> Summary:
    """Screen every input file and write the requested reports; return the summary."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    targets = [t for t in (options.csv_out, options.json_out) if t is not None]
    for target in targets:
        check_writable(target)
    skip = [Path(t) for t in targets if t != "-"]
    paths = list(iter_images(options.inputs, skip=skip))
    log.info("found %d files to screen", len(paths))
    gate, classifier = load_models(options.models_dir or default_models_dir(), options.device)
    screener = Screener(gate, classifier, options.batch_size, options.workers, options.draft)
    results, summary = screen_all(screener, paths, _progress_hook(len(paths), options.reporter))
    labels = classifier.spec.labels
    records = [result_record(r, labels, gate, classifier) for r in results]
    if options.csv_out is not None:
        write_text(options.csv_out, render_csv(records, labels))
    if options.json_out is not None:
        models = {"gate": gate.describe(), "classifier": classifier.describe()}
        write_text(options.json_out, render_json(records, models, summary, started))
    for target in targets:
        log.info("report written: %s", target)
    return summary


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
