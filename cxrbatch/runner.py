"""One screening run from inputs to written reports: the library behind `cxrbatch run`.

The steps, in order: take the ledger's lock (a busy ledger ends the run before any work), find
the files, load the models, screen what needs screening (with a ledger, `cxrbatch.ledger_run`: what
it has no result for under this run's fingerprint, committed batch by batch), draw heatmaps as a
step of their own over every row that gets one (fresh or reused), then write the reports. A
report path that completed ledger runs wrote before gets the union of their rows and this run's.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cxrbatch.dicom import is_dicom
from cxrbatch.discovery import HEATMAPS_MARKER, is_candidate, iter_images, resolved
from cxrbatch.errors import ReportError, UsageError
from cxrbatch.files import display_path, unreachable, written_at
from cxrbatch.heatmaps import add_heatmaps, is_heatmap
from cxrbatch.ledger import Ledger, key_of, ledger_files, now
from cxrbatch.ledger_forget import refuse_forgotten
from cxrbatch.ledger_run import run_with_ledger, union
from cxrbatch.models import Model, default_models_dir, load_models
from cxrbatch.pipeline import Screener
from cxrbatch.progress import Progress, progress_hook
from cxrbatch.records import Record, Summary, plural
from cxrbatch.reports import check_writable, render_csv, render_json, write_text
from cxrbatch.review import render_html

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """What `cxrbatch run` was asked to do."""

    inputs: list[Path]
    csv_out: str | None = "-"
    json_out: str | None = None
    models_dir: Path | None = None
    batch_size: int = 8
    workers: int | None = None  # screening threads (None: one per usable core); on Ray, each actor's worker threads
    decoders: int = 0  # with engine "local": processes that decode (0: the screening threads decode)
    device: str = "auto"
    draft: bool = True
    ledger: Path | None = None
    report_all: bool = False
    heatmaps: Path | None = None
    heatmaps_for: str = "all"  # or "flagged"
    html: str | None = None
    engine: str = "local"  # or "ray": decoding and both models in Ray actors (cxrbatch.ray_engine)
    ray_address: str | None = None  # with engine "ray": the cluster to join (else RAY_ADDRESS, else a local one)
    actors: int | None = None  # with engine "ray": how many (default: as many as the cluster has room for)
    gpus_per_actor: float = 0.0  # with engine "ray": above 0, the actors run the models on CUDA
    reporter: Progress | None = field(default=None, repr=False)
    # the two models, loading since before the run's modules were imported (the command line starts it)
    models_loading: Future[tuple[Model, Model]] | None = field(default=None, repr=False)


def run(options: RunOptions) -> Summary:
    """Screen every input file and write the requested reports; return the summary."""
    started, stdout = now(), sys.stdout
    report_targets = [t for t in (options.csv_out, options.json_out, options.html) if t is not None]
    # on Ray the actors choose their device; the driver's models only draw heatmaps
    device = "cpu" if options.engine == "ray" else options.device
    with _opened(options.ledger, options.inputs) as ledger:
        if ledger is not None:  # a report file whose rows a forget took away is not written again
            refuse_forgotten(ledger.db, _file_keys(report_targets))
        paths, (gate, classifier) = _inputs_and_models(options, report_targets, device)
        if options.heatmaps is not None:
            classifier.spec.require_cam()  # before screening, not after it
        with _engine(options, gate, classifier) as screener:
            report = Report(options, screener, started, stdout)
            if ledger is None:
                return _run_plain(screener, paths, report, options.reporter)
            return run_with_ledger(ledger, screener, paths, report, options)


def _inputs_and_models(
    options: RunOptions, report_targets: list[str], device: str
) -> tuple[list[Path], tuple[Model, Model]]:
    """The files to screen and the two models. The models load (mostly outside the GIL) while the
    outputs are checked and the inputs walked; an error of those still comes first, as it would
    without the overlap."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="models") as pool:
        loading = options.models_loading or pool.submit(load_models, options.models_dir or default_models_dir(), device)
        _refuse_unreachable(options, report_targets)
        _refuse_clashes(options, report_targets)
        for target in report_targets:
            check_writable(target)
        paths = _discover(options, report_targets)
        gate, classifier = loading.result()
        if options.models_loading is not None:  # loaded without a word, so that no line comes before an error's
            gate.announce()
            classifier.announce()
        return paths, (gate, classifier)


