"""`cxrbatch run`, `cxrbatch ledger` and `cxrbatch forget`: the nightly screening commands."""

import sys
from concurrent.futures import Future, ThreadPoolExecutor
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrbatch.cli import Device, _progress_bar, _setup_logging, app, log
from cxrbatch.errors import EXIT_FILE_ERRORS, EXIT_NO_INPUT, EXIT_OK


class Engine(str, Enum):
    """Where the files are decoded and screened."""

    local = "local"
    ray = "ray"


class HeatmapsFor(str, Enum):
    """Which classified images get a heatmap."""

    all = "all"
    flagged = "flagged"


def _input(name: str) -> Path:
    """An input as given. Not typer's Path check: it refused the whole run for one film it may not
    read (a row of its own, as in a folder), and took an empty name for the current folder."""
    if not name:
        raise typer.BadParameter("an empty name names no file or folder (an unset variable?)")
    return Path(name)


@app.command()
def run(
    inputs: Annotated[
        list[Path],
        typer.Argument(metavar="INPUT...", parser=_input, help="image files or folders (walked recursively)"),
    ],
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", metavar="PATH", help="CSV report path, or - for stdout [default: stdout]"),
    ] = None,
    json_out: Annotated[
        str | None, typer.Option("--json", metavar="PATH", help="JSON report path, or - for stdout")
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option("--models", help="folder with gate.onnx and classifier.onnx [default: the bundled models]"),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="images per inference batch")] = 8,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="threads that decode and screen batches side by side (default: one per usable core, or one"
            " per decoding process if --decoders is more; with --engine ray, each actor's worker threads, default 2)",
        ),
    ] = None,
    decoders: Annotated[
        int,
        typer.Option(
            "--decoders",
            min=0,
            help="processes that decode the files, leaving the threads only the models (for a many-core"
            " machine feeding a GPU; default 0: the threads decode)",
        ),
    ] = 0,
    device: Annotated[
        Device, typer.Option("--device", help="where the models run (auto: CUDA when onnxruntime-gpu has it)")
    ] = Device.auto,
    draft: Annotated[
        bool, typer.Option("--draft/--no-draft", help="decode JPEGs at a reduced scale (faster; see README)")
    ] = True,
    ledger: Annotated[
        Path | None, typer.Option("--ledger", help="SQLite ledger: screen only new files, report each result once")
    ] = None,
    report_all: Annotated[
        bool, typer.Option("--report-all", help="with --ledger: report every result for the inputs, delivered or not")
    ] = False,
    heatmaps: Annotated[
        Path | None, typer.Option("--heatmaps", help="folder for class-activation heatmap PNGs of classified images")
    ] = None,
    heatmaps_for: Annotated[
        HeatmapsFor | None,
        typer.Option(
            "--heatmaps-for", help="with --heatmaps: all classified images, or only flagged ones [default: all]"
        ),
    ] = None,
    html: Annotated[
        str | None, typer.Option("--html", metavar="PATH", help="self-contained review page to write, or - for stdout")
    ] = None,
    engine: Annotated[
        Engine, typer.Option("--engine", help="local: threads here; ray: actors on a Ray cluster (the ray extra)")
    ] = Engine.local,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address", metavar="ADDR", help="with --engine ray: cluster to join [default: RAY_ADDRESS or local]"
        ),
    ] = None,
    actors: Annotated[
        int | None,
        typer.Option("--actors", min=1, help="with --engine ray: actors to start [default: one per CPU or GPU share]"),
    ] = None,
    gpus_per_actor: Annotated[
        float,
        typer.Option("--gpus-per-actor", min=0.0, help="with --engine ray: GPU share per actor (above 0: CUDA)"),
    ] = 0.0,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and tracebacks")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only warnings, errors and the summary line")] = False,
) -> None:
    """Screen chest X-ray files: gate, then classify, then write the reports.

    Example: cxrbatch run ./incoming --out report.csv --json report.json

    Nightly: cxrbatch run ./incoming --ledger screening.db --out report.csv

    Review: cxrbatch run ./incoming --out report.csv --heatmaps heatmaps --html review.html

    On a Ray cluster: cxrbatch run /shared/incoming --engine ray --ray-address HEAD:6379 --out report.csv

    Exit codes: 0 all files screened; 1 fatal (models, output, device, ledger, out of memory); 2 usage;
    3 finished, but some files could not be read or some heatmaps not written (see the error cells);
    4 another run holds the ledger, nothing was done; 5 no image file in the inputs (empty or unmounted folder?).
    """
    _setup_logging(verbose, quiet)
    if report_all and ledger is None:
        raise typer.BadParameter("--report-all needs --ledger", param_hint="--report-all")
    if heatmaps_for is not None and heatmaps is None:
        raise typer.BadParameter("--heatmaps-for needs --heatmaps", param_hint="--heatmaps-for")
    _check_engine_options(engine, ray_address, actors, gpus_per_actor, device, decoders)
    # on Ray the actors choose their device; the driver's models only draw heatmaps. Not with a
    # ledger, whose lock comes first: a run that finds it held does nothing, loading included.
    loading = None if ledger else _start_loading(models, "cpu" if engine == Engine.ray else device.value)
    from cxrbatch import runner  # its imports take as long as the models take to load: side by side

    options = runner.RunOptions(
        inputs=inputs,
        csv_out="-" if out is None and json_out is None and html != "-" else out,
        json_out=json_out,
        models_dir=models,
        batch_size=batch_size,
        workers=workers,
        decoders=decoders,
        device=device.value,
        draft=draft,
        ledger=ledger,
        report_all=report_all,
        heatmaps=heatmaps,
        heatmaps_for=(heatmaps_for or HeatmapsFor.all).value,
        html=html,
        engine=engine.value,
        ray_address=ray_address,
        actors=actors,
        gpus_per_actor=gpus_per_actor,
        models_loading=loading,
    )
    with _progress_bar(enabled=not quiet and sys.stderr is not None and sys.stderr.isatty()) as reporter:
        options.reporter = reporter
        summary = runner.run(options)
    warning = summary.site_warning()
    if warning:  # a log line like any warning, before the summary line, which a script reads last
        log.warning(warning)
    typer.echo(summary.line(), err=True)
    if summary.found == 0:
        raise typer.Exit(EXIT_NO_INPUT)
    raise typer.Exit(EXIT_FILE_ERRORS if summary.failed else EXIT_OK)


