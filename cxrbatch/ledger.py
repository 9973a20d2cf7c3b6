"""The nightly ledger: what was screened, with which models, and what was delivered in a report.

SQLite (WAL) with three tables:

- `files`: path -> size, mtime, sha256 of the content (a file whose size and mtime are unchanged
  is not hashed again);
- `results`: (sha256, models) -> the result record; one inference per content and model pair;
- `entries`: (path, sha256, models) -> which run delivered it, or NULL while undelivered.

Delivery is exactly-once: only a completed run delivers. Its entries are marked delivered in
one transaction after its reports were renamed into place; a run that dies before that delivers
nothing, so the same command run again reports those results again (into the same report path,
replacing the dead run's file), together with whatever is new.

One run at a time: an exclusive `flock` on `<ledger>.lock`, released by the OS when the holder
exits or dies, so a crashed run never leaves a lock to clean by hand.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cxrbatch.errors import EXIT_BUSY, CxrBatchError
from cxrbatch.imaging import display_path

SCHEMA = "cxrbatch.ledger/1"
HASH_CHUNK = 1 << 20

_TABLES = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL);
CREATE TABLE results (
    sha256 TEXT NOT NULL, models TEXT NOT NULL, record TEXT NOT NULL, run INTEGER NOT NULL,
    inferences INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (sha256, models));
CREATE TABLE entries (
    path TEXT NOT NULL, sha256 TEXT NOT NULL, models TEXT NOT NULL, first_run INTEGER NOT NULL,
    delivered_run INTEGER, PRIMARY KEY (path, sha256, models));
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, finished TEXT, status TEXT NOT NULL,
    screened INTEGER NOT NULL DEFAULT 0, reused INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0);
CREATE INDEX entries_undelivered ON entries (delivered_run);
"""


class LedgerBusy(CxrBatchError):
    """Another run holds the ledger: nothing to do, that run does the work."""

    exit_code = EXIT_BUSY


class LedgerError(CxrBatchError):
    """The ledger file is not a cxrbatch ledger or cannot be used."""


def crash_point(name: str) -> None:
    """Die here, as `kill -9` would, when CXRBATCH_CRASH_AT names this point (crash tests only)."""
    if os.environ.get("CXRBATCH_CRASH_AT") == name:
        os.kill(os.getpid(), 9)


