"""The files of one registry source: paths and bytes, from a local git mirror, a wheel or a folder.

Mirrors are what the `fetch` tool (or `git clone --mirror`) leaves: `MIRRORS/owner+name/` holding
a git directory (`repo/.git`, `repo`, or the folder itself). Files are read at the registry's
commit with `git cat-file`, never from a work tree, so a mirror that moved on still gives the
registered files. Git LFS pointers and submodules are not images and are left out.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from cxrbatch.databuild.registry import Source
from cxrbatch.errors import UsageError

LFS_POINTER = b"version https://git-lfs"


class SourceFiles(Protocol):
    """What the builder needs of a source."""

    def paths(self) -> list[str]:
        """Every file path of the source, sorted."""
        ...

    def read(self, path: str) -> bytes:
        """The bytes of one file."""
        ...

    def close(self) -> None:
        """Release what the reader holds."""
        ...


class GitFiles:
    """A commit of a git directory, read with one long-lived `git cat-file --batch`."""

    def __init__(self, git_dir: Path, commit: str) -> None:
        self.git_dir = git_dir
        listing = _git(git_dir, "ls-tree", "-r", "-z", "--full-tree", commit)
        self._blobs: dict[str, str] = {}
        for entry in listing.split(b"\0"):
            if not entry:
                continue
            meta, _, path = entry.partition(b"\t")
            mode, kind, sha = meta.split()
            if kind == b"blob" and mode in (b"100644", b"100755"):
                self._blobs[path.decode("utf-8", "surrogateescape")] = sha.decode()
        self._cat = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["git", f"--git-dir={self.git_dir}", "cat-file", "--batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def paths(self) -> list[str]:
        """Every regular file of the commit, sorted."""
        return sorted(self._blobs)

    def read(self, path: str) -> bytes:
        """The blob at `path`; an LFS pointer reads as OSError (the image is not in the mirror)."""
        if self._cat.poll() is not None:  # it died on an earlier, damaged object: one file lost, not the rest
            self.close()
            self._cat = self._start()
        assert self._cat.stdin is not None and self._cat.stdout is not None
        self._cat.stdin.write(self._blobs[path].encode() + b"\n")
        self._cat.stdin.flush()
        header = self._cat.stdout.readline().split()
        if len(header) != 3:
            raise OSError(f"git cat-file could not read {path}")
        data = self._cat.stdout.read(int(header[2]))
        if len(data) != int(header[2]) or self._cat.stdout.read(1) != b"\n":  # the newline after each object
            self._cat.wait()
            raise OSError(f"git cat-file could not read {path} (a damaged object in the mirror)")
        if data.startswith(LFS_POINTER):
            raise OSError("a Git LFS pointer, not the image (the mirror lacks LFS objects)")
        return data

    def close(self) -> None:
        """Stop the cat-file process, at once: a build interrupted inside `read` (Ctrl-C, SIGTERM)
        leaves it blocked writing a blob that nobody reads, and waiting on it would never end."""
        assert self._cat.stdin is not None and self._cat.stdout is not None
        self._cat.stdout.close()
        self._cat.kill()  # nothing is lost: every answer it gave has been read; a no-op once it has ended
        self._cat.wait()
        with contextlib.suppress(BrokenPipeError):  # a request written but not yet flushed when interrupted
            self._cat.stdin.close()


class WheelFiles:
    """The members of a wheel (a zip file)."""

    def __init__(self, wheel: Path) -> None:
        try:
            self._zip = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as exc:
            raise UsageError(f"The wheel {wheel} cannot be opened ({exc}): download it again") from None

    def paths(self) -> list[str]:
        """Every file member, sorted."""
        return sorted(n for n in self._zip.namelist() if not n.endswith("/"))

    def read(self, path: str) -> bytes:
        """The bytes of one member; a damaged one (bad CRC, bad compressed data) reads as OSError."""
        try:
            return self._zip.read(path)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
            raise OSError(f"damaged in the wheel: {exc}") from None

    def close(self) -> None:
        """Close the zip file."""
        self._zip.close()


class FolderFiles:
    """Files below a local folder, by relative POSIX path; hidden files are left out."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def paths(self) -> list[str]:
        """Every regular file below the folder, sorted."""
        return sorted(p.relative_to(self.root).as_posix() for p in _walk(self.root))

    def read(self, path: str) -> bytes:
        """The bytes of one file."""
        return (self.root / path).read_bytes()

    def close(self) -> None:
        """Nothing to release."""


def open_source(source: Source, mirrors: Path, base: Path) -> SourceFiles:
    """A reader for `source`: its mirror under `mirrors`, or (datasets) its folder relative to `base`."""
    if source.kind == "dataset":
        root = dataset_root(source, base)
        if not (root / "MANIFEST.csv").is_file():
            raise UsageError(f"Dataset {source.name} not found: {root} has no MANIFEST.csv")
        return FolderFiles(root)
    if source.kind == "package":
        return WheelFiles(_find_wheel(mirrors, source))
    git_dir = find_git_dir(mirrors, source.name)
    if git_dir is None:
        raise UsageError(
            f"No mirror of {source.name} under {mirrors} (expected {mirrors / source.name.replace('/', '+')}/ "
            "holding a git directory: fetch the repository first)"
        )
    try:
        _git(git_dir, "cat-file", "-e", f"{source.version}^{{commit}}")
    except UsageError:
        raise UsageError(f"The mirror of {source.name} ({git_dir}) lacks commit {source.version}") from None
    return GitFiles(git_dir, source.version)


def dataset_root(source: Source, base: Path) -> Path:
    """The folder of a `dataset` source, which the registry names relative to `base`."""
    return (base / source.name).resolve()


def find_git_dir(mirrors: Path, repo: str) -> Path | None:
    """The git directory of `repo` among the mirrors, or None."""
    base = mirrors / repo.replace("/", "+")
    for candidate in (base / "repo" / ".git", base / "repo", base / ".git", base):
        if (candidate / "HEAD").is_file() and (candidate / "objects").is_dir():
            return candidate
    return None


def _find_wheel(mirrors: Path, source: Source) -> Path:
    def normal(name: str) -> str:  # wheel file names are normalised: lower case, runs of -_. as "_"
        return re.sub(r"[-_.]+", "_", name).lower()

    found = sorted(
        p
        for p in mirrors.glob("*.whl")
        if [normal(part) for part in p.name.split("-")[:2]] == [normal(source.name), normal(source.version)]
    )
    if not found:
        raise UsageError(
            f"No wheel of {source.name}=={source.version} under {mirrors} "
            f"(pip download --no-deps {source.name}=={source.version} -d {mirrors})"
        )
    return found[0]


def _git(git_dir: Path, *args: str) -> bytes:
    done = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True)
    if done.returncode != 0:
        raise UsageError(f"git {' '.join(args)} failed in {git_dir}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def _walk(root: Path) -> Iterator[Path]:
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file():
            yield path