def _start_loading(models: Path | None, device: str) -> Future[Any]:
    """Load the two models in a thread of their own, started before the runner's modules are
    imported: the imports hold the GIL, reading and optimising the models mostly do not. The
    run takes the result (or the error, at the point it took it before) from the future."""
    # onnxruntime is imported here, before the thread: an import holds the GIL, and imported in
    # the thread it took turns with the runner's imports, so the sessions began about 0.03 s later.
    import onnxruntime  # noqa: F401

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")

    def load() -> Any:
        from cxrbatch.models import default_models_dir, load_models

        return load_models(models or default_models_dir(), device, announce=False)  # the run says it, in turn

    try:
        return pool.submit(load)
    finally:
        pool.shutdown(wait=False)  # the thread ends when the models are loaded


def _check_engine_options(
    engine: Engine, address: str | None, actors: int | None, gpus_per_actor: float, device: Device, decoders: int
) -> None:
    if engine is Engine.ray:
        if device is Device.cuda and gpus_per_actor == 0:
            raise typer.BadParameter("with --engine ray, use --gpus-per-actor for CUDA", param_hint="--device")
        if decoders:
            raise typer.BadParameter("Ray actors decode in their own processes already", param_hint="--decoders")
        return
    given = [n for n, v in (("--ray-address", address), ("--actors", actors)) if v is not None]
    given += ["--gpus-per-actor"] if gpus_per_actor else []
    if given:
        raise typer.BadParameter(f"{', '.join(given)} needs --engine ray", param_hint=given[0])


