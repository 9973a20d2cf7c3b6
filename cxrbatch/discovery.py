"""Find the image files to screen, in a sorted, deterministic order."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from cxrbatch.dicom import is_dicom
from cxrbatch.errors import UsageError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm"})
# Why a file in a walked folder was not screened (the keys of `iter_images(skipped=...)`).
HIDDEN, NOT_AN_IMAGE, OWN_OUTPUT = "hidden", "not an image file name", "the run's own output"
MEDIA_DIRECTORY = "a DICOM media directory (DICOMDIR)"
# PS3.10 names a DICOM export's index file DICOMDIR: a DICOM file with no picture, beside the
# films of every PACS export, that made an error row (and exit 3) each time an export arrived.
LISTED_TWICE = "found again through another input"
# Left by `run --heatmaps` in its folder: what a folder holding it has is never screened, by any run.
HEATMAPS_MARKER = ".cxrbatch-heatmaps"


def is_candidate(name: str) -> bool:
    """Tell whether a file name looks like an image to screen (hidden files are not)."""
    if name.startswith("."):
        return False
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def iter_images(
    inputs: Iterable[str | os.PathLike[str]], skip: Iterable[Path] = (), skipped: Counter[str] | None = None
) -> Iterator[Path]:
    """Yield image paths from files and folders; folders are walked recursively in sorted order.

    Explicitly named files are yielded whatever their extension. A folder that cannot be listed
    is yielded itself (its error row says why). Hidden files and folders,
    files and folders in `skip` (the run's own outputs), heatmaps folders (HEATMAPS_MARKER) and
    folders already visited are skipped,
    so a symlink loop cannot make the walk endless; a file found again (named on the command line
    and inside a folder also given) is yielded once; `skipped`, when given, counts the skipped
    files by reason. A missing input raises UsageError.
    """
    count = skipped if skipped is not None else Counter()
    listed: set[str] = set()
    folders: dict[str, str] = {}  # each folder resolved once, not once per file
    for path in _found(inputs, {resolved(p) for p in skip}, count):
        # its folder resolved, its own name kept: `a/link/../x.png` is not `a/x.png`, and a link to
        # a film under another name is a file of its own (as a folder's walk lists it)
        folder = os.path.dirname(path) or "."
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        key = os.path.join(folders[folder], os.path.basename(path))
        if key in listed:
            count[LISTED_TWICE] += 1
            continue
        listed.add(key)
        yield path


def _found(inputs: Iterable[str | os.PathLike[str]], skip_resolved: set[Path], count: Counter[str]) -> Iterator[Path]:
    seen_dirs: set[tuple[int, int]] = set()
    for raw in inputs:
        path = Path(raw)
        if os.path.isdir(path):
            yield from _walk(path, skip_resolved, seen_dirs, count)
        elif os.path.lexists(path) or _denied(path):
            if resolved(path) not in skip_resolved:
                yield path
        else:
            raise UsageError(f"Input not found: {path}")


def _denied(path: Path) -> bool:
    """Whether `path` lies under a folder this user may not search: it may be a film, so it is
    screened and its row says "permission denied", as a file it may not read (pathlib raised)."""
    try:
        os.lstat(path)
    except PermissionError:
        return True
    except OSError:
        return False
    return False


def _walk(folder: Path, skip: set[Path], seen: set[tuple[int, int]], skipped: Counter[str]) -> Iterator[Path]:
    """The files to screen under `folder`, depth first and by name. Iterative: a tree of any depth
    (a recursive walk failed past about 1,000 levels, and every night with it)."""
    stack = [_listing(folder, skip, seen, skipped)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif isinstance(entry, Path):  # a folder that cannot be listed
            yield entry
        else:
            path = Path(entry.path)
            try:
                is_dir: bool | None = entry.is_dir()
            except PermissionError:
                is_dir = None  # a link to what this user may not reach: a folder of films, maybe
            except OSError:
                is_dir = False
            if entry.name.startswith("."):
                if not is_dir:  # a hidden folder's files are not counted (nor listed)
                    skipped[HIDDEN] += 1
            elif is_dir is None:  # as a folder that cannot be listed: a row that says why (counted "not an
                yield path  # image file name", a linked folder's films were left out without a word)
            elif is_dir:
                stack.append(_listing(path, skip, seen, skipped))
            elif entry.name.upper() == "DICOMDIR":
                skipped[MEDIA_DIRECTORY] += 1
            elif not (is_candidate(entry.name) or _screen_by_content(entry)):
                skipped[NOT_AN_IMAGE] += 1
            elif resolved(path) in skip:
                skipped[OWN_OUTPUT] += 1
            else:
                yield path


def _listing(
    folder: Path, skip: set[Path], seen: set[tuple[int, int]], skipped: Counter[str]
) -> Iterator[os.DirEntry[str] | Path]:
    """A folder's entries by name, once per folder (by device and inode: a link loop ends); none
    for a heatmaps folder (its maps counted as the run's own output) or a folder to skip. A folder
    that cannot be listed (no permission) hides files that are due: it is given itself, so that it
    becomes an error row (imaging says why) and the run's exit code 3."""
    try:
        stat = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        return  # gone since its parent was listed: nothing of it to screen
    except OSError:
        if resolved(folder) not in skip:
            yield folder
        return
    key = (stat.st_dev, stat.st_ino)
    if key in seen or (skip and resolved(folder) in skip):  # resolving is a walk up the whole path
        return
    seen.add(key)
    if any(entry.name == HEATMAPS_MARKER for entry in entries):  # a heatmaps folder, written by another run
        maps = sum(not e.name.startswith(".") and _is_file(e) for e in entries)
        if maps:
            skipped[OWN_OUTPUT] += maps
        return
    yield from entries


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:
        return False


def _is_dicom_by_content(entry: os.DirEntry[str]) -> bool | None:
    """A DICOM file whatever its name says, recognised by its preamble (regular files only): PACS
    exports name files without an extension (IM000001), by their UID (1.2.840.113619.2.55.123: to
    `splitext`, an extension ".123"), or .dicom / .IMA. It costs a 132-byte read of each file in a
    walked folder that is not named like an image. None for a file that cannot be read: it may be
    such a film, so it is screened and its error row says why (it was left out without a word)."""
    if entry.name.startswith(".") or not _is_file(entry):
        return False
    try:
        with open(entry.path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return None
    return is_dicom(entry.path, head)


def _screen_by_content(entry: os.DirEntry[str]) -> bool:
    """A file not named like an image is screened when it is DICOM, or when it cannot be read and
    is named as PACS exports name DICOM files (it could be a film: its row says why it was not)."""
    kind = _is_dicom_by_content(entry)
    return bool(kind) or (kind is None and _dicom_like(entry.name))


def _dicom_like(name: str) -> bool:
    """Whether a name is one PACS exports give DICOM files (no extension, a UID's numeric last
    part, .dicom, .ima): such a file the run may not read could be a film."""
    suffix = os.path.splitext(name)[1].lower()
    return suffix in ("", ".dicom", ".ima") or suffix[1:].isdigit()


def resolved(path: Path) -> Path:
    """The path with its symbolic links followed as far as they exist (absolute where that fails)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()
