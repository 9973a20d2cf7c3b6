"""Every kind of file a clinic's folder can hold: each bad one is one clear error row, the run goes on."""

from __future__ import annotations

import csv
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from cxrbatch import imaging
from cxrbatch.cli import app
from cxrbatch.discovery import iter_images
from cxrbatch.errors import ImageError
from cxrbatch.imaging import load_image
from cxrbatch.models import load_models
from cxrbatch.pipeline import Screener

NON_UTF8 = os.fsdecode(b"scan-\xff\xfe.png")
Corpus = tuple[Path, dict[str, str]]


def _jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _png_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (900 megapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A folder of good and bad files, with the status or error message each must get."""
    root = tmp_path / "corpus"
    root.mkdir()
    expect: dict[str, str] = {}

    def add(name: str, data: bytes, message: str) -> Path:
        path = root / name
        path.write_bytes(data)
        expect[name] = message
        return path

    grey_image(root / "good.png", 110)
    expect["good.png"] = "classified"
    add("zero.jpg", b"", "empty file (0 bytes)")
    add("truncated.jpg", _jpeg_bytes()[:300], "corrupt or truncated image")
    add("truncated.png", _png_bytes()[:200], "corrupt or truncated image")
    add("random.png", np.random.default_rng(5).bytes(4096), "not a readable image (unknown or corrupt format)")
    add("page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "a text or HTML file, not an image")
    add("notes.jpg", b"patient list follows\n", "a text or HTML file, not an image")
    add("bomb.png", _bomb_png(), "image too large to decode safely")
    add("tiny.png", _png_bytes(8), "too small to be a radiograph")
    os.symlink(root / "nowhere.png", root / "broken.png")
    expect["broken.png"] = "broken symbolic link"
    os.symlink(root / "loop_b.png", root / "loop_a.png")
    os.symlink(root / "loop_a.png", root / "loop_b.png")
    expect["loop_a.png"] = expect["loop_b.png"] = "symbolic link loop"
    os.mkfifo(root / "pipe.png")
    expect["pipe.png"] = "not a regular file"
    (root / "folder.png").mkdir()
    grey_image(root / "folder.png" / "inside.png", 110)
    expect["inside.png"] = "classified"
    grey_image(root / NON_UTF8, 110)
    expect["scan-\\xff\\xfe.png"] = "classified"
    deep = root
    for i in range(12):
        deep = deep / (f"{i:02d}" + "d" * 200)
    deep.mkdir(parents=True)
    grey_image(deep / ("long" * 50 + ".png"), 110)
    expect["long" * 50 + ".png"] = "classified"
    return root, expect


def _run(root: Path, models: Path, tmp_path: Path) -> tuple[int, list[dict[str, str]], dict[str, object], str]:
    out, doc = tmp_path / "report.csv", tmp_path / "report.json"
    result = CliRunner().invoke(app, ["run", str(root), "--models", str(models), "--out", str(out), "--json", str(doc)])
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    return result.exit_code, rows, json.loads(doc.read_text(encoding="utf-8")), result.stderr


def test_every_bad_file_is_one_clear_error_row(
    corpus: tuple[Path, dict[str, str]], tiny_models: Path, tmp_path: Path
) -> None:
    root, expect = corpus
    code, rows, doc, err = _run(root, tiny_models, tmp_path)
    assert code == 3
    got = {Path(r["path"]).name: r for r in rows}
    assert sorted(got) == sorted(expect)
    for name, message in expect.items():
        row = got[name]
        if message == "classified":
            assert row["status"] == "classified", (name, row["error"])
        else:
            assert row["status"] == "error", name
            assert message in row["error"], (name, row["error"])
    assert len(doc["results"]) == len(expect)  # type: ignore[arg-type]
    assert "Traceback" not in err
    errors = sum(1 for m in expect.values() if m != "classified")
    assert f"{len(expect)} files: {len(expect) - errors} classified, 0 rejected, {errors} error" in err


def test_reports_stay_valid_utf8_with_undecodable_names(corpus: Corpus, tiny_models: Path, tmp_path: Path) -> None:
    root, _ = corpus
    _run(root, tiny_models, tmp_path)
    csv_text = (tmp_path / "report.csv").read_bytes().decode("utf-8")  # raises if not valid UTF-8
    doc = json.loads((tmp_path / "report.json").read_bytes().decode("utf-8"))
    escaped = "scan-\\xff\\xfe.png"  # backslash, x, f, f: the documented escape
    assert any(line.split(",")[0].endswith(escaped) for line in csv_text.splitlines())
    assert any(r["path"].endswith(escaped) for r in doc["results"])


def test_file_deleted_after_discovery(tiny_models: Path, tmp_path: Path) -> None:
    a = grey_image(tmp_path / "a.png", 110)
    b = grey_image(tmp_path / "b.png", 110)
    paths = list(iter_images([tmp_path]))
    b.unlink()
    gate, classifier = load_models(tiny_models, "cpu")
    results = list(Screener(gate, classifier).screen(paths))
    assert [(r.path, r.status) for r in results] == [(a, "classified"), (b, "error")]
    assert results[1].error == "file vanished before it could be read"


def test_unreadable_file_is_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root in CI, where chmod cannot make a file unreadable; simulate what open() says.
    path = grey_image(tmp_path / "locked.png", 110)
    real_open = open

    def deny(file: object, *args: object, **kwargs: object) -> object:
        if file == path:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(ImageError, match="permission denied"):
        load_image(path)


SEEDS = [_jpeg_bytes(48), _png_bytes(48)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    cuts=st.lists(st.tuples(st.integers(0, 4000), st.binary(min_size=0, max_size=8)), max_size=6),
    truncate=st.integers(0, 5000),
)
def test_mutated_images_decode_or_raise_our_error(
    tmp_path_factory: pytest.TempPathFactory, seed: bytes, cuts: list[tuple[int, bytes]], truncate: int
) -> None:
    data = bytearray(seed)
    for offset, patch in cuts:
        pos = offset % max(1, len(data))
        data[pos : pos + len(patch)] = patch
    data = data[: max(1, truncate)] if truncate < len(data) else data
    path = tmp_path_factory.mktemp("fuzz") / "f.jpg"
    path.write_bytes(bytes(data))
    try:
        img = load_image(path)
    except ImageError:
        return
    assert img.mode in ("L", "RGB") and min(img.size) > 0


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=0, max_size=2048))
def test_random_bytes_decode_or_raise_our_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("rand") / "r.png"
    path.write_bytes(data)
    try:
        img = imaging.load_image(path)
    except ImageError:
        return
    assert img.mode in ("L", "RGB")
