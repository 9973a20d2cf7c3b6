"""The exceptions the library raises; their messages tell the operator what to do.

Each class carries the exit code `cxrbatch` ends with when it reaches the command line (the
table in the README): the CLI turns any `CxrBatchError` into `[error] <message>` and that code.
"""

from collections.abc import Sequence

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_FILE_ERRORS, EXIT_BUSY, EXIT_NO_INPUT = 0, 1, 2, 3, 4, 5


def first_few(items: Sequence[str], n: int, sep: str) -> str:
    """How a refusal names what it refuses: the first `n` items joined by `sep`, and how many more."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return sep.join(items[:n]) + more


class CxrBatchError(Exception):
    """Base class for every error cxrbatch reports to the operator: fatal unless a subclass says otherwise."""

    exit_code = EXIT_FATAL


class ModelError(CxrBatchError):
    """A model file is missing, unreadable or carries incomplete metadata."""


class ImageError(CxrBatchError):
    """One input file cannot be read as an image; the run goes on without it."""


class UsageError(CxrBatchError):
    """The command was given inputs or options that cannot work."""

    exit_code = EXIT_USAGE


class DeviceError(CxrBatchError):
    """The requested execution device is not available."""


class ReportError(CxrBatchError):
    """A report, review page or heatmap cannot be written; `reason` is what the system said."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class OutOfMemory(CxrBatchError):
    """The process ran out of memory while screening (`ulimit -v`, a container's limit): what the
    run was doing, and what to change. A film that alone cannot be decoded is an error row instead."""

    def __init__(self, detail: str, command: str = "run") -> None:
        if command == "run":
            advice = "lower --batch-size or --workers, or raise"
            kept = "; results committed to a ledger are kept"
        else:  # training, evaluation and the other commands: nothing of theirs was kept
            advice, kept = "raise", ""
        super().__init__(
            f"Out of memory {'while screening' if command == 'run' else f'in cxrbatch {command}'} ({detail}): "
            f"{advice} the process's memory limit (ulimit -v, the container's){kept}"
        )


class ExtraMissing(CxrBatchError):
    """A command needs an optional extra (export, dicom, ray) that is not installed."""


class EngineError(CxrBatchError):
    """The Ray cluster cannot be reached, lacks what the run asks of it, or failed the run."""


class ExportError(CxrBatchError):
    """Training or export failed one of its own checks, or was given data it cannot use."""
