"""The ledger's file: its tables (schema `cxrbatch.ledger/3`, described in `cxrbatch.ledger`), the
upgrades of older schemas, and opening it, to run (creating or upgrading it) or only to read.

A file whose creation never finished is created again; a file that is not a cxrbatch ledger, or
of a schema this code does not know, is refused and left untouched.
"""

from __future__ import annotations

import logging
import re
import resource
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from cxrbatch.errors import CxrBatchError, UsageError

log = logging.getLogger("cxrbatch.ledger")  # its messages are the ledger's, under the ledger's name

SCHEMA = "cxrbatch.ledger/3"
OLD_SCHEMAS = ("cxrbatch.ledger/1", "cxrbatch.ledger/2")
# Older schemas `cxrbatch ledger` reads without their upgrade: what it reads did not change since.
VIEWABLE_AS_IS = ("cxrbatch.ledger/2",)

_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL,
    ctime_ns INTEGER NOT NULL DEFAULT -1);
CREATE TABLE IF NOT EXISTS settings (fingerprint TEXT PRIMARY KEY, settings TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    sha256 TEXT NOT NULL, fingerprint TEXT NOT NULL, record TEXT NOT NULL, run INTEGER NOT NULL,
    inferences INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (sha256, fingerprint));
CREATE TABLE IF NOT EXISTS entries (
    path TEXT NOT NULL, sha256 TEXT NOT NULL, fingerprint TEXT NOT NULL, first_run INTEGER NOT NULL,
    delivered_run INTEGER, PRIMARY KEY (path, sha256, fingerprint));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, finished TEXT, status TEXT NOT NULL,
    screened INTEGER NOT NULL DEFAULT 0, reused INTEGER NOT NULL DEFAULT 0, reported INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS run_rows (
    run INTEGER NOT NULL, seq INTEGER NOT NULL, path TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (run, seq));
CREATE TABLE IF NOT EXISTS run_targets (run INTEGER NOT NULL, target TEXT NOT NULL, PRIMARY KEY (run, target));
CREATE INDEX IF NOT EXISTS entries_undelivered ON entries (delivered_run);
CREATE INDEX IF NOT EXISTS run_targets_target ON run_targets (target);
"""

# Schema 1 keyed results by the two model hashes alone ("models"); its rows stay, under keys that
# no run fingerprint matches, so nothing made with unrecorded settings is ever reused.
TABLE_NAMES = tuple(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", _TABLES))

_FROM_1 = """
ALTER TABLE results RENAME COLUMN models TO fingerprint;
ALTER TABLE entries RENAME COLUMN models TO fingerprint;
"""
# Schema 2 kept no change time: its files are hashed once more, on the first run after the upgrade.
_FROM_2 = "ALTER TABLE files ADD COLUMN ctime_ns INTEGER NOT NULL DEFAULT -1;"
_UPGRADES = {"cxrbatch.ledger/1": _FROM_1 + _FROM_2, "cxrbatch.ledger/2": _FROM_2}


class LedgerError(CxrBatchError):
    """The ledger file is not a cxrbatch ledger or cannot be used."""


def connect(path: Path, migrate: bool) -> sqlite3.Connection:
    """Open the ledger, checking a file that exists before anything is written to it. A file whose
    creation never finished (a full disk, a kill) holds nothing to keep: a run creates it again."""
    existed = path.exists() and path.stat().st_size > 0
    try:
        db = sqlite3.connect(path) if migrate else _for_reading(path)
        if existed and not _unfinished(db):
            _check_schema(db, path, migrate)
        elif not migrate:  # inspection never writes
            db.close()
            raise LedgerError(f"{path} holds no ledger yet (its creation did not finish); the next run creates it")
        else:
            db.execute("PRAGMA journal_mode=WAL")
            # one transaction: the tables and the schema row are there together, or not at all; the
            # empty tables of an unfinished creation go first (an earlier schema's have other columns)
            drop = "".join(f"DROP TABLE IF EXISTS {table};" for table in TABLE_NAMES)
            db.executescript(f"BEGIN;{drop}{_TABLES}INSERT OR REPLACE INTO meta VALUES ('schema', '{SCHEMA}');COMMIT;")
            # by its full path: a relative --ledger from another working folder makes a new ledger
            log.info("new ledger %s: every file is screened and reported", path.absolute())
        db.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.DatabaseError as exc:
        # the file system refused a write (a failing disk, ulimit -f): not the file; but a statement
        # refused on another program's file ("no such column" in a table of a ledger's name) is the file
        if isinstance(exc, sqlite3.OperationalError) and not _query_error(exc):
            raise LedgerError(f"Ledger {path} cannot be written ({exc}{file_size_limit()}); nothing was done") from None
        raise LedgerError(f"{path} is not a usable cxrbatch ledger ({exc}); it was left untouched") from None
    return db


SQLITE_ERROR = 1  # SQLite's code for an error of the statement itself, not of the file system


def _query_error(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused a statement on what the file holds, not a write to it (an I/O error,
    a full disk, a file it cannot open): by its code, or by its words where Python gives no code (3.10)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return str(exc).startswith("no such ") if code is None else code & 0xFF == SQLITE_ERROR


def check_ledger_file(path: Path) -> None:
    """Refuse, as a usage error, a ledger path that names a folder or nothing: the commands that
    read a ledger (`ledger`, `forget`) never create one."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give the ledger file (the path given to run --ledger)")
    if not path.is_file():
        raise UsageError(f"Ledger not found: {path}")