@app.command("ledger")
def ledger_status(
    path: Annotated[Path, typer.Argument(help="the ledger file given to `run --ledger`")],
    json_out: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Show what a nightly ledger holds: counts by status and label, the last run, undelivered results.

    Safe while a run is going on (it takes no lock); a run that died is shown as interrupted.

    Example: cxrbatch ledger screening.db
    """
    import json

    from cxrbatch.ledger_schema import check_ledger_file
    from cxrbatch.ledger_view import inspect

    check_ledger_file(path)
    status = inspect(path)
    if json_out:
        typer.echo(json.dumps(status, indent=2))
        return
    typer.echo(f"{status['files']} files in the ledger; {status['undelivered']} results not yet delivered")
    if status.get("damaged_results"):
        typer.echo(
            f"{status['damaged_results']} stored results cannot be read: the next run with their settings screens "
            "their files again"
        )
    typer.echo("by status: " + ", ".join(f"{k} {v}" for k, v in status["by_status"].items()))
    typer.echo("by label: " + ", ".join(f"{k} {v}" for k, v in status["by_label"].items()))
    if status["last_run"]:
        typer.echo(_last_run_line(status["last_run"]))
    if "forgotten_before" in status:
        typer.echo(f"forgotten: what runs before {status['forgotten_before']} delivered, for films gone since")


@app.command()
def forget(
    path: Annotated[Path, typer.Argument(help="the ledger file given to `run --ledger`")],
    before: Annotated[
        str, typer.Option("--before", help="forget what runs started before this day (YYYY-MM-DD, UTC) delivered")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="count what would be forgotten; change nothing")] = False,
    compact: Annotated[
        bool, typer.Option("--compact", help="then give the freed space back to the file system (VACUUM)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print what was forgotten as JSON")] = False,
) -> None:
    """Forget a ledger's old nights: what runs before a day delivered, for films no longer in their folders.

    A film still where it was keeps its results, so it is never reported again; a forgotten film
    put back later is screened and reported as new. A report file that only those runs wrote is
    not written again. Takes the run lock: a run that starts meanwhile waits for it (10 minutes
    at most), so run it well before the night's run.

    Example: cxrbatch forget screening.db --before 2026-01-01
    """
    import json
    from datetime import date

    from cxrbatch.ledger_forget import forget as forget_before

    _setup_logging(verbose=False, quiet=False)  # an upgrade, paths it cannot look at: timestamped lines
    try:
        day = date.fromisoformat(before)
    except ValueError:
        raise typer.BadParameter(f"{before!r} is not a day: give YYYY-MM-DD", param_hint="--before") from None
    done = forget_before(path, day, dry_run=dry_run, compact=compact)
    typer.echo(json.dumps(done.as_dict(), indent=2) if json_out else "\n".join(done.lines()))


def _last_run_line(last: dict[str, Any]) -> str:
    line = f"last run #{last['id']}: {last['status']}, started {last['started']}, finished {last['finished'] or '-'}"
    if last["status"] == "done":
        return line + f", screened {last['screened']}, reused {last['reused']}, reported {last['reported']}"
    return (
        line
        + f", {last['committed']} results committed before it "
        + ("ended" if last["status"] == "interrupted" else "got here (still running)")
    )


@app.command()
def calibrate(
    labelled_dir: Annotated[
        Path,
        typer.Argument(
            help="the site's labelled films in <LABEL>/ folders named by the classifier's labels, "
            "or ABNORMAL/ for films read as abnormal with no class named",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", help="folder to write the calibrated gate.onnx and classifier.onnx")],
    target_sensitivity: Annotated[
        float, typer.Option("--target-sensitivity", min=0.5, max=0.999, help="share of abnormal films to refer")
    ] = 0.95,
    models: Annotated[
        Path | None,
        typer.Option("--models", help="folder with the models to calibrate [default: the bundled models]"),
    ] = None,
    site_head: Annotated[
        bool,
        typer.Option(
            "--site-head",
            help="also learn the referral score itself from these films (a linear head on the classifier's "
            "features): for a site whose films the bundled score ranks poorly",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="replace the models in an existing --out folder")] = False,
    device: Annotated[Device, typer.Option("--device", help="where the models run")] = Device.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logs and tracebacks")] = False,
) -> None:
    """Choose the referral threshold on a site's own labelled films and write the site's models.

    The threshold is the highest that reaches the target sensitivity on the abnormal films with
    95% confidence (an order statistic of their scores, chosen by the binomial law; at least 59
    abnormal films for 0.95). With --site-head the films first fit a site head, and the threshold
    is chosen on its out-of-fold scores. Then screen with them: cxrbatch run ./incoming --models DIR

    Example: cxrbatch calibrate site-films --target-sensitivity 0.95 --out site-models
    """
    from cxrbatch import calibration as site
    from cxrbatch.datasets import refuse_out_inside
    from cxrbatch.models import default_models_dir, load_models

    _setup_logging(verbose, quiet=False)
    gate, classifier = load_models(models or default_models_dir(), device.value)
    site.check_out(out, classifier.path.parent, force)  # before screening
    refuse_out_inside(labelled_dir, out)  # the next calibration of these films would refuse its folder
    calibration = site.calibrate(labelled_dir, gate, classifier, target_sensitivity, site_head)
    written = site.write_calibrated(gate, classifier, calibration, out, force)  # checks that it loads
    typer.echo(calibration.table())
    typer.echo(f"calibrated models written to {out} ({written.name}: referral_threshold {calibration.threshold:.6f})")
