"""Export end to end: a tiny trained gate and classifier become ONNX models the runtime loads,
with the metadata written by `ModelSpec.to_metadata` and a parity check that fails loudly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")
pytest.importorskip("tf2onnx", reason="the export extra (tf2onnx) is not installed")

from cxrbatch.cli import app
from cxrbatch.errors import ExportError, UsageError
from cxrbatch.extras import export_module
from cxrbatch.models import load_models, read_metadata
from cxrbatch.modelspec import ModelSpec

pytestmark = pytest.mark.export
runner = CliRunner()
onnx_export = export_module("onnx_export")


def test_metadata_round_trip(exported: dict[str, Path]) -> None:
    meta = read_metadata(exported["models"] / "classifier.onnx")
    assert meta["schema"] == "cxrbatch.model/1" and meta["role"] == "classifier"
    assert meta["labels"] == ["DARK", "LIGHT"]
    assert meta["input"]["channels"] == 1 and meta["input"]["equalize"] is True
    assert meta["outputs"] == {"scores": "scores", "cam": "cam"}
    assert meta["negative_label"] == "DARK"  # from `train --negative-label`, through the sidecar
    sidecar = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    assert meta["training"]["made_with"] == sidecar["made_with"]
    gate, classifier = load_models(exported["models"], "cpu")
    assert gate.spec.positive_label == "XRAY" and gate.spec.input.colour == "rgb"
    assert classifier.spec.cam_output == "cam" and classifier.spec.negative_label == "DARK"
    assert classifier.spec.to_metadata() == meta  # the one writer of the schema wrote this record
    assert meta["input"]["layout"] == "NHWC" and meta["input"]["value_range"] == [0, 255]


def test_exported_outputs_vary_and_cam_matches_scores(exported: dict[str, Path]) -> None:
    from cxrbatch.imaging import load_image
    from cxrbatch.modelinput import to_model_input

    _, classifier = load_models(exported["models"], "cpu")
    paths = sorted((exported["cxr"] / "test").rglob("*.png"))
    batch = np.stack([to_model_input(load_image(p), classifier.spec.input) for p in paths])
    out = classifier.run(batch, with_cam=True)
    scores, cam = out["scores"], out["cam"]
    assert scores.std(axis=0).max() > 1e-4  # not the constant output of an untrained network
    # global average of the per-position logits, softmaxed, is the classifier's own output
    logits = cam.mean(axis=(1, 2))
    soft = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(soft / soft.sum(axis=1, keepdims=True), scores, atol=1e-4)


def test_parity_check_fails_loudly(exported: dict[str, Path]) -> None:
    import keras

    ckpt = exported["work"] / "classifier.keras"
    images = sorted((exported["cxr"] / "val").rglob("*.png"))[:4]
    with pytest.raises(UsageError, match="at least one real image"):
        onnx_export.export(ckpt, exported["work"] / "x.onnx", [])
    import onnx

    proto = onnx.load(str(exported["models"] / "classifier.onnx"))
    model = keras.models.load_model(ckpt, compile=False)
    from cxrbatch.modelinput import InputSpec

    spec = InputSpec(32, 32, 1, "grey", True)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel + 0.5, bias])  # a Keras model that no longer matches the ONNX file
    graph_model, names = onnx_export._with_outputs(model, "classifier")
    with pytest.raises(ExportError, match="differs from Keras"):
        onnx_export.check_parity(graph_model, proto, onnx_export.check_inputs(images, spec), names)


def test_evaluate_end_to_end(exported: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app, ["evaluate", str(exported["cxr"]), "--models", str(exported["models"]), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "classifier evaluation on cxr/test: 24 images" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    overall = report["overall"]
    assert overall["n"] == 24 and np.array(overall["confusion"]).sum() == 24
    assert overall["accuracy"] == pytest.approx(np.trace(np.array(overall["confusion"])) / 24, abs=1e-4)
    assert len(overall["ci95"]["recall"]) == 2
    gate_run = runner.invoke(app, ["evaluate", str(exported["gate"]), "--models", str(exported["models"])])
    assert gate_run.exit_code == 0, gate_run.output
    assert "gate evaluation on gate/test: 24 images" in gate_run.stdout


def test_model_spec_comes_from_the_sidecar_labels(exported: dict[str, Path]) -> None:
    summary = json.loads((exported["work"] / "gate.keras.json").read_text(encoding="utf-8"))
    spec = onnx_export.model_spec(summary, "2.0.0", ["scores"])
    assert spec.positive_label == "XRAY" and spec.negative_label is None and spec.cam_output is None
    assert ModelSpec.from_metadata(spec.to_metadata(), "gate") == spec
    classifier = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    del classifier["negative_label"]  # a sidecar from before the negative label
    with pytest.raises(ExportError, match="no negative label"):
        onnx_export.model_spec(classifier, "2.0.0", ["scores", "cam"])


def test_export_errors_are_one_line_without_traceback(exported: dict[str, Path], tmp_path: Path) -> None:
    ckpt = exported["work"] / "classifier.keras"
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "c.onnx")])
    assert result.exit_code == 2 and "--check-images" in result.stderr  # required: nothing to default to
    result = runner.invoke(
        app, ["export", str(tmp_path / "none.keras"), "--out", str(tmp_path / "c.onnx"), "--check-images", "."]
    )
    assert result.exit_code == 2 and "[error] Checkpoint not found:" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "c.onnx"), "--check-images", str(empty)])
    assert result.exit_code == 2 and "[error] the parity check needs at least one real image" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c.onnx").exists()


def test_a_damaged_checkpoint_or_sidecar_is_one_line_without_traceback(
    exported: dict[str, Path], tmp_path: Path
) -> None:
    images = str(exported["work"])
    fake = tmp_path / "fake.keras"
    fake.write_bytes(b"junk")
    cases = {
        '{"role": "classifier"}': "lacks input, labels: export checkpoints made by `cxrbatch train`",
        "not json": "cannot read the sidecar",
        "[1, 2]": "lacks role, input, labels",
    }
    for text, message in cases.items():
        fake.with_name("fake.keras.json").write_text(text, encoding="utf-8")
        result = runner.invoke(app, ["export", str(fake), "--out", str(tmp_path / "c.onnx"), "--check-images", images])
        assert result.exit_code == 1 and message in result.stderr and "Traceback" not in result.stderr, text
    good = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    fake.with_name("fake.keras.json").write_text(json.dumps(good), encoding="utf-8")
    result = runner.invoke(app, ["export", str(fake), "--out", str(tmp_path / "c.onnx"), "--check-images", images])
    assert result.exit_code == 1 and "is not a Keras checkpoint it can read" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c.onnx").exists()


def test_export_refuses_before_converting_what_would_fail_after(exported: dict[str, Path], tmp_path: Path) -> None:
    ckpt = exported["work"] / "classifier.keras"
    check = ["--check-images", str(exported["cxr"] / "val")]
    (tmp_path / "dir.onnx").mkdir()
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "dir.onnx"), *check])
    assert result.exit_code == 2 and "is a folder" in result.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "film.png").write_bytes(b"<html>not a film</html>")
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(tmp_path / "c.onnx"), "--check-images", str(bad)])
    assert result.exit_code == 2 and f"check image {bad / 'film.png'} cannot be read" in result.stderr
    twin = tmp_path / "twin.keras"  # the checkpoint with a sidecar that describes another input size
    twin.write_bytes(ckpt.read_bytes())
    summary = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    summary["input"]["height"] = summary["input"]["width"] = 64
    (tmp_path / "twin.keras.json").write_text(json.dumps(summary), encoding="utf-8")
    result = runner.invoke(app, ["export", str(twin), "--out", str(tmp_path / "c.onnx"), *check])
    assert result.exit_code == 1 and "describes a 64x64x1 input, the checkpoint takes 32x32x1" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "c.onnx").exists()
    # another run's sidecar with another set of classes: it was refused only after the conversion, in
    # the words of the runtime's check of a written file ("c.onnx: output 'scores' is [...]")
    summary = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    summary["labels"] = [*summary["labels"], "OTHER"]
    (tmp_path / "twin.keras.json").write_text(json.dumps(summary), encoding="utf-8")
    result = runner.invoke(app, ["export", str(twin), "--out", str(tmp_path / "c.onnx"), *check])
    assert (
        result.exit_code == 1
        and "describes a classifier of 3 score(s) (DARK, LIGHT, OTHER), the checkpoint gives 2" in result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "c.onnx").exists()


def test_the_record_says_how_the_network_was_initialised(exported: dict[str, Path]) -> None:
    meta = read_metadata(exported["models"] / "classifier.onnx")  # the tiny models start from random weights
    assert meta["architecture"].startswith("MobileNetV2 (random init)") and "ImageNet" not in meta["licence"]
    spec = onnx_export.model_spec({**_sidecar(exported), "base_weights": "mnv2.weights.h5"}, "1.0.0", ["scores", "cam"])
    assert spec.extra["architecture"].startswith("MobileNetV2 (ImageNet init)") and "ImageNet" in spec.extra["licence"]


def _sidecar(exported: dict[str, Path]) -> dict[str, object]:
    return json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