@contextmanager
def _engine(options: RunOptions, gate: Model, classifier: Model) -> Iterator[Screener]:
    """The screener of the run's engine: threads in this process, or actors on a Ray cluster."""
    if options.engine == "local":
        screener = Screener(
            gate, classifier, options.batch_size, options.workers, options.draft, decoders=options.decoders
        )
        try:
            yield screener
        finally:
            screener.close()
        return
    if options.engine != "ray":
        raise UsageError(f"unknown engine {options.engine!r}: use local or ray")
    if options.decoders:
        raise UsageError("decoding processes are for the local engine: Ray actors decode in their own processes")
    from cxrbatch import ray_engine

    with ray_engine.session(
        gate,
        classifier,
        options.batch_size,
        options.draft,
        address=options.ray_address,
        actors=options.actors,
        gpus_per_actor=options.gpus_per_actor,
        workers=options.workers,
    ) as screener:
        yield screener


@contextmanager
def _opened(path: Path | None, inputs: list[Path]) -> Iterator[Ledger | None]:
    """The locked ledger, taken before anything else is done, or None without --ledger."""
    with Ledger.open(path, inputs) if path is not None else nullcontext() as ledger:
        yield ledger


def _refuse_unreachable(options: RunOptions, report_targets: list[str]) -> None:
    """Refuse, before anything else looks at them, outputs that this user cannot look at (a folder
    on the way it may not search, a name too long): the checks after this one raised there."""
    outputs = [t for t in report_targets if t != "-"] + ([] if options.heatmaps is None else [options.heatmaps])
    for target in outputs:
        if (why := unreachable(target)) is not None:
            raise ReportError(f"Cannot write {display_path(target)}: {why}")


def _refuse_clashes(options: RunOptions, report_targets: list[str]) -> None:
    """Refuse, before screening, outputs that would destroy what the run reads or another output:
    a report written over a film (named like an image, a DICOM file, or a named input), over the
    ledger or its files, or over another report; two reports on stdout; heatmaps in a folder that
    is or holds an input, folder or film, or that already holds films of its own (its marker would
    hide the films from every later run)."""
    if report_targets.count("-") > 1:
        raise UsageError("only one report can go to stdout (-): give the others file names")
    files = [t for t in report_targets if t != "-"]
    named = {resolved(p) for p in options.inputs if not os.path.isdir(p)}  # False where it cannot look
    ledger = set() if options.ledger is None else ledger_files(options.ledger)
    for i, target in enumerate(files):
        path, real = Path(target), resolved(Path(target))
        if any(resolved(Path(other)) == real for other in files[:i]):
            raise UsageError(f"{target} is named for two reports: give each report its own file")
        if real in named or is_candidate(path.name) or is_candidate(real.name) or (path.is_file() and is_dicom(path)):
            raise UsageError(
                f"report {target} would be written over a film (or be screened as one): name it .csv, .json or .html"
            )
        if real in ledger:
            raise UsageError(f"report {target} would be written over the ledger {options.ledger} or its files")
    if options.heatmaps is None:
        return
    heatmaps = resolved(options.heatmaps)
    for given in options.inputs:
        real = resolved(given)  # a folder screened whole, or a film named in it
        if (heatmaps == real and os.path.isdir(given)) or heatmaps in real.parents:
            raise UsageError(f"--heatmaps {options.heatmaps} would hold the films of {given}: give it its own folder")
    if options.heatmaps.is_dir() and not (options.heatmaps / HEATMAPS_MARKER).exists():
        # another night's incoming folder, say: once marked, no later run would screen its films
        # (heatmaps this tool wrote are no films: a folder whose mark could not be written)
        film = next((p for p in iter_images([options.heatmaps]) if not is_heatmap(p)), None)
        if film is not None:
            raise UsageError(
                f"--heatmaps {options.heatmaps} already holds films no run drew ({film.name} among them), and a "
                "heatmaps folder is left out of every later run: give the heatmaps a folder of their own (if it "
                f"holds only heatmaps of an older cxrbatch, mark it first: touch {options.heatmaps / HEATMAPS_MARKER})"
            )


