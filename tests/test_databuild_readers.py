"""The readers of `cxrbatch data build`: a git mirror read with `git cat-file`, a wheel."""

from __future__ import annotations

import subprocess
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import entry, film, make_repo, manifest_rows, png, rule, skipped_rows

from cxrbatch.databuild.builder import build
from cxrbatch.databuild.readers import GitFiles, find_git_dir
from cxrbatch.errors import UsageError

WHEEL_SOURCE = '[[source]]\npackage = "pkg-x==1.0"\nlicence = "MIT"\n' + (
    '[[source.files]]\nglob = "pkg_x/img/*.png"\nlabel = "NORMAL"\ncollection = "w"\n'
)


def test_closing_a_git_reader_interrupted_inside_a_read_does_not_hang(tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM inside `read`, after the request: cat-file is blocked writing a blob
    larger than the pipe holds, which nobody will read; `close` must still return."""
    blob = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    commit = make_repo(tmp_path, "a/big", {"big.png": blob})
    git_dir = find_git_dir(tmp_path, "a/big")
    assert git_dir is not None
    files = GitFiles(git_dir, commit)
    cat = files._cat
    assert cat.stdin is not None and cat.stdout is not None
    cat.stdin.write(files._blobs["big.png"].encode() + b"\n")
    cat.stdin.flush()
    assert cat.stdout.readline().split()[2] == str(len(blob)).encode()  # interrupted here
    closing = threading.Thread(target=files.close, daemon=True)
    closing.start()
    closing.join(timeout=10)
    hung = closing.is_alive()
    if hung:
        cat.kill()  # let the test end
    assert not hung and cat.poll() is not None


def test_a_damaged_wheel_member_is_skipped_and_a_wheel_that_is_no_zip_is_a_usage_error(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    wheel = mirrors / "pkg_x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for i in range(3):
            archive.writestr(f"pkg_x/img/{i}.png", png(film(i)))
    data = bytearray(wheel.read_bytes())
    member = data.find(b"pkg_x/img/1.png") + len(b"pkg_x/img/1.png")
    data[data.find(b"IDAT", member) + 8] ^= 0xFF  # one byte of the second member's pixels: a bad CRC
    wheel.write_bytes(bytes(data))
    registry = tmp_path / "r.toml"
    registry.write_text(WHEEL_SOURCE)
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)
    assert sorted(r["path_in_source"] for r in manifest_rows(out)) == ["pkg_x/img/0.png", "pkg_x/img/2.png"]
    [skipped] = skipped_rows(out)
    assert skipped["path_in_source"] == "pkg_x/img/1.png"
    assert skipped["reason"].startswith("cannot read: damaged in the wheel: Bad CRC-32")
    wheel.write_bytes(b"not a zip")
    with pytest.raises(UsageError, match=r"The wheel .*pkg_x-1.0-py3-none-any.whl cannot be opened"):
        build(registry, mirrors, tmp_path / "out2", tmp_path)


def test_one_corrupt_git_object_skips_only_its_file(tmp_path: Path) -> None:
    commit = make_repo(tmp_path / "m", "o/r", {f"img/{i}.png": png(film(i)) for i in range(6)})
    repo = tmp_path / "m" / "o+r" / "repo"
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", f"{commit}:img/1.png"],
                         capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    obj = repo / ".git" / "objects" / sha[:2] / sha[2:]
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.chmod(0o644)
    obj.write_bytes(bytes(data))
    (tmp_path / "r.toml").write_text(entry("o/r", commit, rule("img/*.png", "NORMAL", "x")))
    build(tmp_path / "r.toml", tmp_path / "m", tmp_path / "out", tmp_path)
    assert [r["path_in_source"] for r in skipped_rows(tmp_path / "out")] == ["img/1.png"]
    assert len(manifest_rows(tmp_path / "out")) == 5


def test_a_wheel_member_flagged_encrypted_is_a_skipped_file(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    wheel = tmp_path / "m" / "pkg_x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(3):
            archive.writestr(f"pkg_x/img/{i}.png", png(film(i)))
    data = bytearray(wheel.read_bytes())
    central = data.find(b"PK\x01\x02", data.find(b"PK\x01\x02") + 4)  # second member's directory entry
    data[central + 8] |= 0x01  # its "encrypted" flag: one damaged bit
    wheel.write_bytes(bytes(data))
    (tmp_path / "r.toml").write_text(
        '[[source]]\npackage = "pkg-x==1.0"\nlicence = "MIT"\n'
        '[[source.files]]\nglob = "pkg_x/img/*.png"\nlabel = "NORMAL"\ncollection = "w"\n'
    )
    build(tmp_path / "r.toml", tmp_path / "m", tmp_path / "out", tmp_path)
    assert [r["path_in_source"] for r in skipped_rows(tmp_path / "out")] == ["pkg_x/img/1.png"]


def test_a_wheel_is_found_under_its_normalised_file_name(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with zipfile.ZipFile(tmp_path / "m" / "pneumonia_model-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr("pneumonia_model/img/0.png", png(film(0)))
    (tmp_path / "r.toml").write_text(
        '[[source]]\npackage = "Pneumonia.Model==1.0"\nlicence = "MIT"\n'
        '[[source.files]]\nglob = "pneumonia_model/img/*.png"\nlabel = "NORMAL"\ncollection = "w"\n'
    )
    build(tmp_path / "r.toml", tmp_path / "m", tmp_path / "out", tmp_path)
    assert len(manifest_rows(tmp_path / "out")) == 1
