"""The familiarity output: statistics, the graph's distance, and unfamiliar films in a run's report."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image, halves_image, halves_models, halves_tree, make_halves_classifier
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.evaluation import evaluate
from cxrbatch.extras import export_module
from cxrbatch.models import load_model, load_models, read_metadata
from cxrbatch.pipeline import Screener

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
                grey_image(folder / f"{split}-{label}{i}.png", int(level))  # a stem is one film's: ids are stems
    return root


def test_familiarity_output_flags_films_unlike_the_training_films(tiny_models: Path, tmp_path: Path) -> None:
    data, out = _tree(tmp_path / "data"), tmp_path / "with-familiarity"
    out.mkdir()
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    result = CliRunner().invoke(app, ["familiarity", str(tiny_models / "classifier.onnx"), str(out / "classifier.onnx"),
                                      "--data", str(data), "--gate", str(tiny_models / "gate.onnx"),
                                      "--statistic", "mahalanobis"])  # fmt: skip
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
    from onnx import TensorProto, helper

    from cxrbatch.errors import ModelError

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 4])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["image"], ["scores"])], "g", [image], [scores])
    with pytest.raises(ModelError, match="does not end in MatMul -> Add -> Softmax"):
        familiarity.pooled_features_name(helper.make_model(graph), "scores")


def test_evaluate_reports_unfamiliar_films_per_source(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.evaluation import evaluate, format_report
    from cxrbatch.pipeline import Screener

    data, out = _tree(tmp_path / "data"), tmp_path / "m"
    out.mkdir()
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    src, gate = tiny_models / "classifier.onnx", tiny_models / "gate.onnx"
    familiarity.add_familiarity(src, out / "classifier.onnx", data, gate, statistic="mahalanobis")
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
    from cxrbatch.errors import UsageError

    data, once = _tree(tmp_path / "data"), tmp_path / "once.onnx"
    familiarity.add_familiarity(tiny_models / "classifier.onnx", once, data, tiny_models / "gate.onnx")
    with pytest.raises(UsageError, match="already has a familiarity output: add it to the exported model, or give"):
        familiarity.add_familiarity(once, tmp_path / "twice.onnx", data, tiny_models / "gate.onnx")


def test_knn_distances_are_one_minus_the_kth_cosine_similarity() -> None:
    bank = familiarity.unit_bank(np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
    assert bank.dtype == np.float16 and np.allclose(np.linalg.norm(bank.astype(float), axis=1), 1, atol=1e-3)
    film = np.array([[3.0, 0.0]])  # similarities to the bank: 1, 0, 0.7071
    assert familiarity.knn_distances(film, bank, k=1) == pytest.approx([0.0], abs=1e-3)
    assert familiarity.knn_distances(film, bank, k=2) == pytest.approx([1 - 0.7071], abs=1e-3)
    assert familiarity.knn_distances(film, bank, k=3) == pytest.approx([1.0], abs=1e-3)


def test_knn_familiarity_flags_films_whose_features_point_elsewhere(tiny_models: Path, tmp_path: Path) -> None:
    data, models = halves_tree(tmp_path / "data"), tmp_path / "halves"
    models.mkdir()
    (models / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    make_halves_classifier(tmp_path / "plain.onnx")
    gate = models / "gate.onnx"
    record = familiarity.add_familiarity(tmp_path / "plain.onnx", models / "classifier.onnx", data, gate)
    meta = read_metadata(models / "classifier.onnx")
    assert meta["familiarity"]["neighbour"] == 10 and meta["familiarity"]["train_films"] == 60
    assert meta["familiarity"]["percentile"] == 99.0 and record["threshold"] == meta["familiarity_threshold"]
    assert meta["familiarity"]["val_films"] == 60
    _, classifier = load_models(models, "cpu")
    # top / bottom brightness: flat films of any level point the training films' way; split ones do not
    films = [(100, 100), (220, 215), (40, 42), (200, 20), (20, 200)]
    batch = np.stack([np.concatenate([np.full((16, 32, 1), t), np.full((16, 32, 1), b)]) for t, b in films])
    distance = classifier.run(batch.astype(np.float32))["familiarity"][:, 0]
    threshold = classifier.spec.familiarity_threshold
    assert distance[:3].max() < threshold < distance[3:].min()
    unit = batch.reshape(5, 2, -1).mean(axis=2) / 255  # the features the graph pools
    bank = familiarity.unit_bank(np.array([[t, b] for t, b in _levels(data / "train")], dtype=float))
    assert np.allclose(distance, familiarity.knn_distances(unit, bank), atol=1e-4)
    val = familiarity.knn_distances(np.array(_levels(data / "val")), bank)  # the site check's reference count
    assert meta["familiarity"]["val_unfamiliar"] == int((val > threshold).sum())


def _levels(root: Path) -> list[tuple[float, float]]:
    from PIL import Image

    out = []
    for path in sorted(root.rglob("*.png")):
        pixels = np.asarray(Image.open(path).resize((32, 32), Image.Resampling.BILINEAR), dtype=float)
        out.append((pixels[:16].mean(), pixels[16:].mean()))
    return out


def test_replace_swaps_one_familiarity_output_for_another(tiny_models: Path, tmp_path: Path) -> None:
    import onnx

    data = _tree(tmp_path / "data")
    gate, first, second = tiny_models / "gate.onnx", tmp_path / "first.onnx", tmp_path / "second.onnx"
    familiarity.add_familiarity(tiny_models / "classifier.onnx", first, data, gate, statistic="mahalanobis")
    familiarity.add_familiarity(first, second, data, gate, statistic="knn", replace=True, version="0.0.2")
    proto = onnx.load(str(second))
    assert [o.name for o in proto.graph.output].count("familiarity") == 1
    names = {t.name for t in proto.graph.initializer}
    assert "familiarity_bank" in names and not names & {"familiarity_mean", "familiarity_whitening"}
    meta = read_metadata(second)
    assert meta["version"] == "0.0.2" and meta["familiarity"]["statistic"].startswith("1 - cosine similarity")
    assert meta["outputs"]["scores"] == "scores" and meta["outputs"]["cam"] == "cam"
    assert [o.name for o in proto.graph.output] == ["scores", "cam", "familiarity"]
    third = tmp_path / "third.onnx"  # and knn for knn
    familiarity.add_familiarity(second, third, data, gate, replace=True)
    assert [o.name for o in onnx.load(str(third)).graph.output] == ["scores", "cam", "familiarity"]
    batch = np.stack([np.full((32, 32, 1), v, dtype=np.float32) for v in (10, 90, 170, 250)])
    plain = load_model(tiny_models / "classifier.onnx", "classifier", ["CPUExecutionProvider"]).run(batch)["scores"]
    replaced = load_model(third, "classifier", ["CPUExecutionProvider"]).run(batch)["scores"]
    np.testing.assert_array_equal(replaced, plain)


@pytest.mark.parametrize("opset", [17, 18])  # the sum of squares takes its axes as an attribute before 18
def test_the_knn_graph_computes_what_numpy_does_in_either_opset(opset: int) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    features = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["pooled"])], "g", [features], [])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    rng = np.random.default_rng(5)
    bank = familiarity.unit_bank(rng.uniform(0, 1, (40, 3)))
    familiarity.with_knn_familiarity(proto, "pooled", bank, k=4)
    onnx.checker.check_model(proto, full_check=True)
    films = np.vstack([rng.uniform(0, 1, (5, 3)), np.zeros((1, 3))]).astype(np.float32)  # and a zero vector
    got = ort.InferenceSession(proto.SerializeToString()).run(["familiarity"], {"x": films})[0][:, 0]
    np.testing.assert_allclose(got, familiarity.knn_distances(films.astype(float), bank, k=4), atol=1e-6)
    assert got[-1] == pytest.approx(1.0)  # no direction: as far as can be


def test_an_unknown_statistic_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.errors import UsageError

    with pytest.raises(UsageError, match="unknown familiarity statistic 'median'"):
        familiarity.add_familiarity(
            tiny_models / "classifier.onnx", tmp_path / "x.onnx", _tree(tmp_path / "d"), tiny_models / "gate.onnx",
            statistic="median",
        )  # fmt: skip


def test_a_run_of_films_unlike_the_training_films_warns_and_says_so_in_json(tiny_models: Path, tmp_path: Path) -> None:
    import json

    models = halves_models(tmp_path, tiny_models / "gate.onnx")
    usual, odd = tmp_path / "usual", tmp_path / "odd"
    for folder, split in ((usual, False), (odd, True)):
        folder.mkdir()
        for i in range(12):
            level = 95 + 5 * i
            halves_image(folder / f"f{i}.png", level, 255 - level if split and i < 4 else level)
    for folder, warned in ((usual, False), (odd, True)):
        out, page = tmp_path / f"{folder.name}.json", tmp_path / f"{folder.name}.html"
        args = ["run", str(folder), "--models", str(models), "--json", str(out), "--html", str(page)]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.stderr
        check = json.loads(out.read_text(encoding="utf-8"))["summary"]["site_check"]
        val = read_metadata(models / "classifier.onnx")["familiarity"]["val_unfamiliar"]
        assert check["films"] == 12 and check["reference"] == {"films": 60, "unfamiliar": val}
        assert check["unfamiliar"] == (4 if warned else 0) and check["unlike_reference"] is warned
        text = f"[warning] 4 of 12 classified films (33.3%) are unfamiliar, against {val} of the 60 validation films"
        assert (text in result.stderr) is warned  # a log line, as every warning is (it was "warning: ...")
        assert result.stderr.splitlines()[-1].startswith("12 files: ")  # the summary line last, warned or not
        assert ("id='site-check'" in page.read_text(encoding="utf-8")) is warned  # the review page says it too


def test_familiarity_learns_only_from_the_classifiers_own_training_data(
    tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cxrbatch.errors import UsageError

    data, gate = _tree(tmp_path / "data"), tiny_models / "gate.onnx"
    source = tiny_models / "classifier.onnx"
    (data / "val" / "TUBERCULOSIS").mkdir()  # a val class train has not
    grey_image(data / "val" / "TUBERCULOSIS" / "tb.png", 130)
    with pytest.raises(UsageError, match="has class"):
        familiarity.add_familiarity(source, tmp_path / "x.onnx", data, gate)
    (data / "val" / "TUBERCULOSIS" / "tb.png").unlink()
    (data / "val" / "TUBERCULOSIS").rmdir()
    gate_data = tmp_path / "gate-data"  # another model's training data
    for split in ("train", "val"):
        for label in ("NOT_XRAY", "XRAY"):
            (gate_data / split / label).mkdir(parents=True)
            for i in range(12):
                grey_image(gate_data / split / label / f"{label}{i}.png", 60 + 10 * i)
    with pytest.raises(UsageError, match=r"class\(es\) \['NOT_XRAY', 'XRAY'\] that the classifier does not know"):
        familiarity.add_familiarity(source, tmp_path / "x.onnx", gate_data, gate)
    rows = ["id,source"] + [
        f"{p.stem},{'odd' if p.stem.endswith('1') else 'usual'}" for p in (data / "train").rglob("*.png")
    ]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    import onnx

    from cxrbatch.models import embed_metadata, read_metadata

    proto, meta = onnx.load(str(source)), read_metadata(source)
    meta["training"] = {"config": {"exclude_sources": ["odd"]}}  # a leave-source-out model
    embed_metadata(proto, meta)
    onnx.save(proto, str(tmp_path / "fold.onnx"))
    record = familiarity.add_familiarity(tmp_path / "fold.onnx", tmp_path / "x.onnx", data, gate)
    odd_train = sum(1 for p in (data / "train").rglob("*.png") if p.stem.endswith("1"))
    assert record["excluded_sources"] == ["odd"] and record["train_films"] == 60 - odd_train
    # a collection the model left out that this tree does not name (another tree, naming it by its
    # repository): its films were learnt from without a word
    meta["training"] = {"config": {"exclude_sources": ["odd", "elsewhere"]}}
    embed_metadata(proto, meta)
    onnx.save(proto, str(tmp_path / "fold2.onnx"))
    with caplog.at_level("WARNING"):
        record = familiarity.add_familiarity(tmp_path / "fold2.onnx", tmp_path / "x.onnx", data, gate)
    assert record["excluded_sources"] == ["odd"] and record["train_films"] == 60 - odd_train
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        f"the model's training left out ['elsewhere'], which {data / 'MANIFEST.csv'} does not name: if this is "
        "not the tree it was trained on, their films may be among those learnt from here"
    ]


def test_val_unfamiliar_is_the_count_run_makes(tiny_models: Path, tmp_path: Path) -> None:
    # The record counted numpy's unrounded values above the rounded threshold; run decides on the
    # rounded value: tied films at the percentile (one film twice) were counted where run counts none.
    percentile, copies = 99.0, 2
    data = halves_tree(tmp_path / "data")
    for i in range(copies):  # the same film twice in val (as re-encoded copies are): they sit at the top
        halves_image(data / "val" / "PNEUMONIA" / f"odd{i}.png", 200, 20)
    plain = make_halves_classifier(tmp_path / "plain.onnx")
    models = tmp_path / "m"
    models.mkdir()
    (models / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    familiarity.add_familiarity(plain, models / "classifier.onnx", data, models / "gate.onnx", percentile=percentile)
    record = read_metadata(models / "classifier.onnx")["familiarity"]
    gate, classifier = load_models(models, "cpu")
    report = evaluate(data, "val", Screener(gate, classifier))
    as_run = round(report["familiarity"]["unfamiliar"] * report["images"])
    assert report["images"] == record["val_films"]
    assert record["val_unfamiliar"] == as_run, (record, as_run)
