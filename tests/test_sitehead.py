"""The site head: a referral score fitted on a site's labelled films, its graph output, calibrate --site-head."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import WITHOUT_HALF, halves_image, halves_site, has_module, make_halves_classifier
from typer.testing import CliRunner

from cxrbatch import sitehead
from cxrbatch.cli import app
from cxrbatch.errors import UsageError
from cxrbatch.evaluation import evaluate
from cxrbatch.features import unit_length
from cxrbatch.metrics import roc_auc
from cxrbatch.models import load_models, read_metadata
from cxrbatch.pipeline import Screener

runner = CliRunner()


def _films(rng: np.random.Generator, n: int, shift: float) -> np.ndarray:
    """Pooled-feature-like rows: positive, 20 wide, abnormal ones moved along one direction."""
    direction = np.linspace(-1.0, 1.0, 20)
    return np.abs(rng.normal(3.0, 1.0, (n, 20))) + shift * direction


def test_fit_learns_the_direction_and_scores_films_it_was_not_fitted_on() -> None:
    rng = np.random.default_rng(5)
    feats = np.vstack([_films(rng, 40, 0.0), _films(rng, 40, 1.5)])
    abnormal = np.arange(80) >= 40
    head, oof = sitehead.fit(feats, abnormal)
    assert head.penalty in sitehead.PENALTIES and head.slope > 0
    assert oof.shape == (80,) and ((oof > 0) & (oof < 1)).all()
    assert roc_auc(oof, abnormal) == pytest.approx(head.cv_auc)  # the sigmoid keeps the out-of-fold order
    assert head.cv_auc > 0.9
    fresh = np.vstack([_films(rng, 200, 0.0), _films(rng, 200, 1.5)])
    fresh_auc = roc_auc(head.probability(fresh), np.arange(400) >= 200)
    assert fresh_auc is not None and fresh_auc > 0.9
    again, again_oof = sitehead.fit(feats, abnormal)  # the folds come from a fixed seed
    assert np.array_equal(again_oof, oof) and again.penalty == head.penalty
    record = head.record(80)
    assert record["films"] == 80 and record["features"] == 20 and record["output"] == "site_referral"
    with pytest.raises(UsageError, match="at least 5 abnormal and 5 normal films"):
        sitehead.fit(feats[:44], abnormal[:44])


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])  # fewer films than features (the dual form), and more
def test_ridge_is_the_closed_form_solution_in_either_form(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(8)
    unit = rng.normal(size=shape)
    abnormal = np.arange(shape[0]) % 3 == 0
    centred = unit - unit.mean(axis=0)
    target = np.where(abnormal, 1.0, -1.0)
    scale = np.sum(centred**2) / shape[0]
    for penalty, (mean, weights, bias) in zip((0.1, 10.0), sitehead._ridge(unit, abnormal, (0.1, 10.0)), strict=True):
        direct = np.linalg.solve(centred.T @ centred + penalty * scale * np.eye(shape[1]), centred.T @ (target - bias))
        assert np.allclose(weights, direct, atol=1e-8) and np.allclose(mean, unit.mean(axis=0))
        assert bias == pytest.approx(target.mean())


def test_a_fold_is_penalised_per_film_like_the_refitted_head() -> None:
    # 24 of 30 films: 24/30 of the penalty, so that the fold is shrunk as much, film for film.
    rng = np.random.default_rng(9)
    unit = rng.normal(size=(30, 50))
    abnormal = np.arange(30) % 3 == 0
    fold, part = unit[:24], abnormal[:24]
    centred = fold - fold.mean(axis=0)
    residual = np.where(part, 1.0, -1.0) - np.where(part, 1.0, -1.0).mean()
    scale = np.sum(centred**2) / 24
    [(_, weights, _)] = sitehead._ridge(fold, part, (10.0,), films=30)
    direct = np.linalg.solve(centred.T @ centred + 10.0 * scale * 24 / 30 * np.eye(50), centred.T @ residual)
    assert np.allclose(weights, direct, atol=1e-8)


def test_fit_penalises_every_fold_for_all_the_films(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(10)
    abnormal = np.arange(40) % 2 == 0
    feats = rng.normal(size=(40, 20)) + 2.0 * abnormal[:, None] * (np.arange(20) == 0)  # something to learn
    seen: list[tuple[int, int | None]] = []
    ridge = sitehead._ridge

    def spy(unit: np.ndarray, part: np.ndarray, penalties: tuple[float, ...], films: int | None = None) -> object:
        seen.append((len(part), films))
        return ridge(unit, part, penalties, films)

    monkeypatch.setattr(sitehead, "_ridge", spy)
    sitehead.fit(feats, abnormal)
    # every fold, inner (3/5 of the films) or outer (4/5), penalised per film of all 40; the last, the head, on all
    assert seen[-1] == (40, None) and {films for _, films in seen[:-1]} == {40}
    assert {n for n, _ in seen[:-1]} == {32, 24}
    assert seen[-1] == (40, None)  # the refit on all of them


def test_the_graph_output_is_the_head_numpy_computes(tiny_models: Path, tmp_path: Path) -> None:
    from cxrbatch.features import features, pooled_features_name

    classifier = make_halves_classifier(tiny_models / "classifier.onnx")  # the tiny gate, a classifier of two features
    paths = [halves_image(tmp_path / f"f{i}.png", 60 + 7 * i, 200 - 9 * i) for i in range(12)]
    g, c = load_models(tiny_models, "cpu")
    screener = Screener(g, c)
    proto = onnx.load(str(classifier))
    feats = features(proto, paths, screener)
    head, _ = sitehead.fit(feats, np.arange(12) >= 6)  # the later films: a darker top than bottom
    sitehead.add_to_graph(proto, head, pooled_features_name(proto, c.spec.score_output))
    onnx.checker.check_model(proto, full_check=True)
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = np.stack([d.classifier_input for batch in screener.decoded_batches(paths) for d in batch])
    graph = session.run([sitehead.OUTPUT], {c.spec.input_name: inputs})[0][:, 0]
    assert np.allclose(graph, head.probability(feats), atol=1e-5)
    with pytest.raises(UsageError, match="already has a site head"):
        sitehead.add_to_graph(proto, head, pooled_features_name(proto, c.spec.score_output))


def test_calibrate_with_a_site_head_ranks_the_site_and_run_reports_its_score(tiny_models: Path, tmp_path: Path) -> None:
    films, models = halves_site(tmp_path / "site"), tiny_models
    make_halves_classifier(models / "classifier.onnx")  # the tiny gate, a classifier of two features

    def calibrate(out: Path, *extra: str, source: Path = models) -> tuple[int, str]:
        args = ["calibrate", str(films), "--models", str(source), "--out", str(out), "--target-sensitivity", "0.9"]
        result = runner.invoke(app, [*args, *extra])
        return result.exit_code, result.stdout + result.stderr

    code, plain_text = calibrate(tmp_path / "plain")
    assert code == 0, plain_text
    code, text = calibrate(tmp_path / "headed", "--site-head")
    assert code == 0, text
    assert "site head: out-of-fold AUC" in text and "site head" not in plain_text
    assert "(reached with about 95% confidence)" in text and "(reached with 95% confidence)" in plain_text
    plain = read_metadata(tmp_path / "plain" / "classifier.onnx")["calibration"]
    meta = read_metadata(tmp_path / "headed" / "classifier.onnx")
    record = meta["calibration"]
    assert meta["outputs"]["referral"] == "site_referral" and record["site_head"]["films"] == 80
    assert "the confidence is approximate" in record["rule"] and "approximate" not in plain["rule"]
    assert record["site_head"]["cv_auc"] > 0.95 and record["sensitivity"] >= 0.9
    assert record["specificity"] > plain["specificity"] + 0.3  # the bundled score cannot rank this site
    assert record["bundled_specificity"] == plain["specificity"]  # shown beside the head's: the same films, rule
    assert f"the bundled score, calibrated on the same films, would clear {plain['specificity']:.3f}" in text
    assert "bundled_specificity" not in plain

    report, page = tmp_path / "r.csv", tmp_path / "review.html"
    args = ["run", str(films), "--models", str(tmp_path / "headed"), "--out", str(report), "--html", str(page)]
    assert runner.invoke(app, args).exit_code == 0
    assert f"the site&#x27;s own head, refer at &gt;= {record['threshold']:.6f}" in page.read_text(encoding="utf-8")
    rows = list(csv.DictReader(report.open(encoding="utf-8")))
    _, headed = load_models(tmp_path / "headed", "cpu")
    assert headed.describe()["referral_from"] == "site head"
    for row in rows:  # the score is the head's, not 1 - P(NORMAL)
        assert row["refer"] == ("true" if float(row["referral_score"]) >= record["threshold"] else "false")
        assert float(row["referral_score"]) != pytest.approx(1 - float(row["p_NORMAL"]), abs=1e-3)
    abnormal = np.array(["abnormal" in Path(r["path"]).name for r in rows])
    scores = np.array([float(r["referral_score"]) for r in rows])
    assert roc_auc(scores, abnormal) == pytest.approx(1.0)

    gate, classifier = load_models(tmp_path / "headed", "cpu")
    found = evaluate(films, None, Screener(gate, classifier))["referral"]
    assert found["auc"] == pytest.approx(1.0) and found["threshold"] == record["threshold"]
    referred = np.array([r["refer"] == "true" for r in rows])
    assert found["sensitivity"] == pytest.approx(referred[abnormal].mean())  # evaluate refers as run does
    assert found["specificity"] == pytest.approx((~referred[~abnormal]).mean())

    for extra in (("--site-head",), ()):  # its scores on its own films are in-sample, and its record would go
        code, text = calibrate(tmp_path / "twice", *extra, source=tmp_path / "headed")
        assert code == 2 and "already has a site head, fitted on other films; calibrate the model it was made" in text
        assert not (tmp_path / "twice").exists()
    from cxrbatch.extras import export_module

    headed_file = tmp_path / "headed" / "classifier.onnx"
    # without the export extra `half` says that first
    refused = (UsageError, "has a site head: a float16 copy would move its referral scores")
    error, match = refused if has_module("onnxconverter_common") else WITHOUT_HALF
    with pytest.raises(error, match=match):
        export_module("half").halve(headed_file, tmp_path / "half.onnx")
    with pytest.raises(UsageError, match="has a site head: an int8 copy would move its referral scores"):
        export_module("quantize").quantize(headed_file, tmp_path / "int8.onnx", films, 8)


def test_calibrate_with_a_site_head_decodes_each_film_once_and_fits_on_its_features(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features the head is fitted on come from the screening pass itself, not a second one."""
    from cxrbatch import calibration
    from cxrbatch.decoding import Decoder
    from cxrbatch.features import features

    films = halves_site(tmp_path / "site")
    make_halves_classifier(tiny_models / "classifier.onnx")
    gate, classifier = load_models(tiny_models, "cpu")
    decoded: list[Path] = []
    plain_call = Decoder.__call__

    def counted(self: Decoder, path: Path, picture: bool = False):  # type: ignore[no-untyped-def]
        decoded.append(path)
        return plain_call(self, path, picture)

    monkeypatch.setattr(Decoder, "__call__", counted)
    found = calibration.calibrate(films, gate, classifier, 0.9, site_head=True)
    assert len(decoded) == 80 and len(set(decoded)) == 80
    assert found.site_head is not None and found.source_sha256 == classifier.sha256
    paths = sorted(decoded)  # as calibrate lists them: by label folder, then by name
    again = features(onnx.load(str(classifier.path)), paths, Screener(gate, classifier))
    head, _ = sitehead.fit(again, np.array(["ABNORMAL" in p.parent.name for p in paths]))
    assert head.penalty == found.site_head.penalty and np.allclose(head.weights, found.site_head.weights, atol=1e-6)


