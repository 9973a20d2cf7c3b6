"""The `cxrbatch` command line: a thin Typer layer over the library.

Exit codes (the same table is in the README):
  0  every file was screened (classified or rejected)
  1  fatal: models missing or invalid, output not writable, device unavailable
  2  usage: bad options, an input that does not exist
  3  the run finished but some files could not be read (error rows in the report)
  4  another run holds the ledger (--ledger); nothing was done
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.errors import CxrBatchError, UsageError

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FILE_ERRORS, EXIT_BUSY = 0, 1, 2, 3, 4

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Batch screening of chest X-rays: a gate (is it a chest X-ray?) then a 4-class classifier.",
)
log = logging.getLogger("cxrbatch")


@app.callback()
def _main() -> None:
    """Batch screening of chest X-rays: a gate (is it a chest X-ray?) then a 4-class classifier."""


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log to whatever sys.stderr is at the time of the record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self):  # type: ignore[no-untyped-def]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # type: ignore[no-untyped-def]
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _fail(exc: CxrBatchError, verbose: bool) -> typer.Exit:
    if verbose:
        log.exception("failed")
    from cxrbatch.ledger import LedgerBusy

    typer.echo(f"[error] {exc}", err=True)
    if isinstance(exc, LedgerBusy):
        return typer.Exit(EXIT_BUSY)
    return typer.Exit(EXIT_USAGE if isinstance(exc, UsageError) else EXIT_FATAL)


@contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on a terminal; None (plain log lines) under cron."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("screening", total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _export_module(name: str):  # type: ignore[no-untyped-def]
    """Import a module of the export extra, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(f"export.{name}")
    except ImportError as exc:
        typer.echo(
            f"[error] this command needs the export extra ({exc.name} is missing): pip install 'cxrbatch[export]'",
            err=True,
        )
        raise typer.Exit(EXIT_FATAL) from None