def _discover(options: RunOptions, report_targets: list[str]) -> list[Path]:
    """The files to screen; the run's own outputs are left out, skipped files counted in the log."""
    skip = [Path(t) for t in report_targets if t != "-"]
    if options.ledger is not None:
        skip.append(options.ledger)
    if options.heatmaps is not None:
        if options.heatmaps.exists() and not options.heatmaps.is_dir():
            raise UsageError(f"--heatmaps {options.heatmaps} is a file, not a folder")
        try:
            options.heatmaps.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReportError(f"Cannot make the heatmaps folder {options.heatmaps}: {exc.strerror or exc}") from None
        marker = options.heatmaps / HEATMAPS_MARKER
        try:  # no later run screens the maps as films
            if not os.path.lexists(marker):  # a link planted there is a mark: never followed, nor
                marker.touch(exist_ok=False)  # created through (O_EXCL), wherever it points
        except OSError as exc:  # a heatmap that cannot be written is a row's problem, and so is this
            log.warning(
                "cannot mark %s as a heatmaps folder (%s): a run without --heatmaps would screen its maps",
                options.heatmaps,
                exc.strerror or exc,
            )
        skip.append(options.heatmaps)
    skipped: Counter[str] = Counter()
    paths = list(iter_images(options.inputs, skip=skip, skipped=skipped))
    log.info("found %s to screen", plural(len(paths), "file"))
    if skipped:
        log.info("skipped %s", ", ".join(f"{plural(n, 'file')}: {why}" for why, n in sorted(skipped.items())))
    if not paths:
        where = ", ".join(str(p) for p in options.inputs)
        log.warning("no image file found in %s: is the folder empty, or not mounted? (exit code 5)", where)
    return paths


class Report:
    """Turns a run's rows into the requested CSV, JSON and HTML reports."""

    def __init__(self, options: RunOptions, screener: Screener, started: str, stdout: IO[str] | None = None) -> None:
        """`stdout` is where a report to `-` goes: the stream the run found when it started (the Ray
        engine sends what Ray prints there to stderr while it runs)."""
        self.options, self.screener, self.started = options, screener, started
        self.stdout = stdout
        self.labels = screener.classifier.spec.labels
        self.heatmap = options.heatmaps is not None
        self.models = {"gate": screener.gate.describe(), "classifier": screener.classifier.describe()}

    def finish_rows(self, items: Sequence[tuple[Path | None, Record]]) -> list[Record]:
        """The rows to report: with --heatmaps, each one that gets a heatmap has it (or says why not)."""
        if self.options.heatmaps is None:
            return [record for _, record in items]
        flagged_only = self.options.heatmaps_for == "flagged"
        return add_heatmaps(items, self.screener, self.options.heatmaps, flagged_only)

    def files(self) -> list[str]:
        """The ledger's keys of the report files this run writes (stdout is none)."""
        return _file_keys((self.options.csv_out, self.options.json_out, self.options.html))

    def write(self, rows: list[Record], summary: Summary, earlier: Callable[[str], list[Record]] | None = None) -> None:
        """Render and write every requested report; `earlier` gives the rows a file already received."""
        o = self.options
        for target, render in ((o.csv_out, self._csv), (o.json_out, self._json), (o.html, self._html)):
            if target is None:
                continue
            these, counts = rows, summary
            if earlier is not None and target != "-":
                these = union(earlier(_file_key(target)), rows)
                counts = summary.recount(these)
            write_text(target, render(these, counts, target), self.stdout)
            log.info("report written: %s (%s)", target, plural(len(these), "row"))

    def _csv(self, rows: list[Record], summary: Summary, target: str) -> str:
        return render_csv(rows, self.labels, self.heatmap)

    def _json(self, rows: list[Record], summary: Summary, target: str) -> str:
        engine = self.screener.describe()  # after screening: what decoded, not what was asked for
        return render_json(rows, self.labels, self.models, summary, self.started, self.heatmap, engine)

    def _html(self, rows: list[Record], summary: Summary, target: str) -> str:
        negative = self.screener.classifier.spec.negative_label or ""
        page = written_at(Path(target))  # where it lies (through a link): heatmap links are relative to it
        return render_html(rows, self.labels, negative, self.models, summary, self.started, page)


def _file_keys(targets: Iterable[str | None]) -> list[str]:
    """The ledger's keys of the report files among `targets` (stdout and unset ones are none)."""
    return [_file_key(t) for t in targets if t is not None and t != "-"]


def _file_key(target: str) -> str:
    """How the ledger names a report file: its resolved path (a symlinked folder is one file)."""
    return key_of(Path(target).resolve())


def _run_plain(screener: Screener, paths: list[Path], report: Report, reporter: Progress | None) -> Summary:
    """Screen every file and report every result."""
    started = time.perf_counter()
    items = [(r.path, screener.record(r)) for r in screener.screen(paths, progress_hook(len(paths), reporter))]
    seconds = time.perf_counter() - started
    position = {p: i for i, p in enumerate(paths)}
    items.sort(key=lambda item: position.get(item[0], len(paths)))  # input order (a Ray run's lost files came last)
    rows = report.finish_rows(items)
    summary = screener.summary(rows, found=len(paths), screened=len(items), seconds=seconds)
    report.write(rows, summary)
    return summary
