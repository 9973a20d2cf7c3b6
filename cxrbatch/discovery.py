"""Find the image files to screen, in a sorted, deterministic order."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cxrbatch.dicom import is_dicom
from cxrbatch.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm"})


def is_candidate(name: str) -> bool:
    """Tell whether a file name looks like an image to screen (hidden files are not)."""
    if name.startswith("."):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def iter_images(inputs: Iterable[str | os.PathLike[str]], skip: Iterable[Path] = ()) -> Iterator[Path]:
    """Yield image paths from files and folders; folders are walked recursively in sorted order.

    Explicitly named files are yielded whatever their extension. Hidden files and folders,
    files and folders in `skip` (the run's own outputs) and folders already visited are skipped,
    so a symlink loop cannot make the walk endless. A missing input raises UsageError.
    """
    skip_resolved = {_resolved(p) for p in skip}
    seen_dirs: set[tuple[int, int]] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            yield from _walk(path, skip_resolved, seen_dirs)
        elif path.exists() or path.is_symlink():
            if _resolved(path) not in skip_resolved:
                yield path
        else:
            raise UsageError(f"Input not found: {path}")


def _walk(folder: Path, skip: set[Path], seen: set[tuple[int, int]]) -> Iterator[Path]:
    try:
        stat = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return  # an unreadable folder yields nothing; its files cannot be named in a report
    key = (stat.st_dev, stat.st_ino)
    if key in seen or _resolved(folder) in skip:
        return
    seen.add(key)
    for entry in entries:
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(path, skip, seen)
        elif (is_candidate(entry.name) or _is_bare_dicom(entry)) and _resolved(path) not in skip:
            yield path


def _is_bare_dicom(entry: os.DirEntry[str]) -> bool:
    """A DICOM file without an extension, recognised by its preamble (regular files only)."""
    if entry.name.startswith(".") or os.path.splitext(entry.name)[1]:
        return False
    try:
        return entry.is_file() and is_dicom(entry.path)
    except OSError:
        return False


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()
