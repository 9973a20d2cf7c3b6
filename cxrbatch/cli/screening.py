"""`cxrbatch run` and `cxrbatch ledger`: the nightly screening commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.cli import Device, _progress_bar, _setup_logging, app
from cxrbatch.errors import EXIT_FILE_ERRORS, EXIT_OK, UsageError


@app.command()
def run(
    inputs: Annotated[list[Path], typer.Argument(help="image files or folders (walked recursively)")],
    out: Annotated[str | None, typer.Option("--out", "-o", help="CSV report path, or - for stdout")] = None,
    json_out: Annotated[str | None, typer.Option("--json", help="JSON report path, or - for stdout")] = None,
    models: Annotated[Path | None, typer.Option("--models", help="folder with gate.onnx and classifier.onnx")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per inference batch")] = 8,
    workers: Annotated[int, typer.Option("--workers", min=1, help="decoding threads")] = 2,
    device: Annotated[Device, typer.Option("--device", help="where the models run")] = Device.auto,
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
    if out is None and json_out is None:
        out = "-"
    if heatmaps_for not in ("all", "flagged"):
        raise typer.BadParameter("use all or flagged", param_hint="--heatmaps-for")
    if report_all and ledger is None:
        raise typer.BadParameter("--report-all needs --ledger", param_hint="--report-all")
    if True:
        options = runner.RunOptions(
            inputs=inputs,
            csv_out=out,
            json_out=json_out,
            models_dir=models,
            batch_size=batch_size,
            workers=workers,
            device=device.value,
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
        raise UsageError(f"Ledger not found: {path}")
    with Ledger.open(path) as ledger:
        status = ledger.status()
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
