"""The bundled referral head: fitted on the differences within each training collection, written
into the classifier, then calibrated, run and given a site head like the bundled score."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import WITHOUT_HALF, halves_image, halves_site, has_module, make_halves_classifier
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.errors import CxrBatchError, UsageError
from cxrbatch.evaluation import evaluate
from cxrbatch.extras import export_module
from cxrbatch.metrics import roc_auc
from cxrbatch.models import load_models, read_metadata
from cxrbatch.pipeline import Screener

referral_head = export_module("referral_head")
runner = CliRunner()

# collection: (mean brightness, whether it holds normal films too); abnormal films have a top half
# darker than the bottom. The bright collection's abnormal films are brighter than the dark one's
# normals, and the abnormal-only collection is the brightest: where a film sits says its collection.
COLLECTIONS = {"dark": (95, True), "bright": (155, True), "tb-only": (185, False)}


def _data(root: Path, per_side: int = 12) -> Path:
    """A training tree with MANIFEST.csv naming each film's collection. Its train split also holds
    a few COVID19 films, of no collection, that val does not: COVID19 sorts before NORMAL, so val's
    class numbers are right only if val is read with train's classes."""
    rng = np.random.default_rng(4)
    (root / "train" / "COVID19").mkdir(parents=True)
    for i in range(5):
        halves_image(root / "train" / "COVID19" / f"covid{i}.png", 120, 60, mark=i)  # not in MANIFEST.csv
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
                    halves_image(folder / f"{stem}.png", mean - gap // 2, mean + gap // 2, mark=i)
                    row = {"id": stem, "split": split, "label": label, "source": "tests", "collection": collection}
                    rows.append(row)
    with (root / "MANIFEST.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def _val_folder(data: Path, root: Path) -> Path:
    """The val films as calibrate reads them (class folders only)."""
    for label in ("NORMAL", "PNEUMONIA"):
        (root / label).mkdir(parents=True)
        for film in (data / "val" / label).iterdir():
            (root / label / film.name).write_bytes(film.read_bytes())
    return root


def _headed(tiny_models: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The halves classifier, calibrated on the val films, then given a referral head by the command
    line; returns the headed model's folder and the data."""
    make_halves_classifier(tiny_models / "classifier.onnx")
    data, calibrated, out = _data(tmp_path / "data"), tmp_path / "plain-calibrated", tmp_path / "headed"
    args = ["calibrate", str(_val_folder(data, tmp_path / "plain-val")), "--models", str(tiny_models)]
    assert runner.invoke(app, [*args, "--out", str(calibrated), "--target-sensitivity", "0.9"]).exit_code == 0
    assert "calibration" in read_metadata(calibrated / "classifier.onnx")
    out.mkdir()
    args = ["referral-head", str(calibrated / "classifier.onnx"), str(out / "classifier.onnx"), "--data", str(data)]
    result = runner.invoke(app, [*args, "--gate", str(tiny_models / "gate.onnx"), "--version", "0.0.2"])
    assert result.exit_code == 0, result.stderr
    assert f"--models {out} --out DIR (after copying the gate into {out})" in result.stderr
    (out / "gate.onnx").write_bytes((tiny_models / "gate.onnx").read_bytes())
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
    with pytest.raises(UsageError, match="needs two collections with 10 normal and 10 abnormal train films each"):
        referral_head.choose_penalty({"a": rows["a"]})
    blank = np.where(collections == "b", "", collections)  # films of no named collection take no part
    assert sorted(referral_head.within_collection_rows(unit, abnormal, blank)) == ["a"]
    separable = {name: (np.where(side[:, None], 1.0, -1.0) * np.ones((20, 3)), side) for name in ("x", "y")
                 for side in [np.arange(20) < 10]}  # fmt: skip
    assert referral_head.choose_penalty(separable)[0] == max(referral_head.PENALTIES)  # ties: the strongest


def test_the_head_learns_what_differs_within_collections_not_between_them() -> None:
    """Two collections differ along feature 0 and in their share of abnormal films (a shortcut);
    within each, abnormal films differ along feature 1 only."""
    rng = np.random.default_rng(9)
    unit, abnormal, collections = [], [], []
    for name, offset, share in (("mostly-abnormal", 3.0, 0.8), ("mostly-normal", -3.0, 0.2)):
        side = rng.random(200) < share
        feats = rng.normal(0.0, 0.3, (200, 6))
        feats[:, 0] += offset
        feats[:, 1] += np.where(side, 0.5, -0.5)
        unit.append(feats)
        abnormal.append(side)
        collections += [name] * 200
    x, y = np.concatenate(unit), np.concatenate(abnormal)
    weights, penalty, aucs, rows = referral_head.fit_head(x, y, np.array(collections))
    assert abs(weights[1]) > 100 * abs(weights[0]) and weights[1] > 0
    assert min(a for fold in aucs.values() for a in fold.values()) > 0.95
    assert set(rows) == {"mostly-normal", "mostly-abnormal"}
    plain = referral_head.ridge(x - x.mean(axis=0), y, (penalty,))[0]  # centred as a whole: the shortcut is learnt
    assert abs(plain[0]) / abs(plain[1]) > 10 * abs(weights[0]) / abs(weights[1])


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

    args = ["referral-head", str(headed / "classifier.onnx"), str(tmp_path / "again.onnx"), "--data"]
    result = runner.invoke(app, [*args, str(tmp_path / "data"), "--gate", str(headed / "gate.onnx")])
    assert result.exit_code == 2 and "already has a referral head (referral)" in result.stderr
    (tmp_path / "data" / "MANIFEST.csv").unlink()
    with pytest.raises(UsageError, match=r"has no MANIFEST\.csv"):
        referral_head.add_referral_head(
            tiny_models / "classifier.onnx", tmp_path / "x.onnx", tmp_path / "data", headed / "gate.onnx"
        )
    assert not (tmp_path / "again.onnx").exists() and not (tmp_path / "x.onnx").exists()


def test_a_headed_model_is_calibrated_run_and_given_a_site_head(tiny_models: Path, tmp_path: Path) -> None:
    headed, data = _headed(tiny_models, tmp_path)
    val = _val_folder(data, tmp_path / "val")
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
    # without the export extra `half` says that first
    refused = (UsageError, "has a bundled head: a float16 copy would move its referral scores")
    error, match = refused if has_module("onnxconverter_common") else WITHOUT_HALF
    with pytest.raises(error, match=match):
        export_module("half").halve(calibrated / "classifier.onnx", tmp_path / "half.onnx")

    reversed_site = tmp_path / "reversed"  # abnormal films with a brighter top: the bundled head ranks them last
    rng = np.random.default_rng(12)
    for label in ("NORMAL", "ABNORMAL"):
        (reversed_site / label).mkdir(parents=True)
        for i, level in enumerate(rng.uniform(90, 170, 40)):
            gap = 0 if label == "NORMAL" else int(rng.integers(30, 50))
            film = reversed_site / label / f"{label.lower()}{i:02d}.png"
            halves_image(film, int(level) + gap // 2, int(level) - gap // 2, mark=i)
    args = ["calibrate", str(reversed_site), "--models", str(calibrated), "--out", str(sited), "--site-head"]
    result = runner.invoke(app, [*args, "--target-sensitivity", "0.9"])
    assert result.exit_code == 0, result.stderr
    meta = read_metadata(sited / "classifier.onnx")
    assert meta["outputs"]["referral"] == "site_referral"
    assert meta["referral_head"]["in_use"] is False  # the bundled head stays in the graph, recorded, unused
    gate, classifier = load_models(sited, "cpu")
    assert classifier.describe()["referral_from"] == "site head" and classifier.spec.site_headed
    assert evaluate(reversed_site, None, Screener(gate, classifier))["referral"]["auc"] == pytest.approx(1.0)


def test_a_written_model_takes_its_place_only_once_it_passes_its_check(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.features import save_classifier

    source = make_halves_classifier(tiny_models / "classifier.onnx")
    before = source.read_bytes()
    proto, meta = onnx.load(str(source)), read_metadata(source)

    def refuse(model: object) -> None:
        raise CxrBatchError("the check failed")

    with pytest.raises(CxrBatchError, match="the check failed"):
        save_classifier(proto, meta, source, "9.9.9", refuse)  # the model it was made from, in place
    assert source.read_bytes() == before and sorted(p.name for p in tiny_models.iterdir()) == [
        "classifier.onnx",
        "gate.onnx",
    ]
    save_classifier(proto, meta, source, "9.9.9")
    assert read_metadata(source)["version"] == "9.9.9"


def _with_meta(source: Path, out: Path, **changes: object) -> Path:
    """A copy of the model `source` whose metadata record has `changes` (a nested key as a dict)."""
    from cxrbatch.models import embed_metadata

    proto, meta = onnx.load(str(source)), read_metadata(source)
    for key, value in changes.items():
        meta[key] = {**meta.get(key, {}), **value} if isinstance(value, dict) else value
    embed_metadata(proto, meta)
    onnx.save(proto, str(out))
    return out


def test_the_head_is_refused_what_would_make_a_wrong_model(tiny_models: Path, tmp_path: Path) -> None:
    source = make_halves_classifier(tiny_models / "classifier.onnx")
    data, gate = _data(tmp_path / "data"), tiny_models / "gate.onnx"

    def head(src: Path, dst: Path, tree: Path = data, model_gate: Path = gate) -> tuple[int, str]:
        result = runner.invoke(
            app, ["referral-head", str(src), str(dst), "--data", str(tree), "--gate", str(model_gate)]
        )
        return result.exit_code, result.stderr

    one_sided = tmp_path / "one-sided"  # val without abnormal films: no Platt fit, no AUC
    for film in data.rglob("*"):
        target = one_sided / film.relative_to(data)
        if film.is_dir() or "val/PNEUMONIA" in film.as_posix():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(film.read_bytes())
    code, err = head(source, tmp_path / "h.onnx", one_sided)
    assert code == 2 and "needs normal and abnormal films to scale the referral head" in err
    code, err = head(gate, tmp_path / "h.onnx")  # a gate given as the classifier
    assert code == 2 and "is a gate model, expected a classifier model" in err
    code, err = head(source, tmp_path / "h.onnx", data, source)  # and the classifier as the gate
    assert code == 2 and "is a classifier model, expected a gate model" in err
    half = _with_meta(source, tmp_path / "half.onnx", precision="float16")
    code, err = head(half, tmp_path / "h.onnx")
    assert code == 2 and "is a float16 copy: make a referral head from the float32 model" in err
    (tmp_path / "folder.onnx").mkdir()
    code, err = head(source, tmp_path / "folder.onnx")
    assert code == 2 and "is a folder" in err
    assert "Traceback" not in err and not (tmp_path / "h.onnx").exists()


def test_the_head_leaves_out_what_the_models_training_left_out(tiny_models: Path, tmp_path: Path) -> None:
    source = make_halves_classifier(tiny_models / "classifier.onnx")
    data, gate = _data(tmp_path / "data"), tiny_models / "gate.onnx"
    plain = referral_head.add_referral_head(source, tmp_path / "plain.onnx", data, gate)
    fold = _with_meta(source, tmp_path / "fold.onnx", training={"config": {"exclude_sources": ["tb-only"]}})
    record = referral_head.add_referral_head(fold, tmp_path / "h.onnx", data, gate)  # not named again here
    assert record["excluded_sources"] == ["tb-only"] and plain["excluded_sources"] == []
    assert (plain["val_films"], record["val_films"]) == (60, 48)  # tb-only's 12 val films left out


def test_the_penalty_is_judged_without_the_left_out_collections_copies_in_other_collections() -> None:
    # The curated Kaggle set holds re-encoded Kermany films: left out, Kermany was scored by a fit
    # on its own copies.
    rng = np.random.default_rng(3)
    films = rng.normal(size=(20, 30))
    side = np.arange(20) % 2 == 0
    rows = {
        "a": (films, side),
        "b": (np.concatenate([films, rng.normal(size=(20, 30))]), np.concatenate([side, side])),  # a's copies first
        "c": (rng.normal(size=(20, 30)), side),
    }
    clusters = {"a": np.array([f"a{i}" for i in range(20)]), "c": np.array([f"c{i}" for i in range(20)])}
    clusters["b"] = np.concatenate([clusters["a"], [f"b{i}" for i in range(20)]])
    _, with_copies = referral_head.choose_penalty(rows)
    _, without = referral_head.choose_penalty(rows, clusters)
    weakest = min(referral_head.PENALTIES)
    assert with_copies["a"][weakest] > 0.9 and without["a"][weakest] < 0.7  # the copies had told it the answers
    assert without["c"] == with_copies["c"]  # c shares no cluster: its fit is the same
    only_copies = {"a": rows["a"], "b": (films, side)}
    with pytest.raises(UsageError, match="nothing is left to fit without the films of a's clusters"):
        referral_head.choose_penalty(only_copies, {"a": clusters["a"], "b": clusters["a"]})
