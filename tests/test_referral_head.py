"""The bundled referral head: fitted on the differences within each training collection, written
into the classifier, then calibrated, run and given a site head like the bundled score."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import halves_image, halves_site, make_halves_classifier
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.errors import CxrBatchError, UsageError
from cxrbatch.evaluation import evaluate
from cxrbatch.extras import export_module
from cxrbatch.metrics import roc_auc
from cxrbatch.models import load_models, read_metadata
from cxrbatch.pipeline import Screener

pytest.importorskip("onnx", reason="the referral head is written into the graph with onnx")
referral_head = export_module("referral_head")
runner = CliRunner()

# collection: (mean brightness, whether it holds normal films too); abnormal films have a top half
# darker than the bottom. The bright collection's abnormal films are brighter than the dark one's
# normals, and the abnormal-only collection is the brightest: where a film sits says its collection.
COLLECTIONS = {"dark": (95, True), "bright": (155, True), "tb-only": (185, False)}


def _data(root: Path, per_side: int = 12) -> Path:
    """A training tree with MANIFEST.csv naming each film's collection."""
    rng = np.random.default_rng(4)
    rows = []
    for split in ("train", "val"):
        for collection, (level, has_normals) in COLLECTIONS.items():
            for label in ("NORMAL", "PNEUMONIA") if has_normals else ("PNEUMONIA",):
                folder = root / split / label
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(per_side):
                    mean = int(level + rng.integers(-8, 9))
                    gap = 0 if label == "NORMAL" else int(rng.integers(30, 50))
                    stem = f"{collection}-{split}-{label}-{i}"
                    halves_image(folder / f"{stem}.png", mean - gap // 2, mean + gap // 2)
                    row = {"id": stem, "split": split, "label": label, "source": "tests", "collection": collection}
                    rows.append(row)
    with (root / "MANIFEST.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _headed(tiny_models: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The halves classifier given a referral head by the command line; returns its folder and data."""
    make_halves_classifier(tiny_models / "classifier.onnx")
    data, out = _data(tmp_path / "data"), tmp_path / "headed"
    out.mkdir()
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
    args = ["referral-head", str(tiny_models / "classifier.onnx"), str(out / "classifier.onnx"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--gate", str(tiny_models / "gate.onnx"), "--version", "0.0.2"])
    assert result.exit_code == 0, result.stderr
    assert "Now choose its threshold: cxrbatch calibrate" in result.stderr
    return out, data


def test_ridge_is_the_class_balanced_closed_form() -> None:
    rng = np.random.default_rng(6)
    rows, abnormal = rng.normal(size=(50, 8)), np.arange(50) % 5 == 0  # 10 abnormal, 40 normal
    weight = np.where(abnormal, 0.5 / 0.2, 0.5 / 0.8)
    target = np.where(abnormal, 1.0, -1.0)
    scale = np.mean(np.sum(rows**2, axis=1))
    for penalty, fitted in zip((0.01, 10.0), referral_head.ridge(rows, abnormal, (0.01, 10.0)), strict=True):
        scatter = (rows * weight[:, None]).T @ rows + penalty * scale * np.eye(8)
        assert np.allclose(fitted, np.linalg.solve(scatter, (rows * weight[:, None]).T @ target), atol=1e-10)


def test_collections_are_centred_on_their_class_balanced_mean_and_one_sided_ones_left_out() -> None:
    rng = np.random.default_rng(7)
    unit = rng.normal(size=(70, 4))
    abnormal = np.arange(70) % 3 == 0  # 10 of each 30
    collections = np.array(["a"] * 30 + ["b"] * 30 + ["c"] * 10)
    abnormal[60:] = True  # c: abnormal only
    rows = referral_head.within_collection_rows(unit, abnormal, collections)
    assert sorted(rows) == ["a", "b"]
    for name, (centred, side) in rows.items():
        assert len(centred) == (collections == name).sum()
        assert np.allclose(centred[side].mean(axis=0) + centred[~side].mean(axis=0), 0.0)
    best, aucs = referral_head.choose_penalty(rows)
    means = {p: np.mean([a[p] for a in aucs.values()]) for p in referral_head.PENALTIES}
    assert best in referral_head.PENALTIES and means[best] == max(means.values()) and set(aucs) == {"a", "b"}
    with pytest.raises(CxrBatchError, match="needs two collections"):
        referral_head.choose_penalty({"a": rows["a"]})


def test_the_head_ranks_a_new_site_the_bundled_score_cannot(tiny_models: Path, tmp_path: Path) -> None:
    headed, _ = _headed(tiny_models, tmp_path)
    meta = read_metadata(headed / "classifier.onnx")
    record = meta["referral_head"]
    assert meta["outputs"]["referral"] == "referral" and meta["version"] == "0.0.2"
    assert set(record["collections"]) == {"dark", "bright"}  # tb-only holds one side
    assert record["collections"]["dark"] == {"films": 24, "abnormal": 12} and record["val_films"] == 60
    assert record["penalty"] in referral_head.PENALTIES and record["val_auc"] > 0.9
    assert "referral_threshold" not in meta and "calibration" not in meta  # they were 1 - P(NORMAL)'s
    site = halves_site(tmp_path / "site")
    plain = evaluate(site, None, Screener(*load_models(tiny_models, "cpu")))["referral"]
    found = evaluate(site, None, Screener(*load_models(headed, "cpu")))["referral"]
    assert plain["auc"] < 0.7 and found["auc"] > 0.95 and found["threshold"] is None

    with pytest.raises(CxrBatchError, match="already has a referral head"):
        referral_head.add_referral_head(
            headed / "classifier.onnx", tmp_path / "again.onnx", tmp_path / "data", headed / "gate.onnx"
        )
    (tmp_path / "data" / "MANIFEST.csv").unlink()
    with pytest.raises(CxrBatchError, match=r"has no MANIFEST\.csv"):
        referral_head.add_referral_head(
            tiny_models / "classifier.onnx", tmp_path / "x.onnx", tmp_path / "data", headed / "gate.onnx"
        )
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "x.onnx").exists()


def test_a_headed_model_is_calibrated_run_and_given_a_site_head(tiny_models: Path, tmp_path: Path) -> None:
    headed, data = _headed(tiny_models, tmp_path)
    val = tmp_path / "val"
    for label in ("NORMAL", "PNEUMONIA"):  # the val films as calibrate reads them
        (val / label).mkdir(parents=True)
        for film in (data / "val" / label).iterdir():
            (val / label / film.name).write_bytes(film.read_bytes())
    calibrated = tmp_path / "calibrated"
    args = ["calibrate", str(val), "--models", str(headed), "--out", str(calibrated), "--target-sensitivity", "0.9"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr  # a bundled head is not a site head: it may be calibrated
    meta = read_metadata(calibrated / "classifier.onnx")
    threshold = meta["referral_threshold"]
    assert meta["outputs"]["referral"] == "referral" and meta["referral_head"]["penalty"] > 0
    _, classifier = load_models(calibrated, "cpu")
    assert classifier.describe()["referral_from"] == "bundled head" and not classifier.spec.site_headed

    report, page = tmp_path / "r.csv", tmp_path / "review.html"
    site = halves_site(tmp_path / "site")
    args = ["run", str(site), "--models", str(calibrated), "--out", str(report), "--html", str(page)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert f"the bundled referral head, refer at &gt;= {threshold:.6f}" in page.read_text(encoding="utf-8")
    rows = list(csv.DictReader(report.open(encoding="utf-8")))
    abnormal = np.array(["abnormal" in Path(r["path"]).name for r in rows])
    scores = np.array([float(r["referral_score"]) for r in rows])
    assert roc_auc(scores, abnormal) == pytest.approx(1.0)  # the head's score, not 1 - P(NORMAL)
    assert all(r["refer"] == ("true" if float(r["referral_score"]) >= threshold else "false") for r in rows)

    sited = tmp_path / "sited"
    args = ["calibrate", str(site), "--models", str(calibrated), "--out", str(sited), "--site-head"]
    result = runner.invoke(app, [*args, "--target-sensitivity", "0.9"])
    assert result.exit_code == 2 and "ranks these films no better than the bundled score" in result.stderr
    assert not sited.exists()  # the bundled head already ranks this site: the site keeps it
    with pytest.raises(UsageError, match="has a bundled head: a float16 copy would move its referral scores"):
        export_module("half").halve(calibrated / "classifier.onnx", tmp_path / "half.onnx")

    reversed_site = tmp_path / "reversed"  # abnormal films with a brighter top: the bundled head ranks them last
    rng = np.random.default_rng(12)
    for label in ("NORMAL", "ABNORMAL"):
        (reversed_site / label).mkdir(parents=True)
        for i, level in enumerate(rng.uniform(90, 170, 40)):
            gap = 0 if label == "NORMAL" else int(rng.integers(30, 50))
            film = reversed_site / label / f"{label.lower()}{i:02d}.png"
            halves_image(film, int(level) + gap // 2, int(level) - gap // 2)
    args = ["calibrate", str(reversed_site), "--models", str(calibrated), "--out", str(sited), "--site-head"]
    result = runner.invoke(app, [*args, "--target-sensitivity", "0.9"])
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(sited / "classifier.onnx")
    assert meta["outputs"]["referral"] == "site_referral" and "referral_head" in meta  # the bundled one stays recorded
    gate, classifier = load_models(sited, "cpu")
    assert classifier.describe()["referral_from"] == "site head" and classifier.spec.site_headed
    assert evaluate(reversed_site, None, Screener(gate, classifier))["referral"]["auc"] == pytest.approx(1.0)
