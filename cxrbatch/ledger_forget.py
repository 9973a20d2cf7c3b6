"""Forgetting a ledger's old nights (`cxrbatch forget`): a ledger keeps every film for good (about
1.5 KB a film), and a programme keeps only so many months of it.

What runs started before a date (UTC) delivered is taken out where no run can need it again:

- their delivered entries (path, content, settings), except where the path still holds that
  content, as last hashed or as its entries last had it (a film still in its folder keeps
  everything, so it is never reported again; a path this process may not look at is taken as
  still there), or where an entry of the path that stays is older (a content the path held
  after it: back at that content under its settings, the film is news again, as without a
  forget). A forgotten film put back in a folder later is screened and reported again, as new;
- the results that no entry names any more, and the file records (size, times, hash) of paths
  that are gone and have no entry left;
- the rows those runs reported (`run_rows`): a report file they wrote holds, when a later run
  writes it again, only the rows of later runs. A report file that runs before the date wrote
  and no completed run since is refused to a run while it exists (`refuse_forgotten`): written
  again, it would lose every row it has.

Kept: the runs themselves (a row a night) and which report files they wrote, every result not
yet delivered (a killed run's) with every entry of its path (which of them is news is told by
the others), and everything of later runs. The date is kept in `meta`. One
transaction, under the run lock: a forget killed part-way forgets nothing. SQLite reuses the
space it frees; `--compact` (VACUUM) gives it back to the file system.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
from dataclasses import asdict, dataclass, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any

from cxrbatch.errors import UsageError
from cxrbatch.ledger import Ledger
from cxrbatch.ledger_lock import FORGET
from cxrbatch.ledger_schema import SCHEMA, LedgerError, check_ledger_file, file_size_limit
from cxrbatch.records import plural

log = logging.getLogger("cxrbatch.ledger")

KEY = "forgotten_before"  # in `meta`: the latest date a forget was given (UTC, ISO 8601)
_OLD = "abs(e.delivered_run) IN (SELECT id FROM old_runs)"  # delivered by a forgotten run (negative: an error row)
_ESCAPE = re.compile(rb"\\x([0-9a-f]{2})")


@dataclass(frozen=True)
class Forgotten:
    """What a forget took out of a ledger (or would have, with `dry_run`)."""

    before: str  # the cut: runs started before it (UTC)
    runs: int  # runs started before the cut (kept, their rows forgotten)
    films: int  # paths those runs delivered that are no longer where they were
    kept: int  # paths those runs delivered that still hold their content: kept whole
    entries: int
    results: int
    files: int
    rows: int
    dry_run: bool
    compacted_bytes: tuple[int, int] | None = None  # the file's size before and after VACUUM

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        """The operator's summary."""
        verb = "would forget" if self.dry_run else "forgot"
        counts = ", ".join(
            f"{n} {one if n == 1 else many}"
            for n, one, many in (
                (self.entries, "entry", "entries"),
                (self.results, "result", "results"),
                (self.files, "file record", "file records"),
                (self.rows, "report row", "report rows"),
            )
        )
        out = [
            f"{plural(self.runs, 'run')} started before {self.before}: {verb} {plural(self.films, 'film')} no longer "
            f"in their folders ({counts}); kept {plural(self.kept, 'film')} still in place",
        ]
        if self.compacted_bytes is not None:
            before, after = self.compacted_bytes
            out.append(f"ledger compacted: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")
        elif not self.dry_run and self.entries + self.rows:
            out.append("the freed space is reused by later runs; --compact gives it back to the file system")
        return out


def cut_of(day: date) -> str:
    """The cut as the ledger writes times: the start of `day`, UTC."""
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc).isoformat(timespec="seconds")


