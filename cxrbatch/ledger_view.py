"""The operator's view of a nightly ledger: what it holds, read without taking the run lock.

`cxrbatch ledger` uses it while a screening run may be going on. It never writes: an old ledger's
upgrade is the next run's job, and a run still marked `running` whose lock nobody holds died, so
it is shown `interrupted`, with the number of results it had committed.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cxrbatch.ledger import readable
from cxrbatch.ledger_forget import forgotten_before
from cxrbatch.ledger_lock import lock_path
from cxrbatch.ledger_schema import LedgerError, connect
from cxrbatch.records import Record

RECHECKS, RECHECK_WAIT_S = 20, 0.05  # how long the view waits for a run that took the lock to open the file


def inspect(path: Path) -> dict[str, Any]:
    """What the ledger holds, read without taking the run lock (a run may be going on).

    A run still marked `running` whose lock nobody holds died: it is shown `interrupted`.
    """
    if not path.is_file():
        raise LedgerError(f"Ledger not found: {path}")
    if path.stat().st_size == 0:
        raise LedgerError(f"{path} is empty: not a cxrbatch ledger (yet); it was left untouched")
    status = _read(path, _lock_is_held(path))
    last = status["last_run"]
    if last and last["status"] == "interrupted" and _lock_is_held(path):
        # A run took the lock between the check and the read. The run marked running is that run,
        # or one that died, which the new run marks interrupted as soon as it has opened the file:
        # read again until it has, for a second at most (a run that is that one stays running).
        for _ in range(RECHECKS):
            status = _read(path, True)
            again = status["last_run"]
            if again is None or again["id"] != last["id"] or again["status"] != "running":
                break
            time.sleep(RECHECK_WAIT_S)
    return status


def _read(path: Path, live: bool | None) -> dict[str, Any]:
    db = connect(path, migrate=False)
    try:
        db.execute("BEGIN")  # one read snapshot: the counts agree with each other
        return _status(db, live)
    except sqlite3.Error as exc:
        raise LedgerError(f"Ledger {path} cannot be read: {exc}") from None
    finally:
        db.rollback()
        db.close()


def _status(db: sqlite3.Connection, live: bool | None) -> dict[str, Any]:
    """Counts by status and label of the newest entry per path, the last run, undelivered entries."""
    files = damaged = 0
    by_status: dict[str, int] = {}
    by_label: dict[str, int] = {}
    for record in _newest(db):
        if record is None:  # a run with these settings screens its file again, replacing it
            damaged += 1
            continue
        files += 1
        by_status[record.status] = by_status.get(record.status, 0) + 1
        if record.label:
            by_label[record.label] = by_label.get(record.label, 0) + 1
    keys = ("id", "started", "finished", "status", "screened", "reused", "reported")
    row = db.execute(f"SELECT {', '.join(keys)} FROM runs ORDER BY id DESC LIMIT 1").fetchone()
    last = dict(zip(keys, row, strict=True)) if row else None
    if last and last["status"] == "running" and live is None:
        last["status"] = "running or interrupted (this user may not read the run lock)"
    elif last and last["status"] == "running" and not live:
        last["status"] = "interrupted"
    if last and last["status"] != "done":
        last["committed"] = db.execute("SELECT COUNT(*) FROM results WHERE run = ?", (last["id"],)).fetchone()[0]
    return {
        "files": files,
        "by_status": dict(sorted(by_status.items())),
        "by_label": dict(sorted(by_label.items())),
        "undelivered": db.execute("SELECT COUNT(*) FROM entries WHERE delivered_run IS NULL").fetchone()[0],
        "runs": db.execute("SELECT COUNT(*) FROM runs").fetchone()[0],
        "last_run": last,
        **({"damaged_results": damaged} if damaged else {}),  # left out above; the next run screens them again
        **_forgotten(db),
    }


def _forgotten(db: sqlite3.Connection) -> dict[str, str]:
    """The day before which `cxrbatch forget` took the ledger's delivered history out, if it did."""
    cut = forgotten_before(db)
    return {} if cut is None else {"forgotten_before": cut}


def _newest(db: sqlite3.Connection) -> Iterator[Record | None]:
    """Each path's newest result read back (None where it cannot be), one path at a time: a
    ledger of millions of films is counted without holding them all (1,000,000 took 648 MB)."""
    sql = (
        "SELECT e.path, r.record FROM entries e JOIN results r ON r.sha256 = e.sha256 "
        "AND r.fingerprint = e.fingerprint ORDER BY e.path, e.first_run"
    )
    last: tuple[str, str] | None = None
    for key, text in db.execute(sql):
        if last is not None and last[0] != key:
            yield readable(*last, warn=False)
        last = (key, text)
    if last is not None:
        yield readable(*last, warn=False)


def _lock_is_held(path: Path) -> bool | None:
    """Tell whether a run holds the ledger's lock now (a shared lock cannot be had beside it);
    None where this user may not open the lock file, so cannot tell."""
    try:
        fd = os.open(lock_path(path), os.O_RDONLY)
    except FileNotFoundError:
        return False  # no lock file: no run has ever held it
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
