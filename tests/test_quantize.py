"""The int8 copy (`cxrbatch quantize`): calibrated on real images, same interface and metadata."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("onnx", reason="quantisation needs onnx (export extra)")

import onnx

from cxrbatch.cli import app
from cxrbatch.models import METADATA_KEY, load_models

runner = CliRunner()


def test_int8_copy_keeps_interface_and_metadata(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    int8 = tmp_path / "int8"
    src, dst = tiny_models / "classifier.onnx", int8 / "classifier.onnx"
    result = runner.invoke(app, ["quantize", str(src), str(dst), "--calibration", str(incoming), "--images", "6"])
    assert result.exit_code == 0, result.output
    assert "calibration image skipped" in result.stderr and "f_broken.jpg" in result.stderr
    meta = json.loads({p.key: p.value for p in onnx.load(str(dst)).metadata_props}[METADATA_KEY])
    assert meta["precision"] == "int8" and meta["role"] == "classifier"
    shutil.copy(tiny_models / "gate.onnx", int8 / "gate.onnx")
    _, full = load_models(tiny_models, "cpu")
    _, quantized = load_models(int8, "cpu")
    assert quantized.spec == full.spec
    batch = np.stack([np.full((32, 32, 1), v, dtype=np.float32) for v in (10, 90, 170, 250)])
    assert quantized.run(batch)["scores"].argmax(1).tolist() == full.run(batch)["scores"].argmax(1).tolist()


def test_quantize_refuses_missing_inputs(tiny_models: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["quantize", str(tmp_path / "no.onnx"), str(tmp_path / "q.onnx"), "--calibration", "."])
    assert result.exit_code == 2 and "[error] Model not found:" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["quantize", str(tiny_models / "gate.onnx"), str(tmp_path / "q.onnx"), "--calibration", str(empty)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "[error] No calibration images under" in result.stderr
