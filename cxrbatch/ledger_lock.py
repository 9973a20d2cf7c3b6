"""The ledger's run lock: one run at a time, and what a run that finds it held is told.

An exclusive `flock` on `<ledger>.lock` (beside the ledger's real path, so a symbolic link to it
shares the lock), released by the OS when the holder exits or dies, so a crashed run never leaves
a lock to clean by hand. The holder writes into the lock file its pid, its start, its job (its
inputs) and its command (a run, or `cxrbatch forget`). A run that finds the lock held is busy
(exit 4, no action needed: the same job started twice), unless the holder is another job's run
(exit 1: a ledger serves one job) or has held it for longer than a night (`STUCK_AFTER_S`, exit
1: stopped or hung, and no night since screened). A run that finds a forget holding it waits for
it (`FORGET_WAIT_S`), so that forgetting old nights does not cost a night.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from cxrbatch.errors import EXIT_BUSY, CxrBatchError
from cxrbatch.ledger_schema import LedgerError, now

log = logging.getLogger("cxrbatch.ledger")

LOCK_TRIES = 10  # over about a second
RUN, FORGET = "run", "forget"  # the commands that take the lock
# How long a run waits for a forget holding the ledger (a million films took 36-42 s), a step at a time.
FORGET_WAIT_S, WAIT_STEP_S = 600.0, 1.0
# A run that has held the ledger this long has missed a night's start: never the same job started
# twice, but a run stopped (Ctrl-Z) or hung (a dead mount), which keeps every later night from screening.
STUCK_AFTER_S = 20 * 3600


class LedgerBusy(CxrBatchError):
    """Another run holds the ledger: nothing was done (that run screens its own inputs)."""

    exit_code = EXIT_BUSY


class LedgerStuck(CxrBatchError):
    """Another run has held the ledger for longer than a night: nothing was done, and a person must
    look at that run (fatal, so that monitoring alerts, where a busy ledger needs no action)."""


def lock_path(path: Path) -> Path:
    """The lock file beside the ledger, named from its real path: one ledger reached by two names
    (a symbolic link) has one lock."""
    real = Path(os.path.realpath(path))
    return real.with_name(real.name + ".lock")


def job_of(inputs: Sequence[Path]) -> list[str]:
    """A run's job, as the lock file names it: its inputs, absolute, in order. Not resolved: a run
    held by a dead mount must hold the lock, for the next night to find it stuck and say so (the
    same folder named through a link is another job's name for it)."""
    return sorted({os.path.abspath(p) for p in inputs})


def lock(path: Path, job: list[str], command: str = RUN) -> int:
    """Take the ledger's lock for a `command` (a run of `job`, or a forget), and sign it; or say
    why not (busy, another job, stuck). A run that finds a forget holding it waits for it, for
    `FORGET_WAIT_S` at most: forgetting old nights never costs a night."""
    lock_file = lock_path(path)
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"Cannot open ledger lock {lock_file}: {exc.strerror}") from None
    attempt, waited = 0, 0.0
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _sign(fd, job, command)
            return fd
        except BlockingIOError:
            attempt += 1
            if attempt < LOCK_TRIES:  # `cxrbatch ledger` may hold a shared lock for an instant
                time.sleep(0.1)
                continue
        except OSError as exc:  # ENOLCK: an NFS share without its lock service; SQLite's WAL needs a local disk too
            os.close(fd)
            raise LedgerError(
                f"Cannot lock the ledger {lock_file}: {exc.strerror or exc} (a network file system?); keep the ledger "
                "on a local disk (nothing was done)"
            ) from None
        holder = _holder(fd)
        if command != RUN or holder is None or holder.command != FORGET or waited >= FORGET_WAIT_S:
            break
        if not waited:
            log.info(
                "cxrbatch forget (pid %d, since %s) holds the ledger %s: waiting for it",
                holder.pid,
                holder.started,
                path,
            )
        time.sleep(WAIT_STEP_S)
        waited += WAIT_STEP_S
    os.close(fd)
    if holder is not None and holder.command == FORGET:
        raise LedgerBusy(
            f"cxrbatch forget (pid {holder.pid}, since {holder.started}) holds the ledger {path}"
            + (f" after {waited:.0f} s of waiting" if waited else "")
            + "; nothing was done (a run's films wait for the next run; a forget can be run again later)"
        )
    if holder is not None and holder.job and job and holder.job != job:
        raise LedgerError(
            f"Another job's run (pid {holder.pid}, since {holder.started}, screening {', '.join(holder.job)}) holds "
            f"the ledger {path}; nothing was done. A ledger serves one job: give this one ({', '.join(job)}) a "
            "ledger of its own, or name all the folders in one command"
        )
    if holder is not None and holder.age > STUCK_AFTER_S:
        pid, started, age = holder.pid, holder.started, holder.age
        raise LedgerStuck(
            f"Another cxrbatch run (pid {pid}) has held the ledger {path} for {age / 3600:.0f} hours (since "
            f"{started}): no run since could screen, and nothing was done now. If it is stuck (stopped with "
            f"Ctrl-Z, hung on a mount: `cxrbatch ledger {path}` shows whether its committed count still grows), "
            "end it; the next run delivers what it committed"
        )
    by = "" if holder is None else f" (pid {holder.pid}, since {holder.started})"
    if command == FORGET:
        raise LedgerBusy(
            f"A cxrbatch run{by} holds the ledger {path}; nothing was forgotten: run the forget again later"
        )
    raise LedgerBusy(
        f"Another cxrbatch run holds the ledger {path}{by}; nothing was done (the same job started twice needs "
        "nothing more; a ledger serves one job: give another input folder's job a ledger of its own)"
    )


def _sign(fd: int, job: list[str], command: str) -> None:
    """Write into the held lock file which process holds it, since when, for which inputs and
    which command, for a run that finds it busy; best effort (a full disk leaves it as it was)."""
    line = json.dumps({"pid": os.getpid(), "started": now(), "job": job, "command": command}) + "\n"
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line.encode("utf-8", "surrogateescape"), 0)
    except OSError:
        pass


@dataclass(frozen=True)
class _Holder:
    """The run holding a ledger, as its lock file says: pid, start (UTC), inputs, and for how many
    seconds it has held it by this clock."""

    pid: int
    started: str
    job: list[str]
    age: float
    command: str  # RUN or FORGET (RUN in the lines of versions before forget)


def _holder(fd: int) -> _Holder | None:
    """The run `_sign` named in the lock file; None where the file says nothing readable (an older
    cxrbatch's lock, a line left by a run that has ended)."""
    try:
        said = json.loads(os.pread(fd, 1 << 16, 0).decode("utf-8", "surrogateescape"))
        pid, started, job = int(said["pid"]), str(said["started"]), [str(p) for p in said["job"]]
        command = str(said.get("command", RUN))
        age = (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds()
    except (OSError, ValueError, TypeError, KeyError):  # TypeError: a start without its zone, by hand
        return None
    try:
        os.kill(pid, 0)  # no such process: the line is a finished run's, left by an older cxrbatch's holder
    except PermissionError:  # alive, under another account
        pass
    except (OSError, OverflowError):  # OverflowError: a pid no process can have, by hand
        return None
    return _Holder(pid, started, job, age, command)
