"""The float16 copy (`cxrbatch half`): a copy that the runtime loads and feeds exactly like the float32 model."""

from __future__ import annotations

import errno
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxconverter_common", reason="float16 conversion needs the export extra")

import onnx
from typer.testing import CliRunner

from cxrbatch import files
from cxrbatch.cli import app
from cxrbatch.extras import export_module
from cxrbatch.models import METADATA_KEY, embed_metadata, load_models, read_metadata

halve = export_module("half").halve


def test_half_copy_keeps_interface_metadata_and_outputs(tiny_models: Path, tmp_path: Path) -> None:
    half_dir = tmp_path / "fp16"
    for name in ("gate.onnx", "classifier.onnx"):
        halve(tiny_models / name, half_dir / name)
    model = onnx.load(str(half_dir / "classifier.onnx"))
    assert {i.type.tensor_type.elem_type for i in model.graph.input} == {onnx.TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in model.graph.output} == {onnx.TensorProto.FLOAT}
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}
    meta = json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])
    assert meta["precision"] == "float16" and meta["role"] == "classifier"

    full_gate, full_clf = load_models(tiny_models, "cpu")
    half_gate, half_clf = load_models(half_dir, "cpu")
    assert half_gate.spec == full_gate.spec  # the classifier's referral threshold was chosen on float32 scores:
    assert half_clf.spec == replace(full_clf.spec, referral_threshold=None)  # the copy is calibrated anew
    batch = np.stack([np.full((32, 32, 1), v, dtype=np.float32) for v in (10, 90, 170, 250)])
    full, half = full_clf.run(batch, with_cam=True), half_clf.run(batch, with_cam=True)
    assert full["scores"].argmax(1).tolist() == [0, 1, 2, 3]  # the outputs vary, so the comparison means something
    np.testing.assert_allclose(half["scores"], full["scores"], atol=2e-3)
    np.testing.assert_allclose(half["cam"], full["cam"], rtol=2e-3, atol=2e-3)
    assert half["scores"].dtype == np.float32


def test_half_copy_keeps_the_familiarity_output_in_float32(tiny_models: Path, tmp_path: Path) -> None:
    from helpers import halves_models

    models, half_dir = halves_models(tmp_path, tiny_models / "gate.onnx"), tmp_path / "fp16"
    halve(models / "classifier.onnx", half_dir / "classifier.onnx")
    halve(models / "gate.onnx", half_dir / "gate.onnx")
    model = onnx.load(str(half_dir / "classifier.onnx"))
    assert [o.name for o in model.graph.output] == ["scores", "cam", "familiarity"]
    assert {t.data_type for t in model.graph.initializer if t.name == "familiarity_bank"} == {onnx.TensorProto.FLOAT16}
    _, full = load_models(models, "cpu")
    _, half = load_models(half_dir, "cpu")
    films = [(100, 100), (220, 215), (200, 20), (20, 200)]  # flat films are familiar, split ones are not
    batch = np.stack([np.concatenate([np.full((16, 32, 1), t), np.full((16, 32, 1), b)]) for t, b in films])
    full_out, half_out = full.run(batch.astype(np.float32)), half.run(batch.astype(np.float32))
    threshold = full.spec.familiarity_threshold
    assert (full_out["familiarity"][:, 0] > threshold).tolist() == [False, False, True, True]
    np.testing.assert_allclose(half_out["familiarity"], full_out["familiarity"], atol=1e-3)
    assert (half_out["familiarity"][:, 0] > threshold).tolist() == [False, False, True, True]


def test_a_copy_the_disk_cannot_take_is_an_error_line_and_leaves_nothing(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    out = tmp_path / "fp16"
    out.mkdir()
    result = CliRunner().invoke(app, ["half", str(tiny_models / "classifier.onnx"), str(out / "classifier.onnx")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"[error] Cannot write model {out / 'classifier.onnx'}: No space left on device" in result.stderr
    assert list(out.iterdir()) == []  # no truncated model, no temporary file


def test_an_existing_dst_is_replaced_only_with_force(tiny_models: Path) -> None:
    src, gate = tiny_models / "classifier.onnx", tiny_models / "gate.onnx"
    before = gate.read_bytes()
    result = CliRunner().invoke(app, ["half", str(src), str(gate)])  # a slip that would replace the gate
    assert result.exit_code == 2
    assert f"[error] DST {gate} exists; choose another file or pass --force to replace it" in result.stderr
    assert gate.read_bytes() == before
    result = CliRunner().invoke(app, ["half", str(src), str(gate), "--force"])
    assert result.exit_code == 0, result.output
    meta = json.loads({p.key: p.value for p in onnx.load(str(gate)).metadata_props}[METADATA_KEY])
    assert meta["precision"] == "float16" and meta["role"] == "classifier"


def test_a_calibrated_classifiers_copy_drops_the_threshold_chosen_on_float32_scores(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tiny_models / "classifier.onnx"
    proto, meta = onnx.load(str(src)), read_metadata(src)
    meta["calibration"] = {"threshold": 0.5, "target_sensitivity": 0.95, "source_sha256": "0" * 64}
    embed_metadata(proto, meta)  # as `cxrbatch calibrate` writes it, beside referral_threshold 0.5
    onnx.save(proto, str(src))
    with caplog.at_level(logging.WARNING):
        halve(src, tmp_path / "classifier.onnx")
    copied = read_metadata(tmp_path / "classifier.onnx")
    assert "referral_threshold" not in copied and "calibration" not in copied and copied["precision"] == "float16"
    assert f"{src}'s referral threshold was chosen on its float32 scores, which the float16 copy moves" in caplog.text
    assert "choose its own with `cxrbatch calibrate`" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        halve(tiny_models / "gate.onnx", tmp_path / "gate.onnx")  # nothing chosen on scores: nothing said
    assert "referral threshold" not in caplog.text
