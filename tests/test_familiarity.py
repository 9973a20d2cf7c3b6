"""The familiarity output: statistics, the graph's distance, and unfamiliar films in a run's report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.extras import export_module
from cxrbatch.models import load_models, read_metadata

pytest.importorskip("onnx", reason="the familiarity tool needs onnx")
familiarity = export_module("familiarity")


def test_ledoit_wolf_matches_its_definition_and_whitening_inverts_it() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    cov, shrinkage = familiarity.ledoit_wolf(x)
    centred = x - x.mean(axis=0)
    sample = centred.T @ centred / len(x)
    target = np.trace(sample) / 6 * np.eye(6)
    beta = sum(np.sum((np.outer(r, r) - sample) ** 2) for r in centred) / (40 * 40 * 6)
    expected = min(1.0, beta / (np.sum((sample - target) ** 2) / 6))
    assert shrinkage == pytest.approx(expected) and 0 < shrinkage < 1
    assert np.allclose(cov, (1 - shrinkage) * sample + shrinkage * target)
    white = familiarity.whitening(cov)
    assert np.allclose(white @ cov @ white, np.eye(6), atol=1e-8)


def _tree(root: Path) -> Path:
    """Training data for the tiny classifier: films of a narrow band of mid-to-light greys."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("val", 20)):
        for label, (low, high) in (("NORMAL", (90, 120)), ("PNEUMONIA", (140, 170))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, level in enumerate(rng.uniform(low, high, n)):
                grey_image(folder / f"{label}{i}.png", int(level))
    return root


def test_familiarity_output_flags_films_unlike_the_training_films(tiny_models: Path, tmp_path: Path) -> None:
    data, out = _tree(tmp_path / "data"), tmp_path / "with-familiarity"
    out.mkdir()
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    result = CliRunner().invoke(app, ["familiarity", str(tiny_models / "classifier.onnx"), str(out / "classifier.onnx"),
                                      "--data", str(data), "--gate", str(tiny_models / "gate.onnx")])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(out / "classifier.onnx")
    assert meta["outputs"]["familiarity"] == "familiarity" and meta["familiarity"]["train_films"] == 60
    _, classifier = load_models(out, "cpu")
    levels = np.array([100, 130, 160, 5, 250], dtype=np.float32)
    batch = np.repeat(levels[:, None, None, None], 32, axis=1).repeat(32, axis=2)
    distance = classifier.run(batch)["familiarity"][:, 0]
    assert distance[:3].max() < classifier.spec.familiarity_threshold < distance[3:].min()  # black, white: far
    inbox = tmp_path / "in"
    inbox.mkdir()
    grey_image(inbox / "usual.png", 110)
    grey_image(inbox / "odd.png", 5)
    report = tmp_path / "r.csv"
    result = CliRunner().invoke(app, ["run", str(inbox), "--models", str(out), "--out", str(report)])
    assert result.exit_code == 0 and "1 unfamiliar" in result.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(report.open(encoding="utf-8"))}
    assert rows["usual.png"]["unfamiliar"] == "false" and float(rows["usual.png"]["familiarity"]) > 0
    assert rows["odd.png"]["unfamiliar"] == "true" and rows["odd.png"]["needs_review"] == "true"


def test_a_graph_without_a_dense_head_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from cxrbatch.errors import ExportError

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["image"], ["scores"])], "g", [image], [scores])
    with pytest.raises(ExportError, match="does not end in MatMul -> Add -> Softmax"):
        familiarity.pooled_features_name(helper.make_model(graph), "scores")
    assert onnx  # the import is the point: the tool needs nothing heavier than onnx


def test_evaluate_reports_unfamiliar_films_per_source(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.evaluation import evaluate, format_report
    from cxrbatch.pipeline import Screener

    data, out = _tree(tmp_path / "data"), tmp_path / "m"
    out.mkdir()
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    familiarity.add_familiarity(
        tiny_models / "classifier.onnx", out / "classifier.onnx", data, tiny_models / "gate.onnx"
    )
    test = data / "test" / "NORMAL"
    test.mkdir(parents=True)
    rows = ["id,source"]
    for i, level in enumerate((100, 105, 110, 5, 8, 250)):  # three usual films, three from an odd "site"
        grey_image(test / f"t{i}.png", level)
        rows.append(f"t{i},{'odd' if i >= 3 else 'usual'}")
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gate, classifier = load_models(out, "cpu")
    report = evaluate(data, "test", Screener(gate, classifier))
    f = report["familiarity"]
    assert f["unfamiliar"] == 0.5
    assert f["by_group"]["source=odd"] == {"n": 3, "unfamiliar": 1.0, "auc_vs_rest": 1.0}
    assert "[source=odd] n=3 unfamiliar 100.00%, AUC against the rest 1.000" in format_report(report)


def test_a_model_that_has_the_output_already_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.errors import ExportError

    data, once = _tree(tmp_path / "data"), tmp_path / "once.onnx"
    familiarity.add_familiarity(tiny_models / "classifier.onnx", once, data, tiny_models / "gate.onnx")
    with pytest.raises(ExportError, match="already has a familiarity output"):
        familiarity.add_familiarity(once, tmp_path / "twice.onnx", data, tiny_models / "gate.onnx")
