"""Write output files atomically, with the permissions a user expects; hash a file's content;
refuse, before any work, an output path that cannot take its file.

Every report, review page and heatmap goes through a temporary file in the target's folder that
is renamed over the target, so an interrupted run never leaves a truncated file where a good one
was. `mkstemp` creates that file as 0600; before the rename it gets the mode the file already
had, or for a new file the mode the umask gives (0644 under the usual 022), so the nurse's
account or a web server can still read what the cron job wrote.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import IO, Any

from cxrbatch.crashes import crash_point
from cxrbatch.errors import ReportError, UsageError

HASH_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    """Hash a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def umask() -> int:
    """The process umask (read once: setting it is the only way to read it)."""
    current = os.umask(0o022)
    os.umask(current)
    return current


def new_file_mode() -> int:
    """The permission bits of a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def mode_for(path: Path) -> int:
    """The permission bits a write to `path` should leave: the existing file's, else a new file's."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return new_file_mode()


def atomic_write(
    path: Path,
    write: Callable[[IO[Any]], object],
    binary: bool = False,
    what: str = "report",
    through_link: bool = True,
) -> None:
    """Write through a temporary file in the same folder, then rename it over `path`.

    Any OSError (a full disk, a read-only folder) becomes a ReportError naming the file; the
    temporary file is removed and whatever was at `path` before stays as it was. Without
    `through_link`, a symbolic link at `path` is replaced itself, not the file it names.
    """
    with staged(path, write, binary, what, through_link) as commit:
        commit()


@contextmanager
def staged(
    path: Path,
    write: Callable[[IO[Any]], object],
    binary: bool = False,
    what: str = "report",
    through_link: bool = True,
) -> Iterator[Callable[[], None]]:
    """`atomic_write` in two steps, for files that must change together: the temporary file is
    written (and synced) on entry, and takes `path`'s place only when the `commit` it yields is
    called; leaving the block without it, or with an error, removes it and leaves `path` as it was."""
    planted = not through_link and path.is_symlink()  # replaced as a new file: not the mode of what it names
    path = written_at(path) if through_link else path
    # the real folder: tempfile makes `dir` absolute by dropping `link/..` as text, which names another folder
    folder = Path(os.path.realpath(path.parent if str(path.parent) else "."))
    real = folder / path.name
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise write_failed(what, path, exc) from None

    def commit() -> None:
        try:
            os.replace(tmp, real)
            _sync_folder(folder)  # the rename itself survives a power cut, not only the bytes
        except OSError as exc:
            raise write_failed(what, path, exc) from None

    try:
        try:
            fh: IO[Any] = os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="")
            with fh:
                write(fh)
                crash_point(f"writing {path.name}")  # the temporary file holds the report (crash tests only)
                fh.flush()
                os.fchmod(fh.fileno(), new_file_mode() if planted else mode_for(path))
                os.fsync(fh.fileno())
        except OSError as exc:
            raise write_failed(what, path, exc) from None
        yield commit
    finally:
        _unlink_quietly(tmp)  # gone already where it was committed


def _temp_prefix(name: str) -> str:
    """`.NAME.`, with NAME cut so that mkstemp's name (8 characters and `.tmp` more) stays within
    the usual 255-byte limit: a report may have the longest name its folder allows."""
    return "." + os.fsdecode(os.fsencode(name)[:200]) + "."


def unreachable(path: str | os.PathLike[str]) -> str | None:
    """Why `path` cannot be looked at (a folder on the way that this user may not search, a name
    too long), or None. pathlib's `exists` and `is_dir` raise there instead of answering; a path
    that is not there, or a broken or looping link, they answer for."""
    for look in (os.lstat, os.stat):
        try:
            look(path)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
                return exc.strerror or str(exc)
    return None


def display_path(path: str | os.PathLike[str]) -> str:
    """Render a path as valid UTF-8 text; undecodable bytes become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", errors="backslashreplace")


def written_at(path: Path) -> Path:
    """Where a file named `path` is written: through a symbolic link to the file it names (a
    `latest.csv` link keeps pointing at a report that is kept up to date, not replaced by a copy)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_failed(what: str, path: Path, exc: OSError) -> ReportError:
    """The error for a `what` ("report", "model") that could not be written to `path`."""
    reason = exc.strerror or str(exc)
    return ReportError(f"Cannot write {what} {path}: {reason}", reason)


def _unlink_quietly(tmp: str) -> None:
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


def check_out(out: Path, suffix: str, option: str = "--out", force: bool = True) -> None:
    """Refuse, before any work, an output path (given as `option`) that cannot take its file: a
    folder, another kind of file, a folder that cannot be made or written to, and an existing file
    unless `force` (a command that asks before replacing one passes its --force). It creates
    nothing, so a command refused later leaves nothing behind: the writer makes the folder."""
    if out.is_dir():
        raise UsageError(f"{option} {out} is a folder: name the {suffix} file to write")
    if out.suffix != suffix:
        raise UsageError(f"{option} {out} must name a {suffix} file")
    if out.exists() and not force:
        raise UsageError(f"{option} {out} exists; choose another file or pass --force to replace it")
    folder = out.parent
    there = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # the folder, or where it is made
    if not there.is_dir():
        raise UsageError(f"{option} {out}: its folder cannot be made ({there} is not a folder)")
    if not os.access(there, os.W_OK | os.X_OK):
        where = f"its folder {folder}" if there == folder else f"its folder cannot be made: {there}"
        raise UsageError(f"{option} {out}: {where} cannot be written to")