@app.command()
def train(
    role: Annotated[str, typer.Argument(help="gate or classifier")],
    data_dir: Annotated[Path, typer.Argument(help="folder with train/ val/ test/ <CLASS>/ subfolders")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint to write (.keras); a .json sidecar goes beside it")],
    base_weights: Annotated[
        Path | None, typer.Option("--base-weights", help="ImageNet MobileNetV2 no-top .weights.h5 file")
    ] = None,
    size: Annotated[int | None, typer.Option(help="input side in pixels (default: gate 112, classifier 224)")] = None,
    alpha: Annotated[float, typer.Option(help="MobileNetV2 width multiplier")] = 1.0,
    views: Annotated[int | None, typer.Option(help="augmented views cached per training image")] = None,
    epochs1: Annotated[int | None, typer.Option(help="max epochs, phase 1 (frozen base)")] = None,
    epochs2: Annotated[int | None, typer.Option(help="max epochs, phase 2 (top blocks unfrozen)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 1234,
    source_alignment: Annotated[
        float | None, typer.Option(help="classifier: weight of the per-class source alignment loss in phase 2 (0: off)")
    ] = None,
    exclude_source: Annotated[
        list[str] | None,
        typer.Option("--exclude-source", help="leave a MANIFEST.csv source out of train and val (repeatable)"),
    ] = None,
    zoom_out: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="chance that an augmented view is set in a wider frame instead of cropped "
            "(default: classifier 0.5, gate 0)",
        ),
    ] = None,
    crop_area: Annotated[
        float | None,
        typer.Option(
            min=0.1, max=1.0, help="smallest share of a film's area a random zoom-in crop keeps (default 0.7)"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the gate or the classifier (needs the export extra).

    Example: cxrbatch train classifier data/cxr --out runs/classifier.keras --base-weights mnv2_no_top.weights.h5
    """
    _setup_logging(verbose, quiet=False)
    if role not in ("gate", "classifier"):
        raise typer.BadParameter("role must be gate or classifier")
    training = _export_module("training")
    default = training.DEFAULTS[role]
    overrides = {
        "size": size,
        "views": views,
        "epochs1": epochs1,
        "epochs2": epochs2,
        "source_alignment": source_alignment,
        "exclude_sources": tuple(exclude_source) if exclude_source else None,
        "zoom_out": zoom_out,
        "crop_area": crop_area,
    }
    config = replace(default, alpha=alpha, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if base_weights is not None and not base_weights.is_file():
        raise typer.BadParameter(f"base weights not found: {base_weights}")
    summary = training.train(role, data_dir, out, base_weights, config)
    typer.echo(f"trained {role} in {summary['train_seconds']} s -> {out}", err=True)


@app.command()
def run(
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders (walked recursively)")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="CSV report path, or - for stdout")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="JSON report path, or - for stdout")] = None,
    models: Annotated[Path | None, typer.Option("--models", help="folder with gate.onnx and classifier.onnx")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per inference batch")] = 8,
    workers: Annotated[int, typer.Option("--workers", min=1, help="decoding threads")] = 2,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    draft: Annotated[bool, typer.Option("--draft/--no-draft", help="reduced-size JPEG decoding")] = True,
    ledger: Annotated[
        Path | None, typer.Option("--ledger", help="SQLite ledger: screen only new files, report each result once")
    ] = None,
    report_all: Annotated[
        bool, typer.Option("--report-all", help="with --ledger: report every result for the inputs, delivered or not")
    ] = False,
    heatmaps: Annotated[
        Path | None, typer.Option("--heatmaps", help="folder for class-activation heatmap PNGs of classified images")
    ] = None,
    heatmaps_for: Annotated[str, typer.Option("--heatmaps-for", help="all, or flagged (not NORMAL or unsure)")] = "all",
    html: Annotated[str | None, typer.Option("--html", help="self-contained review page to write")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and tracebacks")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only warnings and errors")] = False,
) -> None:
    """Screen chest X-ray files: gate, then classify, then write the reports.

    Example: cxrbatch run ./incoming --out report.csv --json report.json

    Nightly: cxrbatch run ./incoming --ledger screening.db --out report.csv

    Review: cxrbatch run ./incoming --out report.csv --heatmaps heatmaps --html review.html

    Exit codes: 0 all files screened; 1 fatal (models, output, device, ledger); 2 usage;
    3 finished, but some files could not be read (see the error rows);
    4 another run holds the ledger, nothing was done.
    """
    from cxrbatch import runner

    _setup_logging(verbose, quiet)
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter("use auto, cpu or cuda", param_hint="--device")
    if out is None and json_out is None:
        out = "-"
    if heatmaps_for not in ("all", "flagged"):
        raise typer.BadParameter("use all or flagged", param_hint="--heatmaps-for")
    if report_all and ledger is None:
        raise typer.BadParameter("--report-all needs --ledger", param_hint="--report-all")
    try:
        options = runner.RunOptions(
            inputs=inputs,
            csv_out=out,
            json_out=json_out,
            models_dir=models,
            batch_size=batch_size,
            workers=workers,
            device=device,
            draft=draft,
            ledger=ledger,
            report_all=report_all,
            heatmaps=heatmaps,
            heatmaps_for=heatmaps_for,
            html=html,
        )
        with _progress_bar(enabled=not quiet and sys.stderr.isatty()) as reporter:
            options.reporter = reporter
            summary = runner.run(options)
    except CxrBatchError as exc:
        raise _fail(exc, verbose) from None
    typer.echo(summary.line(), err=True)
    raise typer.Exit(EXIT_FILE_ERRORS if summary.by_status["error"] else EXIT_OK)


@app.command("ledger")
def ledger_status(
    path: Annotated[Path, typer.Argument(help="the ledger file given to `run --ledger`")],
    json_out: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Show what a nightly ledger holds: counts by status and label, the last run, undelivered results.

    Example: cxrbatch ledger screening.db
    """
    import json

    from cxrbatch.ledger import Ledger

    if not path.is_file():
        typer.echo(f"[error] Ledger not found: {path}", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        with Ledger.open(path) as ledger:
            status = ledger.status()
    except CxrBatchError as exc:
        raise _fail(exc, verbose=False) from None
    if json_out:
        typer.echo(json.dumps(status, indent=2))
        return
    last = status["last_run"] or {}
    typer.echo(f"{status['files']} files in the ledger; {status['undelivered']} results not yet delivered")
    typer.echo("by status: " + ", ".join(f"{k} {v}" for k, v in status["by_status"].items()))
    typer.echo("by label: " + ", ".join(f"{k} {v}" for k, v in status["by_label"].items()))
    if last:
        typer.echo(
            f"last run #{last['id']}: {last['status']}, started {last['started']}, finished {last['finished'] or '-'}, "
            f"screened {last['screened']}, reused {last['reused']}, reported {last['reported']}"
        )


@app.command()
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="labelled tree: [split/]<CLASS>/images, MANIFEST.csv optional")],
    split: Annotated[str, typer.Option(help="split folder to score (ignored if absent); all: every split")] = "test",
    source: Annotated[
        list[str] | None, typer.Option("--source", help="only images of this MANIFEST.csv source (repeatable)")
    ] = None,
    models: Annotated[Path | None, typer.Option("--models", help="folder with gate.onnx and classifier.onnx")] = None,
    frame: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=2.0,
            help="stress test: each film centred in a frame this many times its size "
            "(above 1: black border around it; below 1: cut to its centre; 1: as it is)",
        ),
    ] = 1.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full metrics as JSON")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure the shipped models on labelled images: accuracy, macro-F1, per class and per source.

    Example: cxrbatch evaluate data/cxr --split test --json metrics.json
    """
    import json

    from cxrbatch import evaluation
    from cxrbatch.models import default_models_dir, load_models
    from cxrbatch.pipeline import Screener
    from cxrbatch.reports import write_text

    _setup_logging(verbose, quiet=False)
    try:
        transform = evaluation.Framed(frame) if frame != 1.0 else None
        gate, classifier = load_models(models or default_models_dir(), device)
        screener = Screener(gate, classifier, transform=transform)
        report = evaluation.evaluate(data_dir, split, gate, classifier, screener, tuple(source or ()))
        if json_out is not None:
            write_text(json_out, json.dumps(report, indent=2) + "\n")
    except CxrBatchError as exc:
        raise _fail(exc, verbose) from None
    typer.echo(evaluation.format_report(report))


@app.command("export")
def export_cmd(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint made by `cxrbatch train` (.keras with .json sidecar)")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write, e.g. models/classifier.onnx")],
    check_images: Annotated[
        Path | None, typer.Option("--check-images", help="folder of real images for the parity check")
    ] = None,
    version: Annotated[str, typer.Option(help="model version recorded in the metadata")] = "1.0.0",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Convert a trained checkpoint to ONNX with metadata, then check it against Keras (needs the export extra).

    Example: cxrbatch export runs/classifier.keras --out models/classifier.onnx --check-images samples
    """
    _setup_logging(verbose, quiet=False)
    onnx_export = _export_module("onnx_export")
    folder = check_images or Path(__file__).resolve().parent.parent / "samples"
    images = onnx_export.pick_check_images(folder) if folder.is_dir() else []
    try:
        result = onnx_export.export(ckpt, out, images, version=version)
    except onnx_export.ExportError as exc:
        typer.echo(f"[error] export check failed: {exc}", err=True)
        raise typer.Exit(EXIT_FATAL) from None
    parity = result["parity"]
    typer.echo(
        f"exported {out}: max |keras - onnx| {parity['max_abs_diff']:.2e} on {parity['images']} images", err=True
    )


def main() -> None:
    """Entry point of the console script."""
    app()


if __name__ == "__main__":
    main()
