"""The nightly ledger: what was screened, with which settings, and what was delivered in which report.

SQLite (WAL), schema `cxrbatch.ledger/3`:

- `files`: path -> size, mtime, change time (ctime), sha256 of the content (a file whose size,
  mtime and ctime are unchanged is not hashed again; no tool can put a ctime back, so content
  written with its size and mtime restored is hashed);
- `settings`: run fingerprint -> what it stands for (both models' sha256, the JPEG draft size,
  the preprocessing version, the device): every setting that can change a result;
- `results`: (sha256, fingerprint) -> the result record; one inference per content and settings;
- `entries`: (path, sha256, fingerprint) -> which run delivered it, or NULL while undelivered
  (negative: that run delivered it as an error row, and the content reads since: delivered again
  once a run finds the path still holding it);
- `runs`: one row per run; `run_rows`: the rows each completed run reported, in order, and
  `run_targets`: the report files each run wrote (recorded as it begins to write them; a union
  reads only completed runs' rows).

Delivery is exactly-once: only a completed run delivers. Its entries are marked delivered in
one transaction after its reports were renamed into place; a run that dies before that delivers
nothing, so the same command run again reports those results again, together with whatever is
new. A report path that completed runs wrote before gets the union of their rows and the new
ones, so a second run on the same day never replaces a full report with an emptier one.

One run at a time: an exclusive `flock` on `<ledger>.lock` (`cxrbatch.ledger_lock`). What the
ledger holds is read by `cxrbatch.ledger_view`, without the lock; what old nights delivered is
taken out by `cxrbatch.ledger_forget`, under it. The file itself (its tables, the upgrades of
older schemas, opening it to run or only to read) is `cxrbatch.ledger_schema`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import stat
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrbatch.files import display_path, file_sha256
from cxrbatch.ledger_lock import RUN, job_of, lock, lock_path
from cxrbatch.ledger_schema import LedgerError, connect, file_size_limit, now
from cxrbatch.records import ERROR, Record, RecordError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    """One entry of the ledger with its result: a path, its content, the settings, the record, and
    the run that made the entry (or put its path back at this content)."""

    key: str  # the absolute path as the ledger keys it
    sha256: str
    fingerprint: str
    record: Record
    first_run: int


def fingerprint(settings: dict[str, Any]) -> str:
    """The run fingerprint of a set of result-changing settings (16 hex digits)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def key_of(path: Path) -> str:
    """The ledger's key of a path: absolute and normalised (`in/../in/a.png` is `in/a.png`: one
    file, one key, whichever folder the run starts from) where the shorter spelling is the same
    file (after a symbolic link, `..` leads elsewhere: such a path keeps it), undecodable name
    bytes escaped as in the reports (\\xNN)."""
    text = os.fspath(path)  # pathlib's `absolute()` took a third of a rerun over 100,000 unchanged files
    raw = text if os.path.isabs(text) else os.path.join(os.getcwd(), text)
    short = os.path.abspath(raw)
    if short != raw and os.path.realpath(short) != os.path.realpath(raw):
        short = raw
    return display_path(short)


MIN_FREE = 1 << 20  # bytes free on the ledger's file system below which a run does not start


def _refuse_full_disk(path: Path) -> None:
    """Refuse a ledger on a file system with almost no space left: SQLite extends its shared-memory
    index (`-shm`, mapped into memory) a page at a time, and a page the disk cannot back kills the
    process with SIGBUS (exit 135, no log line) instead of an error a night's log would show."""
    try:
        st = os.statvfs(os.path.dirname(os.path.realpath(path)))  # where its files are: a link's target
    except OSError:
        return  # the folder's problem is reported where the ledger is opened
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE:
        raise LedgerError(
            f"Ledger {path}: only {free // 1024} KiB free on its file system; free some space and run again "
            "(nothing was screened)"
        )


