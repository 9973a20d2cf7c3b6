"""The `cxrbatch` command line: a thin Typer layer over the library.

Every command is one call into the library. A `CxrBatchError` that reaches the command line is
turned, in one place (`_Commands.invoke`), into one log line and the exit code the error class
carries (`cxrbatch.errors`; the same table is in the README):

  0  every file was screened (classified or rejected)
  1  fatal: models missing or invalid, output not writable, device unavailable, not a ledger
  2  usage: bad options, an input that does not exist, an output refused before screening
  3  the run finished but some files could not be screened or some heatmaps written (error cells)
  4  another run holds the ledger (--ledger); nothing was done
  5  the inputs hold no image file at all (an empty or unmounted folder?); empty reports written
  143  stopped by SIGTERM (cron's `timeout`); 129 by SIGHUP (a closed terminal), unless started with nohup

The command modules write their annotations unquoted (no `from __future__ import annotations`):
Typer reads every command's annotations when a command starts, and evaluating them from strings
was about 0.015 s of each run.
"""

import atexit
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import typer
from typer.core import TyperGroup

from cxrbatch import __version__
from cxrbatch.errors import EXIT_BUSY, CxrBatchError, OutOfMemory
from cxrbatch.logs import LineFormatter

log = logging.getLogger("cxrbatch")


class Device(str, Enum):
    """Where the models run."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class _Commands(TyperGroup):
    """The one place where an operator-facing error becomes a log line and an exit code."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            try:
                return super().invoke(ctx)
            except MemoryError as exc:  # numpy's or Python's allocation under `ulimit -v`: a line, not a traceback
                raise OutOfMemory(str(exc) or "an allocation failed", ctx.invoked_subcommand or "run") from exc
        except CxrBatchError as exc:
            _logging_on()
            log.debug("traceback of the failure", exc_info=True)  # shown with --verbose only
            # A busy ledger needs no action: the run that holds it does the work.
            log.log(logging.INFO if exc.exit_code == EXIT_BUSY else logging.ERROR, "%s", exc)
            raise typer.Exit(exc.exit_code) from None
        except (typer.Exit, typer.Abort, typer.TyperException):
            raise  # an exit code, Ctrl-C, a usage error (Typer 0.28 carries click's within, not click itself)
        except Exception as exc:  # a fault of cxrbatch itself: a line a cron log shows, then its traceback
            _logging_on()
            log.error(
                "unexpected failure (%s: %s): a fault of cxrbatch, not of a film; what a ledger run committed is "
                "kept. Please report it with the traceback that follows",
                type(exc).__name__,
                exc,
            )
            raise


app = typer.Typer(
    cls=_Commands,
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="Batch screening of chest X-rays: a gate (is it a chest X-ray?) then a 4-class classifier.",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"cxrbatch {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(
        False, "--version", callback=_show_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
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
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _logging_on() -> None:
    """Log lines as a command's, for a failure or a stop that came before its command set them up."""
    if not any(isinstance(h, _StderrHandler) for h in logging.getLogger().handlers):
        _setup_logging(verbose=False, quiet=False)


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


def main() -> None:
    """Entry point of the console script (and of `python -m cxrbatch.cli`)."""
    signal.signal(signal.SIGTERM, _terminated)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:  # started with nohup: the hangup is not heard
        signal.signal(signal.SIGHUP, _terminated)  # the terminal or ssh session that started it closed
    try:
        app()
    except SystemExit as done:
        _say_if_stopped(done.code)
        _end_without_teardown(done.code)
        raise


_STOPPED_BY = {
    128 + signal.SIGTERM: "SIGTERM",
    128 + signal.SIGINT: "SIGINT",  # Typer turns Ctrl-C into 130
    128 + signal.SIGHUP: "SIGHUP",
}


def _say_if_stopped(code: object) -> None:
    """End the log of a command stopped by a signal with a line that says so: its last line was
    the last progress line, as if the command were still going."""
    if isinstance(code, int) and code in _STOPPED_BY:
        _logging_on()
        log.error("stopped by %s (exit %d): what it had not yet written is not written", _STOPPED_BY[code], code)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM (what cron's `timeout` sends) or SIGHUP (a closed terminal) ends the command as an
    exception would, with the shell's code for it (143, 129): temporary report files are removed
    and a Ray session or decoding processes are stopped on the way out. Python's default was to
    die at once and leave them."""
    raise SystemExit(128 + signum)


def _end_without_teardown(code: object) -> None:
    """End the process now that the command is done, skipping the interpreter's teardown.

    The teardown frees every module and both ONNX sessions object by object: about 0.04 s of a
    one-film run's 0.43 s then (benchmarks/README.md, *Start-up*), for memory the system takes back
    at once anyway. What a normal exit does that matters still happens here: the exit handlers
    run (logging's flush and multiprocessing's clean-up among them) and stdout and stderr are
    flushed. Anything out of the ordinary takes the normal exit instead: a thread still running
    (it is waited for), a profiler or tracer (cProfile, coverage, a debugger: they write their
    results after the program), an exit message rather than a code, or output that cannot be
    flushed (a closed pipe or stream).
    """
    if not (code is None or isinstance(code, int)) or _observed():
        return
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive() for t in threading.enumerate()):
        return
    try:
        _flush()
        atexit._run_exitfuncs()  # runs each handler once: the normal exit finds none left
        _flush()
    except (OSError, ValueError):
        return
    os._exit(code or 0)


def _observed() -> bool:
    """Whether a profiler, tracer or debugger watches this process. From Python 3.12 cProfile
    (and coverage's `sysmon` core) register with `sys.monitoring`, which `sys.getprofile()` and
    `sys.gettrace()` do not show."""
    if sys.getprofile() or sys.gettrace():
        return True
    monitoring = getattr(sys, "monitoring", None)  # Python 3.12 and later
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:  # None where the descriptor was closed (`2>&-`)
            stream.flush()


# The commands register themselves on `app` when their modules are imported.
from cxrbatch.cli import data, derive, lungs, modelling, screening  # noqa: E402, F401