def test_a_site_head_no_better_than_the_bundled_score_is_refused(tiny_models: Path, tmp_path: Path) -> None:
    """Where the bundled score already ranks the site (abnormal films brighter), a head is not written."""
    rng = np.random.default_rng(2)
    for label, (low, high) in (("NORMAL", (90, 110)), ("ABNORMAL", (150, 200))):
        (tmp_path / "site" / label).mkdir(parents=True)
        for i, level in enumerate(rng.uniform(low, high, 40)):
            halves_image(tmp_path / "site" / label / f"{i}.png", int(level), int(level), mark=i)
    make_halves_classifier(tiny_models / "classifier.onnx")
    args = ["calibrate", str(tmp_path / "site"), "--models", str(tiny_models), "--out", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--target-sensitivity", "0.9", "--site-head"])
    assert result.exit_code == 2 and "ranks these films no better than the bundled score" in result.stderr
    assert "bundled 1.000): calibrate without --site-head" in result.stderr and not (tmp_path / "out").exists()
    feats = np.abs(np.random.default_rng(3).normal(size=(40, 6)))  # no signal at all: nothing to learn
    with pytest.raises(UsageError, match=r"learnt nothing from these films \(out-of-fold AUC 0\.470\)"):
        sitehead.fit_if_better(feats, np.arange(40) % 2 == 0, np.linspace(0, 1, 40))


def test_out_of_fold_scores_are_not_chosen_on_themselves() -> None:
    # With nothing to learn, the best penalty's out-of-fold AUC (what the head reported before)
    # rose above chance by being the best of 13; the nested scores choose each fold's penalty
    # without it.
    nested, chosen = [], []
    abnormal = np.arange(80) % 2 == 0
    for site in range(20):
        unit = unit_length(np.abs(np.random.default_rng(100 + site).normal(3.0, 1.0, (80, 50))))
        folds = sitehead._folds(abnormal, np.random.default_rng(sitehead.SEED))
        nested.append(roc_auc(sitehead.out_of_fold(unit, abnormal, folds), abnormal))
        best = np.zeros((len(sitehead.PENALTIES), 80))
        for k in range(sitehead.FOLDS):
            held = folds == k
            for i, (mean, weights, bias) in enumerate(
                sitehead._ridge(unit[~held], abnormal[~held], sitehead.PENALTIES, 80)
            ):
                best[i, held] = (unit[held] - mean) @ weights + bias
        chosen.append(max(roc_auc(row, abnormal) or 0.0 for row in best))
    assert np.mean(nested) < 0.55 and np.mean(chosen) > np.mean(nested) + 0.02


def test_platt_recovers_the_logistic_model_the_labels_were_drawn_from() -> None:
    rng = np.random.default_rng(21)
    scores = rng.normal(5.0, 2.0, 20000)
    abnormal = rng.random(20000) < 1 / (1 + np.exp(-(1.5 * scores - 6.0)))
    slope, intercept = sitehead.platt(scores, abnormal)
    assert slope == pytest.approx(1.5, rel=0.05) and intercept == pytest.approx(-6.0, rel=0.05)
    separable = np.arange(40.0)  # Platt's smoothed targets keep the slope finite
    slope, _ = sitehead.platt(separable, separable >= 20)
    assert 0 < slope < 100
