"""Shared fixtures: a models folder with the tiny models, a clinic-like incoming folder, a corpus
of every kind of bad file, and (with the export extra) a gate and a classifier trained and
exported on tiny blob datasets.

The helpers they use (tiny models, generated images) live in `helpers.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    NON_UTF8,
    TINY_TRAINING,
    blob_dataset,
    bomb_png,
    colour_image,
    grey_image,
    jpeg_bytes,
    make_classifier,
    make_gate,
    png_bytes,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def tiny_models(tmp_path: Path) -> Path:
    """A models folder with the tiny gate and classifier."""
    folder = tmp_path / "models"
    folder.mkdir()
    make_gate(folder / "gate.onnx")
    make_classifier(folder / "classifier.onnx")
    return folder


@pytest.fixture
def incoming(tmp_path: Path) -> Path:
    """A folder like a clinic's: four grey 'X-rays', one colour photo, one broken file, a subfolder."""
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    grey_image(folder / "a_dark.png", 20)
    grey_image(folder / "b_mid.jpg", 110)
    grey_image(folder / "sub" / "c_light.PNG", 170)
    grey_image(folder / "sub" / "d_white.jpeg", 250)
    colour_image(folder / "e_photo.png")
    (folder / "f_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / ".hidden.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Train and export a tiny gate and classifier with the CLI (needs the export extra)."""
    pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")
    pytest.importorskip("tf2onnx", reason="the export extra (tf2onnx) is not installed")
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    runner = CliRunner()
    work = tmp_path_factory.mktemp("export")
    cxr = blob_dataset(work / "cxr", {"DARK": (False, False), "LIGHT": (True, False)})
    gate = blob_dataset(work / "gate", {"NOT_XRAY": (True, True), "XRAY": (False, False)})
    models = work / "models"
    for role, data, extra in (("gate", gate, []), ("classifier", cxr, ["--negative-label", "DARK"])):
        ckpt = work / f"{role}.keras"
        result = runner.invoke(app, ["train", role, str(data), "--out", str(ckpt), *TINY_TRAINING, *extra])
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            app, ["export", str(ckpt), "--out", str(models / f"{role}.onnx"), "--check-images", str(data / "val")]
        )
        assert result.exit_code == 0, result.output
    return {"models": models, "cxr": cxr, "gate": gate, "work": work}


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
    add("truncated.jpg", jpeg_bytes()[:300], "corrupt or truncated image")
    add("truncated.png", png_bytes()[:200], "corrupt or truncated image")
    add("random.png", np.random.default_rng(5).bytes(4096), "not a readable image (unknown or corrupt format)")
    add("page.png", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n", "a text or HTML file, not an image")
    add("notes.jpg", b"patient list follows\n", "a text or HTML file, not an image")
    add("bomb.png", bomb_png(), "image too large to decode safely")
    add("tiny.png", png_bytes(8), "too small to be a radiograph")
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