def file_sha256(path: Path) -> str:
    """Hash a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Ledger:
    """An open, locked ledger."""

    def __init__(self, path: Path, db: sqlite3.Connection, lock_fd: int) -> None:
        self.path, self.db, self._lock_fd = path, db, lock_fd
        self.run_id = 0

    # -- opening -----------------------------------------------------------------------------
    @classmethod
    @contextmanager
    def open(cls, path: Path) -> Iterator[Ledger]:
        """Lock and open (or create) the ledger at `path`; refuse a foreign or corrupt file."""
        lock_fd = _lock(path)
        try:
            db = _connect(path)
            try:
                yield cls(path, db, lock_fd)
            finally:
                db.close()
        finally:
            os.close(lock_fd)

    # -- a run -------------------------------------------------------------------------------
    def begin_run(self) -> int:
        """Mark runs that died as interrupted, then record the start of this one."""
        self._recover()
        with self.db:
            cur = self.db.execute("INSERT INTO runs (started, status) VALUES (?, 'running')", (now(),))
        self.run_id = int(cur.lastrowid or 0)
        return self.run_id

    def content_hashes(self, paths: Iterable[Path]) -> dict[Path, str | None]:
        """sha256 of each file, reusing the stored one when size and mtime are unchanged (None: unreadable)."""
        known = {row[0]: row[1:] for row in self.db.execute("SELECT path, size, mtime_ns, sha256 FROM files")}
        out: dict[Path, str | None] = {}
        fresh = []
        for path in paths:
            key = _key(path)
            try:
                st = path.stat()
                cached = known.get(key)
                if cached and cached[0] == st.st_size and cached[1] == st.st_mtime_ns:
                    out[path] = cached[2]
                    continue
                out[path] = file_sha256(path)
                fresh.append((key, st.st_size, st.st_mtime_ns, out[path]))
            except OSError:
                out[path] = None  # screened anyway; the decoder says what is wrong with it
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)", fresh)
        return out

    def cached(self, sha256s: Iterable[str], models: str) -> dict[str, dict[str, Any]]:
        """Stored result records for these contents under these models."""
        wanted = set(sha256s)
        rows = self.db.execute("SELECT sha256, record FROM results WHERE models = ?", (models,))
        return {sha: json.loads(record) for sha, record in rows if sha in wanted}

    def store(self, items: list[tuple[Path, str | None, dict[str, Any]]], models: str) -> None:
        """Commit a batch of fresh results and their entries in one transaction."""
        with self.db:
            for path, sha, record in items:
                if sha is None:
                    continue
                self.db.execute(
                    "INSERT INTO results (sha256, models, record, run) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (sha256, models) DO UPDATE SET inferences = inferences + 1, record = excluded.record",
                    (sha, models, json.dumps(_strip(record), sort_keys=True), self.run_id),
                )
                self._entry(path, sha, models)

    def note_entries(self, items: Iterable[tuple[Path, str]], models: str) -> None:
        """Record (path, content) pairs whose result was reused, so that a new path gets reported."""
        with self.db:
            for path, sha in items:
                self._entry(path, sha, models)

    def _entry(self, path: Path, sha: str, models: str) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO entries (path, sha256, models, first_run) VALUES (?, ?, ?, ?)",
            (_key(path), sha, models, self.run_id),
        )

    def undelivered(self) -> list[tuple[str, dict[str, Any]]]:
        """Every (path, record) computed but not yet delivered in a completed report, by path."""
        return self._select("e.delivered_run IS NULL", ())

    def for_paths(self, pairs: Iterable[tuple[Path, str]], models: str) -> list[tuple[str, dict[str, Any]]]:
        """The stored records of these (path, content) pairs, delivered or not (--report-all)."""
        wanted = {(_key(p), s) for p, s in pairs}
        rows = self._select("e.models = ?", (models,))
        return [(path, rec) for path, rec in rows if (path, rec["_sha256"]) in wanted]

    def _select(self, where: str, args: tuple[Any, ...]) -> list[tuple[str, dict[str, Any]]]:
        sql = (
            "SELECT e.path, e.sha256, r.record FROM entries e JOIN results r "
            f"ON r.sha256 = e.sha256 AND r.models = e.models WHERE {where} ORDER BY e.path, e.first_run, e.models"
        )
        return [(path, {**json.loads(rec), "_sha256": sha}) for path, sha, rec in self.db.execute(sql, args)]

    def finish(self, delivered: list[str], screened: int, reused: int) -> None:
        """After the reports are in place: mark their entries delivered and the run done, atomically."""
        with self.db:
            self.db.executemany(
                "UPDATE entries SET delivered_run = ? WHERE path = ? AND delivered_run IS NULL",
                [(self.run_id, p) for p in delivered],
            )
            self.db.execute(
                "UPDATE runs SET status = 'done', finished = ?, screened = ?, reused = ?, reported = ? WHERE id = ?",
                (now(), screened, reused, len(delivered), self.run_id),
            )

    def _recover(self) -> None:
        """Runs that died delivered nothing: mark them interrupted."""
        with self.db:
            self.db.execute("UPDATE runs SET status = 'interrupted' WHERE status = 'running'")

    # -- the operator's view ---------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counts by status and label of the newest entry per path, the last run, undelivered entries."""
        latest: dict[str, dict[str, Any]] = {}
        for path, rec in self._select("1 = 1", ()):
            latest[path] = rec
        by_status: dict[str, int] = {}
        by_label: dict[str, int] = {}
        for rec in latest.values():
            by_status[rec["status"]] = by_status.get(rec["status"], 0) + 1
            if rec.get("label"):
                by_label[rec["label"]] = by_label.get(rec["label"], 0) + 1
        last = self.db.execute(
            "SELECT id, started, finished, status, screened, reused, reported FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        keys = ("id", "started", "finished", "status", "screened", "reused", "reported")
        return {
            "files": len(latest),
            "by_status": dict(sorted(by_status.items())),
            "by_label": dict(sorted(by_label.items())),
            "undelivered": self.db.execute("SELECT COUNT(*) FROM entries WHERE delivered_run IS NULL").fetchone()[0],
            "runs": self.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0],
            "last_run": dict(zip(keys, last, strict=True)) if last else None,
        }


def _strip(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "path" and not k.startswith("_")}


def _key(path: Path) -> str:
    # SQLite stores UTF-8 text: undecodable name bytes are escaped as in the reports (\xNN).
    return display_path(path.absolute())


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LedgerError(f"Cannot open ledger lock {lock_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LedgerBusy(f"Another cxrbatch run holds the ledger {path}; try again when it has finished") from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    """Open the ledger, checking a file that exists before anything is written to it."""
    existed = path.exists() and path.stat().st_size > 0
    try:
        db = sqlite3.connect(path)
        if existed:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if not row or row[0] != SCHEMA:
                db.close()
                found = row[0] if row else "missing"
                raise LedgerError(f"{path} is not a cxrbatch ledger (schema {found}); it was left untouched")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        if not existed:
            with db:
                db.executescript(_TABLES)
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA,))
    except sqlite3.DatabaseError as exc:
        raise LedgerError(f"{path} is not a usable cxrbatch ledger ({exc}); it was left untouched") from None
    return db
