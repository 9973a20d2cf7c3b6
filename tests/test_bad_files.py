"""Every kind of file a clinic's folder can hold: each bad one is one clear error row, the run goes on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import grey_image, jpeg_bytes, png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cxrbatch import imaging
from cxrbatch.cli import app
from cxrbatch.discovery import iter_images
from cxrbatch.errors import ImageError
from cxrbatch.imaging import load_image
from cxrbatch.models import load_models
from cxrbatch.pipeline import Screener

Corpus = tuple[Path, dict[str, str]]


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


SEEDS = [jpeg_bytes(48), png_bytes(48)]


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