class Ledger:
    """An open, locked ledger."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int) -> None:
        self.path, self.db, self._lock_fd = path, db, lock_fd
        self.run_id = 0
        self._hashed: dict[Path, tuple[tuple[int, ...], str]] = {}  # each file's stat when hashed, and its hash
        self._holding: dict[str, set[str]] = {}  # content -> the keys of this run's files that hold it

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    @contextmanager
    def open(cls, path: Path, inputs: Sequence[Path] = (), command: str = RUN) -> Iterator[Ledger]:
        """Lock and open (or create) the ledger at `path` for a run over `inputs` (the job: a run
        that finds it held by another job's run says so), or another `command` (a forget);
        refuse a foreign or corrupt file."""
        lock_fd = lock(path, job_of(inputs), command)
        try:
            _refuse_full_disk(path)
            db = connect(path, migrate=True)
            try:
                with db:  # whatever is still `running` died: the lock is ours
                    db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")
                yield cls(path, db, lock_fd)
            except sqlite3.Error as exc:  # a full disk, a damaged file: the operator's problem, not a traceback
                raise LedgerError(
                    f"Ledger {path} failed: {exc}{file_size_limit()}; what was committed before is kept"
                ) from None
            finally:
                db.close()
        finally:
            os.close(lock_fd)

    # -- a run -------------------------------------------------------------------------------
    def begin_run(self, settings: dict[str, Any]) -> str:
        """Record the start of this run (`open` marked runs that died as interrupted); return its fingerprint."""
        fp = fingerprint(settings)
        with self.db:
            cur = self.db.execute("INSERT INTO runs (started, status) VALUES (?, 'running')", (now(),))
            self.db.execute("INSERT OR IGNORE INTO settings VALUES (?, ?)", (fp, json.dumps(settings, sort_keys=True)))
        self.run_id = int(cur.lastrowid or 0)
        return fp

    def content_hashes(self, paths: Iterable[Path]) -> dict[Path, str | None]:
        """sha256 of each file, reusing the stored one when size, mtime and ctime are unchanged (None: unreadable)."""
        keys = {path: key_of(path) for path in paths}
        sql = "SELECT path, size, mtime_ns, ctime_ns, sha256 FROM files WHERE path IN ({keys})"
        known = {row[0]: row[1:] for row in rows_for(self.db, sql, sorted(set(keys.values())))}
        out: dict[Path, str | None] = {}
        fresh = []
        for path, key in keys.items():
            try:
                st = path.stat()
                if not stat.S_ISREG(st.st_mode):  # a pipe or a device: reading it could block the night
                    out[path] = None
                    continue
                cached = known.get(key)
                if cached and cached[:3] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
                    out[path] = cached[3]
                else:
                    out[path] = file_sha256(path)
                    fresh.append((key, st.st_size, st.st_mtime_ns, st.st_ctime_ns, out[path]))
                self._hashed[path] = (_identity(st), str(out[path]))
                self._holding.setdefault(str(out[path]), set()).add(key)
            except OSError:
                out[path] = None  # screened anyway; the decoder says what is wrong with it
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO files (path, size, mtime_ns, ctime_ns, sha256) VALUES (?, ?, ?, ?, ?)", fresh
            )
        return out

    def unchanged(self, path: Path) -> bool:
        """Whether `path` still holds the content `content_hashes` hashed: a file replaced or still
        growing between its hashing and its decoding gave a result of another content than its
        hash names, which must not be stored under it. The same file with the same size, times and
        inode is taken as unchanged; where only its metadata may have moved (a `chmod` changes the
        ctime), it is hashed again."""
        hashed = self._hashed.get(path)
        try:
            st = path.stat()
            if hashed is None or st.st_size != hashed[0][0]:
                return False
            return _identity(st) == hashed[0] or file_sha256(path) == hashed[1]
        except OSError:
            return False

    def cached(self, sha256s: Iterable[str], fp: str) -> set[str]:
        """The contents among `sha256s` that already have a result under these settings.

        A file that could not be read is never taken as screened: it is tried again on every run,
        so installing the decoder an error row asks for (pydicom, a JPEG 2000 plugin) takes effect.
        """
        sql = "SELECT sha256, record FROM results WHERE fingerprint = ? AND sha256 IN ({keys})"
        found = {sha: readable(sha, record) for sha, record in rows_for(self.db, sql, sorted(set(sha256s)), fp)}
        return {sha for sha, record in found.items() if record is not None and record.status != ERROR}

    def store(self, items: Sequence[tuple[Path, str | None, Record]], fp: str) -> None:
        """Commit a batch of fresh results and their entries in one transaction."""
        with self.db:
            for path, sha, record in items:
                if sha is None:
                    continue
                before = self.db.execute(
                    "SELECT record FROM results WHERE sha256 = ? AND fingerprint = ?", (sha, fp)
                ).fetchone()
                earlier = None if before is None else readable(sha, before[0], warn=False)
                if earlier is not None and earlier.status == ERROR and before[0] != record.to_json():
                    # a retried error that now reads (a damaged record is replaced, not): delivered again
                    # for the files that hold it now; its other paths are marked (a negative run), and
                    # a run that finds one of them still holding it delivers it then (`_entry`), never
                    # under a path that left it or is gone
                    holders = self._holding.get(sha, set())
                    self.db.executemany(
                        "UPDATE entries SET delivered_run = NULL WHERE path = ? AND sha256 = ? AND fingerprint = ?",
                        [(key, sha, fp) for key in holders],
                    )
                    self.db.execute(
                        "UPDATE entries SET delivered_run = -delivered_run WHERE sha256 = ? AND fingerprint = ? "
                        "AND delivered_run > 0",
                        (sha, fp),
                    )
                self.db.execute(
                    "INSERT INTO results (sha256, fingerprint, record, run) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (sha256, fingerprint) DO UPDATE SET inferences = inferences + 1, "
                    "record = excluded.record",
                    (sha, fp, record.to_json(), self.run_id),
                )
                self._entry(path, sha, fp)

    def note_entries(self, items: Iterable[tuple[Path, str]], fp: str) -> None:
        """Record (path, content) pairs whose result was reused, so that a new path gets reported."""
        with self.db:
            for path, sha in items:
                self._entry(path, sha, fp)

    def _entry(self, path: Path, sha: str, fp: str) -> None:
        key = key_of(path)
        # a path still holding a content it was given as an error row, which reads since: its news
        self.db.execute(
            "UPDATE entries SET delivered_run = NULL WHERE path = ? AND sha256 = ? AND fingerprint = ? "
            "AND delivered_run < 0",
            (key, sha, fp),
        )
        # a path back at a content it held before another: that content is its news again
        self.db.execute(
            "UPDATE entries SET first_run = ?, delivered_run = NULL WHERE path = ? AND sha256 = ? AND fingerprint = ? "
            "AND EXISTS (SELECT 1 FROM entries o WHERE o.path = entries.path AND o.sha256 != entries.sha256 "
            "AND o.first_run > entries.first_run)",
            (self.run_id, key, sha, fp),
        )
        self.db.execute(
            "INSERT OR IGNORE INTO entries (path, sha256, fingerprint, first_run) VALUES (?, ?, ?, ?)",
            (key, sha, fp, self.run_id),
        )

    def undelivered(self, inputs: Iterable[Path]) -> list[Stored]:
        """Every entry computed but not yet delivered in a completed report, by path, of a file named
        in `inputs` or under one of them: what a run over other folders left undelivered (a run
        stopped part-way) waits for a run over those, and never goes into this run's report."""
        roots = {key_of(p) for p in inputs}
        prefixes = tuple(root.rstrip("/") + "/" for root in roots)
        return [s for s in self._select("e.delivered_run IS NULL", ()) if s.key in roots or s.key.startswith(prefixes)]

    def for_paths(self, pairs: Iterable[tuple[Path, str]], fp: str) -> list[Stored]:
        """The stored entries of these (path, content) pairs under these settings, delivered or not."""
        wanted = {(key_of(p), s) for p, s in pairs}
        keys = sorted({key for key, _ in wanted})
        found = self._select("e.fingerprint = ? AND e.path IN ({keys})", (fp,), keys)
        return [s for s in found if (s.key, s.sha256) in wanted]

    def _select(self, where: str, args: tuple[Any, ...], keys: Sequence[str] | None = None) -> list[Stored]:
        """The entries with their results where `where` holds, by path; `keys`: the paths that
        fill its `{keys}`, looked up a chunk at a time (so in order of path within each chunk)."""
        sql = (
            "SELECT e.path, e.sha256, e.fingerprint, r.record, e.first_run FROM entries e JOIN results r "
            f"ON r.sha256 = e.sha256 AND r.fingerprint = e.fingerprint WHERE {where} "
            "ORDER BY e.path, e.first_run, e.fingerprint"
        )
        rows = self.db.execute(sql, args) if keys is None else rows_for(self.db, sql, keys, *args)
        found = [(p, sha, fp, readable(p, rec), first) for p, sha, fp, rec, first in rows]
        return [Stored(p, sha, fp, record, first) for p, sha, fp, record, first in found if record is not None]

    def delivered_to(self, target: str) -> list[Record]:
        """The rows that completed runs reported into the report file `target`, oldest run first. A
        row that cannot be read back is taken from the result that run delivered for its path, or,
        where there is none (a file that could not be hashed), left out with a warning."""
        sql = (
            "SELECT w.run, w.path, w.record FROM run_rows w JOIN run_targets t ON t.run = w.run "
            "WHERE t.target = ? ORDER BY w.run, w.seq"
        )
        rows = []
        for run, path, rec in self.db.execute(sql, (target,)).fetchall():
            record = readable(path, rec, warn=False) or self._delivered_result(run, path)
            if record is None:
                log.warning("a row of %s cannot be read back (%s): the report leaves it out", target, path)
            else:
                rows.append(record)
        return rows

    def aim(self, targets: Iterable[str]) -> None:
        """Record, before they are written, the report files this run writes: a run killed after
        writing one is still known to have written it (its rows count only once it finishes)."""
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO run_targets VALUES (?, ?)", [(self.run_id, t) for t in targets])

    def wrote(self, target: str) -> bool:
        """Whether a run of this ledger wrote (or began to write) the report file `target`."""
        return self.db.execute("SELECT 1 FROM run_targets WHERE target = ? LIMIT 1", (target,)).fetchone() is not None

    def _delivered_result(self, run: int, key: str) -> Record | None:
        """The result run `run` delivered for the path `key`, read from the results table."""
        found = self.db.execute(
            "SELECT r.record FROM entries e JOIN results r ON r.sha256 = e.sha256 AND r.fingerprint = e.fingerprint "
            "WHERE e.path = ? AND e.delivered_run = ?",
            (key, run),
        ).fetchone()
        return None if found is None else readable(key, found[0], warn=False)

    def finish(
        self, delivered: Sequence[Stored], rows: Sequence[Record], targets: Iterable[str], screened: int, reused: int
    ) -> None:
        """After the reports are in place: mark their entries delivered, keep what this run reported
        into which files, and mark the run done, in one transaction."""
        with self.db:
            self.db.executemany(
                "UPDATE entries SET delivered_run = ? WHERE path = ? AND sha256 = ? AND fingerprint = ? "
                "AND delivered_run IS NULL",
                [(self.run_id, s.key, s.sha256, s.fingerprint) for s in delivered],
            )
            self.db.executemany(
                "INSERT INTO run_rows VALUES (?, ?, ?, ?)",
                [(self.run_id, i, r.path, r.to_json()) for i, r in enumerate(rows)],
            )
            self.db.executemany("INSERT OR IGNORE INTO run_targets VALUES (?, ?)", [(self.run_id, t) for t in targets])
            self.db.execute(
                "UPDATE runs SET status = 'done', finished = ?, screened = ?, reused = ?, reported = ? WHERE id = ?",
                (now(), screened, reused, len(rows), self.run_id),
            )


CHUNK = 500  # keys per lookup: far below SQLite's limit on a statement's variables (999 before 3.32)


def rows_for(db: sqlite3.Connection, sql: str, keys: Sequence[str], *args: Any) -> Iterator[tuple[Any, ...]]:
    """The rows of `sql`, whose `{keys}` stands for a list of placeholders, for these `keys` (after
    `args`), a chunk at a time: a night's lookups cost what its own files do, not what the ledger
    has gathered over the months (every file, result and entry of every night before)."""
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        yield from db.execute(sql.replace("{keys}", ", ".join("?" * len(chunk))), (*args, *chunk))


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells a file's content changed without reading it: size, times, and which file it is."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def ledger_files(path: Path) -> set[Path]:
    """Every file the ledger at `path` is kept in, by real path: the database, SQLite's write-ahead
    log, shared memory and journal, and the run lock (nothing else may be written over them)."""
    real = Path(os.path.realpath(path))
    return {real, *(real.with_name(real.name + end) for end in ("-wal", "-shm", "-journal"))} | {lock_path(path)}


def readable(key: str, text: str, warn: bool = True) -> Record | None:
    """The stored record `text` of the path (or content) `key` read back, or None (with a warning)
    where it is damaged: its file is then screened again and its record replaced, and a damaged
    record of a file no run names is left out of the reports instead of stopping every night."""
    try:
        return Record.from_json(key, text)
    except RecordError as exc:
        if warn:
            log.warning(
                "a result in the ledger cannot be read (%s: %s): left out; its file is screened again", key, exc
            )
        return None