def now() -> str:
    """The current UTC time, to the second, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_size_limit() -> str:
    """What to add to a write SQLite could not make where this process has a file-size limit
    (`ulimit -f`: Python ignores SIGXFSZ, so the write fails and SQLite says 'disk I/O error')."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if soft == resource.RLIM_INFINITY:
        return ""
    return f"; this process may write files of at most {soft} bytes: ulimit -f"


def _for_reading(path: Path) -> sqlite3.Connection:
    """A connection that only reads: as a run opens the ledger where it can (SQLite then tidies its
    write-ahead files away on closing). Where this user may not write the ledger's folder (a
    monitoring account) and no run has it open, the main file is read as it lies, which holds
    everything once no write-ahead log is left beside it; with one left (a run that died), it is
    refused rather than read without the results the log holds."""
    db = sqlite3.connect(path)
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as exc:  # "attempt to write a readonly database", "unable to open"
        db.close()
        wal = path.with_name(path.name + "-wal")
        if "locked" in str(exc) or (wal.exists() and wal.stat().st_size > 0):
            raise LedgerError(
                f"{path} cannot be read by this user now ({exc}): its write-ahead log needs write access to "
                "its folder; read it as the account that runs the screening"
            ) from None
        return sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro&immutable=1", uri=True)


def _unfinished(db: sqlite3.Connection) -> bool:
    """A file with none but this ledger's tables, all of them empty, and no schema row: what an
    interrupted creation leaves (SQLite's header alone, or, from earlier versions of this code, the
    tables without the schema row). It holds nothing to lose."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables <= set(TABLE_NAMES):
        return False
    return all(db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None for table in tables)


def _check_schema(db: sqlite3.Connection, path: Path, migrate: bool) -> None:
    row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() if _has_meta(db) else None
    found = row[0] if row else None
    if found == SCHEMA or (found in VIEWABLE_AS_IS and not migrate):
        return
    if found in OLD_SCHEMAS and migrate:
        with db:  # one transaction: a failed upgrade leaves the old ledger as it was
            upgrade = _UPGRADES[found] + _TABLES + f"UPDATE meta SET value = '{SCHEMA}' WHERE key = 'schema';"
            db.executescript("BEGIN;" + upgrade)
        if found == "cxrbatch.ledger/1":
            log.warning(
                "ledger %s upgraded from %s to %s: results made before were keyed by the models alone, not by "
                "every setting, so this run screens every file again and reports each once more",
                path,
                found,
                SCHEMA,
            )
        else:
            log.info("ledger %s upgraded from %s to %s: this run hashes every file once more", path, found, SCHEMA)
        return
    db.close()
    if found in OLD_SCHEMAS:  # inspection never writes: the upgrade is the next run's
        raise LedgerError(f"{path} is a ledger of schema {found}; the next `cxrbatch run --ledger` upgrades it")
    if isinstance(found, str) and found.startswith(SCHEMA.rsplit("/", 1)[0] + "/"):  # a rollback, say
        raise LedgerError(
            f"{path} is a ledger of schema {found}, which a newer cxrbatch made; this one reads {SCHEMA} and "
            "earlier: run the newer version on it (it was left untouched)"
        )
    raise LedgerError(f"{path} is not a cxrbatch ledger (schema {found or 'missing'}); it was left untouched")


def _has_meta(db: sqlite3.Connection) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'").fetchone() is not None
