"""Shared fixtures: a models folder with the tiny models, and a clinic-like incoming folder.

The helpers they use (tiny models, generated images) live in `helpers.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import colour_image, grey_image, make_classifier, make_gate

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