def forget(path: Path, before: date, dry_run: bool = False, compact: bool = False) -> Forgotten:
    """Forget what runs started before `before` (UTC) delivered, where nothing can need it again
    (see the module's text). Takes the run lock: a run going on makes it end at once (exit 4),
    and a run that starts meanwhile waits for it (`ledger_lock.FORGET_WAIT_S`)."""
    check_ledger_file(path)
    if before > datetime.now(timezone.utc).date():
        raise UsageError(f"--before {before} is in the future: a forget takes only what runs before it delivered")
    cut = cut_of(before)
    if dry_run and (found := _schema(path)) not in (None, SCHEMA):  # opened to run, it would be upgraded
        raise UsageError(
            f"{path} is a ledger of schema {found}: a dry run changes nothing, so it does not upgrade it; the next "
            "run (or a forget without --dry-run) does (nothing was done)"
        )
    with Ledger.open(path, command=FORGET) as ledger:
        db = ledger.db
        try:
            db.execute("BEGIN IMMEDIATE")
            done = _forget(db, cut, dry_run)
            if dry_run:
                db.rollback()
            else:
                db.commit()
        except sqlite3.Error as exc:  # a full disk, a file-size limit: rolled back
            db.rollback()
            raise LedgerError(f"Ledger {path}: nothing was forgotten ({exc}{file_size_limit()})") from None
        except BaseException:
            db.rollback()
            raise
        if compact and not dry_run:
            size = os.path.getsize(path)
            try:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:  # a disk without room for the copy VACUUM makes
                raise LedgerError(
                    f"Ledger {path}: what was forgotten is committed, but it could not be compacted "
                    f"({exc}{file_size_limit()}); "
                    "VACUUM needs free space about the ledger's size"
                ) from None
            done = replace(done, compacted_bytes=(size, os.path.getsize(path)))
    return done


def _schema(path: Path) -> str | None:
    """The schema the ledger at `path` says it has, read without writing (None: none to read)."""
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
    except sqlite3.Error:
        return None  # not a ledger, or one being created: opening it says which
    return None if row is None else str(row[0])


def _forget(db: sqlite3.Connection, cut: str, dry_run: bool) -> Forgotten:
    for table in ("old_runs", "kept", "gone", "dropped", "used"):
        db.execute(f"DROP TABLE IF EXISTS temp.{table}")
    db.execute("CREATE TEMP TABLE old_runs (id INTEGER PRIMARY KEY)")
    runs = db.execute("INSERT INTO old_runs SELECT id FROM runs WHERE started < ?", (cut,)).rowcount
    db.execute("CREATE TEMP TABLE kept (path TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (path, sha256))")
    db.execute("CREATE TEMP TABLE gone (path TEXT PRIMARY KEY)")
    kept, unknown = 0, list[str]()
    found = db.execute(f"SELECT DISTINCT e.path FROM entries e WHERE {_OLD}")
    while chunk := found.fetchmany(1000):
        here = {key for (key,) in chunk if _still_there(key, unknown)}
        db.executemany("INSERT OR IGNORE INTO kept SELECT path, sha256 FROM files WHERE path = ?", [(k,) for k in here])
        # and the content its entries say it holds (the one entered last): a hashing that caught
        # the film half copied in again, or a run killed after hashing it back at an earlier
        # content, left the file record on a content the path's entries do not follow yet
        db.executemany(
            "INSERT OR IGNORE INTO kept SELECT path, sha256 FROM entries WHERE path = ? "
            "ORDER BY first_run DESC LIMIT 1",
            [(k,) for k in here],
        )
        db.executemany("INSERT INTO gone VALUES (?)", [(key,) for (key,) in chunk if key not in here])
        kept += len(here)
    if unknown:
        log.warning("cannot tell whether %d paths are still there (%s, ...): kept", len(unknown), unknown[0])
    # an entry goes unless its path still holds its content (under every setting: a run with other
    # settings must find what was delivered before, or it reports the film again), or the path has
    # a result waiting (a killed run's: which is news is told by the path's other entries), or an
    # entry that stays is older than it: it tells that entry's content left the path since (back
    # at that content under those settings, the film is news again, as without a forget)
    which = (
        f"{_OLD} AND NOT EXISTS (SELECT 1 FROM kept k WHERE k.path = e.path AND k.sha256 = e.sha256) "
        "AND NOT EXISTS (SELECT 1 FROM entries u WHERE u.path = e.path AND u.delivered_run IS NULL) "
        "AND NOT EXISTS (SELECT 1 FROM entries o WHERE o.path = e.path AND o.first_run < e.first_run "
        "AND (abs(o.delivered_run) NOT IN (SELECT id FROM old_runs) "
        "OR EXISTS (SELECT 1 FROM kept k WHERE k.path = o.path AND k.sha256 = o.sha256)))"
    )
    db.execute("CREATE TEMP TABLE dropped (sha256 TEXT, fingerprint TEXT, PRIMARY KEY (sha256, fingerprint))")
    db.execute(f"INSERT OR IGNORE INTO dropped SELECT e.sha256, e.fingerprint FROM entries e WHERE {which}")
    entries = db.execute(f"DELETE FROM entries AS e WHERE {which}").rowcount
    # a result goes with the last entry that names it (one full pass over the entries, not one a result)
    db.execute(
        "CREATE TEMP TABLE used AS SELECT DISTINCT e.sha256, e.fingerprint FROM entries e "
        "JOIN dropped d ON d.sha256 = e.sha256 AND d.fingerprint = e.fingerprint"
    )
    results = db.execute(
        "DELETE FROM results WHERE (sha256, fingerprint) IN (SELECT sha256, fingerprint FROM dropped) "
        "AND (sha256, fingerprint) NOT IN (SELECT sha256, fingerprint FROM used)"
    ).rowcount
    # the paths that are gone and keep no entry (one with a result waiting keeps its entries)
    db.execute("DELETE FROM gone WHERE EXISTS (SELECT 1 FROM entries e WHERE e.path = gone.path)")
    films = db.execute("SELECT count(*) FROM gone").fetchone()[0]
    files = db.execute("DELETE FROM files WHERE path IN (SELECT path FROM gone)").rowcount
    rows = db.execute("DELETE FROM run_rows WHERE run IN (SELECT id FROM old_runs)").rowcount
    if runs:
        db.execute(
            "INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            (KEY, cut),
        )
    return Forgotten(cut, runs, films, kept, entries, results, files, rows, dry_run)


