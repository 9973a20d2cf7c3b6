"""Walking input folders: sorted, recursive, skipping what is not ours to screen."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from cxrbatch.discovery import HEATMAPS_MARKER, iter_images
from cxrbatch.errors import ImageError, UsageError
from cxrbatch.imaging import load_image


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_walks_sorted_recursive_case_insensitive(tmp_path: Path) -> None:
    for name in ["b.png", "a.JPG", "sub/c.jpeg", "sub/deeper/d.PNG", "e.txt", ".hidden.png", ".cache/f.png"]:
        _touch(tmp_path / name)
    skipped: Counter[str] = Counter()
    found = [p.relative_to(tmp_path).as_posix() for p in iter_images([tmp_path], skipped=skipped)]
    assert found == ["a.JPG", "b.png", "sub/c.jpeg", "sub/deeper/d.PNG"]
    assert skipped == {"hidden": 1, "not an image file name": 1}  # a hidden folder counts no file


def test_a_hidden_folder_alone_is_no_skipped_file(tmp_path: Path) -> None:
    _touch(tmp_path / ".cache" / "f.png")  # the log said "skipped 0 files: hidden"
    skipped: Counter[str] = Counter()
    assert list(iter_images([tmp_path], skipped=skipped)) == [] and dict(skipped) == {}


def test_explicit_files_are_kept_whatever_their_extension(tmp_path: Path) -> None:
    f = _touch(tmp_path / "scan.dat")
    assert list(iter_images([f])) == [f]


def test_missing_input_is_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Input not found"):
        list(iter_images([tmp_path / "nope"]))


def test_own_outputs_are_skipped(tmp_path: Path) -> None:
    keep = _touch(tmp_path / "x.png")
    report = _touch(tmp_path / "report.png")
    assert list(iter_images([tmp_path], skip=[report])) == [keep]


def test_symlink_loop_terminates(tmp_path: Path) -> None:
    _touch(tmp_path / "a" / "x.png")
    os.symlink(tmp_path / "a", tmp_path / "a" / "loop")
    found = list(iter_images([tmp_path]))
    assert [p.name for p in found] == ["x.png"]


def test_directory_named_like_image_is_walked_not_yielded(tmp_path: Path) -> None:
    _touch(tmp_path / "odd.png" / "inner.png")
    assert [p.name for p in iter_images([tmp_path])] == ["inner.png"]


def test_unlistable_folder_is_yielded_so_it_becomes_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tests run as root in CI, where chmod cannot lock a folder; simulate what listing it says.
    _touch(tmp_path / "a.png")
    locked = tmp_path / "locked"
    _touch(locked / "b.png")
    real_scandir, real_listdir = os.scandir, os.listdir

    def deny_scandir(path: object) -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)  # type: ignore[arg-type]

    def deny_listdir(path: object) -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied")
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", deny_scandir)
    monkeypatch.setattr(os, "listdir", deny_listdir)
    assert list(iter_images([tmp_path])) == [tmp_path / "a.png", locked]
    with pytest.raises(ImageError, match=r"folder cannot be read \(permission denied\): its files were not screened"):
        load_image(locked)


def test_folder_that_vanishes_during_the_walk_is_left_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "a.png")
    gone = tmp_path / "gone"
    _touch(gone / "b.png")
    real_scandir = os.scandir

    def vanish(path: object) -> object:
        if Path(str(path)) == gone:
            raise FileNotFoundError(2, "No such file or directory")
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", vanish)
    assert list(iter_images([tmp_path])) == [tmp_path / "a.png"]


def test_a_heatmaps_folder_is_skipped_whole_and_counts_only_its_files(tmp_path: Path) -> None:
    keep = _touch(tmp_path / "film.png")
    _touch(tmp_path / "maps" / HEATMAPS_MARKER)
    skipped: Counter[str] = Counter()
    assert list(iter_images([tmp_path], skipped=skipped)) == [keep] and dict(skipped) == {}  # empty: no "0 files"
    _touch(tmp_path / "maps" / "3f9c.png")
    (tmp_path / "maps" / "sub").mkdir()
    assert list(iter_images([tmp_path], skipped=skipped)) == [keep] and dict(skipped) == {"the run's own output": 1}


def test_a_tree_deeper_than_the_interpreters_recursion_limit_is_walked(tmp_path: Path) -> None:
    import sys

    levels = [tmp_path]
    for _ in range(sys.getrecursionlimit() + 100):  # a recursive walk ended in RecursionError
        levels.append(levels[-1] / "d")
        levels[-1].mkdir()
    (levels[-1] / "film.png").write_bytes(b"")
    (tmp_path / "top.png").write_bytes(b"")
    try:
        assert [p.name for p in iter_images([tmp_path])] == ["film.png", "top.png"]  # "d" sorts before "top.png"
    finally:  # removed here, deepest first: pytest's own clean-up of old temporary folders recurses
        (levels[-1] / "film.png").unlink()
        for level in reversed(levels[1:]):
            level.rmdir()


def test_a_file_named_and_inside_a_named_folder_is_listed_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `run in in/dup/a.png` gave two rows for one file, and counted it twice as found.
    (tmp_path / "in" / "dup").mkdir(parents=True)
    for name in ("dup/a.png", "b.png"):
        (tmp_path / "in" / name).write_bytes(b"x")
    skipped: Counter[str] = Counter()
    monkeypatch.chdir(tmp_path)
    found = list(iter_images(["in/dup/a.png", "in", "./in/b.png"], skipped=skipped))
    assert found == [Path("in/dup/a.png"), Path("in/b.png")]
    assert skipped == Counter({"found again through another input": 2})
    # `in/ext/../b.png` through a link to another folder is another file, not in/b.png
    (tmp_path / "other" / "sub").mkdir(parents=True)
    (tmp_path / "other" / "b.png").write_bytes(b"y")
    (tmp_path / "in" / "ext").symlink_to(tmp_path / "other" / "sub")
    assert list(iter_images(["in/b.png", "in/ext/../b.png"])) == [Path("in/b.png"), Path("in/ext/../b.png")]


def test_a_file_without_extension_that_cannot_be_read_is_screened_not_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A PACS export (IM0001) the run may not read was left out with only a count in the log;
    # its error row now says "permission denied", as an unreadable folder's does.
    (tmp_path / "IM0001").write_bytes(b"\0" * 128 + b"DICM")
    (tmp_path / "notes").write_bytes(b"plain text")
    (tmp_path / "sync.log").write_bytes(b"an unreadable log: no film is named so, no row every night")
    real_open = open

    def no_read(path: str, *args: object, **kwargs: object) -> object:
        if str(path).endswith(("IM0001", "sync.log")):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    for module in ("cxrbatch.discovery", "cxrbatch.dicom"):  # whichever reads the file's first bytes
        monkeypatch.setattr(f"{module}.open", no_read, raising=False)
    skipped: Counter[str] = Counter()
    assert list(iter_images([tmp_path], skipped=skipped)) == [tmp_path / "IM0001"]
    assert skipped == Counter({"not an image file name": 2})


def test_a_link_to_a_folder_this_user_may_not_reach_is_yielded_not_skipped_as_no_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A link to a folder under one this user may not search: the entry cannot say it is a folder
    # (PermissionError), and it was counted "not an image file name", its films left out, exit 0.
    # Root (CI) may search every folder: simulate what the entry says.
    _touch(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "incoming").mkdir()
    _touch(tmp_path / "incoming" / "a.png")
    (tmp_path / "incoming" / "study").symlink_to(tmp_path / "elsewhere")
    real_scandir = os.scandir

    class Unreachable:
        def __init__(self, entry: os.DirEntry[str]) -> None:
            self.name, self.path = entry.name, entry.path

        def is_dir(self) -> bool:
            raise PermissionError(13, "Permission denied")

        is_file = is_dir

    def scandir(path: object) -> object:
        return [Unreachable(e) if e.name == "study" else e for e in real_scandir(path)]  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    skipped: Counter[str] = Counter()
    found = list(iter_images([tmp_path / "incoming"], skipped=skipped))
    assert found == [tmp_path / "incoming" / "a.png", tmp_path / "incoming" / "study"] and not skipped


def test_the_index_of_a_dicom_export_is_skipped_as_no_film(tmp_path: Path) -> None:
    # every PACS export holds a DICOMDIR beside its films: a DICOM file with no picture, which made
    # an error row ("no pixel data") and exit 3 each time an export arrived
    export = tmp_path / "export"
    export.mkdir()
    for name in ("DICOMDIR", "IM0001"):
        (export / name).write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    (export / "dicomdir.dcm").write_bytes(b"\0" * 128 + b"DICM")  # not the standard's name: screened
    skipped: Counter[str] = Counter()
    assert list(iter_images([tmp_path], skipped=skipped)) == [export / "IM0001", export / "dicomdir.dcm"]
    assert skipped == Counter({"a DICOM media directory (DICOMDIR)": 1})