def _still_there(key: str, unknown: list[str]) -> bool:
    """Whether the path the ledger keys `key` still names a file (or a link). A key with `\\xNN`
    escapes stands for either spelling of the name: kept where either is there (keeping is safe).
    Only a name that is not there is gone: one this process may not look at (a folder its user
    may not enter, a share that answers with an I/O error) is kept, not reported again later, and
    added to `unknown`."""
    raw = key.encode("utf-8", "surrogateescape")
    names = [raw, _ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), raw)] if b"\\x" in raw else [raw]
    for name in names:
        try:
            os.lstat(name)
            return True
        except (FileNotFoundError, NotADirectoryError, ValueError):
            continue
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:  # a spelling no file can have
                continue
            unknown.append(f"{key}: {exc.strerror or exc}")
            return True
    return False


def refuse_forgotten(db: sqlite3.Connection, targets: list[str]) -> None:
    """Refuse report files that runs before a forget's date wrote and no completed run since: their
    rows are gone from the ledger, so written again such a file would hold this run's rows alone. A
    file a completed later run wrote too (one report name for every night) holds the rows of the
    runs since and this run's; a file deleted since is written afresh."""
    cut = forgotten_before(db)
    if cut is None:
        return
    sql = (
        "SELECT EXISTS (SELECT 1 FROM run_targets t JOIN runs r ON r.id = t.run WHERE t.target = ?1 "
        "AND r.started < ?2) AND NOT EXISTS (SELECT 1 FROM run_targets t JOIN runs r ON r.id = t.run "
        "WHERE t.target = ?1 AND r.started >= ?2 AND r.status = 'done')"
    )
    for target in targets:
        (only_old,) = db.execute(sql, (target, cut)).fetchone()
        if only_old and _still_there(target, []):
            raise UsageError(
                f"report {target} was written by runs before {cut[:10]}, whose rows `cxrbatch forget` took out "
                "of the ledger, and by no completed run since: written again it would lose them. Name another "
                "report file (nothing was done)"
            )


def forgotten_before(db: sqlite3.Connection) -> str | None:
    """The cut of the latest forget given to the ledger (UTC, ISO 8601), or None if none was."""
    row = db.execute("SELECT value FROM meta WHERE key = ?", (KEY,)).fetchone()
    return None if row is None else str(row[0])
