"""Evaluation of the models on labelled trees: reports, source selection, the frame stress test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import colour_image, grey_image, make_constant_classifier, make_gate
from PIL import Image

from cxrbatch.datasets import labelled_images
from cxrbatch.errors import UsageError
from cxrbatch.evaluation import Framed, evaluate, format_report
from cxrbatch.models import load_models
from cxrbatch.pipeline import Screener


def test_evaluate_classifier_tree_with_manifest(tiny_models: Path, tmp_path: Path) -> None:
    levels = {"COVID19": 20, "NORMAL": 110, "PNEUMONIA": 170, "TUBERCULOSIS": 250}
    rows = ["id,source"]
    for label, level in levels.items():
        folder = tmp_path / "test" / label
        folder.mkdir(parents=True)
        for i in range(3):
            grey_image(folder / f"{label}{i}.png", level)
            rows.append(f"{label}{i},{'src-a' if i else 'src-b'}")
    grey_image(tmp_path / "test" / "NORMAL" / "NORMALx.png", 250)  # a NORMAL the tiny model calls TB
    (tmp_path / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gate, classifier = load_models(tiny_models, "cpu")
    report = evaluate(tmp_path, "test", Screener(gate, classifier))
    assert report["kind"] == "classifier" and report["images"] == 13
    assert report["overall"]["confusion"][1] == [0, 3, 0, 1]
    assert report["overall"]["accuracy"] == pytest.approx(12 / 13)
    assert report["by_source"]["src-b"]["n"] == 4 and report["by_source"]["src-a"]["accuracy"] == 1.0
    assert report["gate_accepted"] == 1.0
    assert report["auc"]["COVID19"] == 1.0  # the darkest images get the highest COVID19 scores
    referral = report["referral"]  # 9 abnormal films referred; the 3 mid-grey NORMALs cleared, the white one not
    assert (referral["n_abnormal"], referral["n_normal"], referral["threshold"]) == (9, 4, 0.5)
    assert referral["sensitivity"] == 1.0 and referral["specificity"] == 0.75
    assert report["by_source"]["src-b"]["referral"]["n_normal"] == 1  # NORMAL0 (src-a holds NORMALx too)
    text = format_report(report)
    assert "accuracy 0.9231" in text and "[source] src-a" in text
    assert "refer or clear at 0.500000: abnormal 9, normal 4; sensitivity 1.000" in text


def test_evaluate_all_splits_of_chosen_sources(tiny_models: Path, tmp_path: Path) -> None:
    rows = ["id,source"]
    for split, level in (("train", 20), ("val", 110), ("test", 110)):
        for label, source in (("COVID19", "held-out"), ("NORMAL", "held-out"), ("NORMAL", "seen")):
            folder = tmp_path / split / label
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{split}-{label}-{source}"
            grey_image(folder / f"{name}.png", level if label == "NORMAL" else 20)
            rows.append(f"{name},{source}")
    (tmp_path / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier)
    paths = labelled_images(tmp_path, "all").paths
    assert len(paths) == 9 and {p.parent.parent.name for p in paths} == {"train", "val", "test"}
    report = evaluate(tmp_path, "all", screener, sources=("held-out",))
    assert report["images"] == 6 and list(report["by_source"]) == ["held-out"]
    # train's held-out NORMAL is dark (the tiny model calls it COVID19); the other five are right
    assert report["overall"]["confusion"][:2] == [[3, 0, 0, 0], [1, 2, 0, 0]]
    assert report["sources"] == ["held-out"] and f"{tmp_path.name}/all: 6 images" in format_report(report)
    with pytest.raises(UsageError, match=r"from the collection\(s\) or source\(s\) \[.nowhere.\]"):
        evaluate(tmp_path, "all", screener, sources=("nowhere",))


def test_framed_stress_test_changes_what_the_models_see(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test" / "TUBERCULOSIS"
    folder.mkdir(parents=True)
    for i in range(3):
        grey_image(folder / f"tb{i}.png", 250)
    gate, classifier = load_models(tiny_models, "cpu")
    plain = evaluate(tmp_path, "test", Screener(gate, classifier))
    assert plain["overall"]["confusion"][3] == [0, 0, 0, 3] and plain["transform"] is None
    # in a black frame 1.5x its size a white film averages 250 / 2.25: mid-grey, NORMAL to the tiny model
    framed = evaluate(tmp_path, "test", Screener(gate, classifier, transform=Framed(1.5)))
    assert framed["overall"]["confusion"][3] == [0, 3, 0, 0]
    assert "stress test: each film centred in a black frame 1.5 times" in format_report(framed)
    cut = Framed(0.5)(Image.fromarray(np.arange(100, dtype=np.uint8).reshape(10, 10), mode="L"))
    assert np.array_equal(np.asarray(cut), np.arange(100).reshape(10, 10)[2:7, 2:7])
    assert str(Framed(0.8)) == "each film cut down to its central 80% of width and height"
    assert str(Framed(0.996)) == "each film cut down to its central 99.6% of width and height"
    rgb = Framed(1.5)(Image.new("RGB", (7, 5), (200, 100, 50)))
    assert rgb.size == (10, 8) and rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((5, 4)) == (200, 100, 50)
    with pytest.raises(UsageError, match=r"between 0\.5 and 2"):
        Framed(0.4)


def test_films_read_only_as_abnormal_count_for_refer_or_clear_not_for_classes(
    tiny_models: Path, tmp_path: Path
) -> None:
    rows = ["id,source"]
    for label, levels, source in (
        ("NORMAL", (95, 100, 110, 250), "site"),  # 250: a NORMAL the tiny model calls TUBERCULOSIS
        ("COVID19", (20,), "site"),
        ("ABNORMAL", (20, 30, 170, 105), "site"),  # 105: an abnormal film the tiny model calls NORMAL
        ("ABNORMAL", (250,), "reads-only"),
    ):
        (tmp_path / label).mkdir(exist_ok=True)
        for level in levels:
            grey_image(tmp_path / label / f"{label}{level}-{source}.png", level)
            rows.append(f"{label}{level}-{source},{source}")
    (tmp_path / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gate, classifier = load_models(tiny_models, "cpu")
    report = evaluate(tmp_path, None, Screener(gate, classifier))
    assert report["kind"] == "classifier" and report["images"] == 10
    unnamed = report["abnormal_unnamed"]
    assert unnamed == {"n": 5, "predicted": {"COVID19": 2, "NORMAL": 1, "PNEUMONIA": 1, "TUBERCULOSIS": 1}}
    assert report["overall"]["n"] == 5 and report["overall"]["accuracy"] == pytest.approx(4 / 5)
    referral = report["referral"]  # the five ABNORMAL films are abnormal here, as COVID19's one is
    assert (referral["n_abnormal"], referral["n_normal"]) == (6, 4)
    assert referral["sensitivity"] == pytest.approx(5 / 6) and referral["specificity"] == 0.75
    reads_only = report["by_source"]["reads-only"]
    assert reads_only["n"] == 1 and reads_only["accuracy"] is None and reads_only["recall"] == {}
    assert reads_only["referral"]["n_abnormal"] == 1 and reads_only["referral"]["sensitivity"] == 1.0
    text = format_report(report)
    assert "ABNORMAL: 5 films read as abnormal with no class named, called COVID19 2, NORMAL 1" in text
    assert "class metrics are of the other 5" in text and "accuracy 0.8000" in text
    assert "[source] reads-only" in text and "acc n/a" in text
    only_reads = tmp_path / "reads"
    (only_reads / "ABNORMAL").mkdir(parents=True)
    grey_image(only_reads / "ABNORMAL" / "a.png", 20)
    text = format_report(evaluate(only_reads, None, Screener(gate, classifier)))
    assert "accuracy" not in text and "refer or clear at 0.500000: abnormal 1, normal 0; sensitivity 1.000" in text


def test_evaluate_refuses_unknown_class_folders(tiny_models: Path, tmp_path: Path) -> None:
    for folder in ("CATS", "NORMAL"):
        (tmp_path / "test" / folder).mkdir(parents=True)
        grey_image(tmp_path / "test" / folder / "c.png", 100)
    gate, classifier = load_models(tiny_models, "cpu")
    with pytest.raises(UsageError, match=r"^Class folder\(s\) \['CATS'\] match neither the classifier labels"):
        evaluate(tmp_path, "test", Screener(gate, classifier))  # the folder at fault, not NORMAL beside it
    (tmp_path / "test" / "CATS" / "c.png").rename(tmp_path / "test" / "CATS" / "NOT_XRAY.png")
    (tmp_path / "test" / "CATS").rename(tmp_path / "test" / gate.spec.labels[0])
    with pytest.raises(UsageError, match="mix the classifier's labels"):
        evaluate(tmp_path, "test", Screener(gate, classifier))


def test_every_image_goes_through_both_models_via_the_screener(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test" / "NORMAL"
    folder.mkdir(parents=True)
    grey_image(folder / "n0.png", 110)
    colour_image(folder / "photo.png")  # the gate rejects it; the classifier must score it all the same
    (folder / "broken.png").write_bytes(b"not a png")
    rows = {"gate": 0, "classifier": 0}

    class Counting(Screener):
        def gate_scores(self, batch: np.ndarray) -> np.ndarray:
            rows["gate"] += len(batch)
            return super().gate_scores(batch)

        def classify(self, batch: np.ndarray, with_cam: bool = False) -> dict[str, np.ndarray]:
            rows["classifier"] += len(batch)
            return super().classify(batch, with_cam)

    gate, classifier = load_models(tiny_models, "cpu")
    report = evaluate(tmp_path, "test", Counting(gate, classifier))
    assert rows == {"gate": 2, "classifier": 2}
    assert report["images"] == 2 and report["gate_accepted"] == 0.5
    assert len(report["unreadable"]) == 1 and "broken.png" in report["unreadable"][0]
    text = format_report(report)
    assert "unreadable, left out of every figure: 1 (" in text and "broken.png: " in text


def test_evaluate_checks_its_json_target_before_scoring(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cxrbatch import evaluation
    from cxrbatch.cli import app

    data = tmp_path / "data"
    (data / "test" / "NORMAL").mkdir(parents=True)
    grey_image(data / "test" / "NORMAL" / "n.png", 100)
    scored: list[Path] = []
    monkeypatch.setattr(evaluation, "evaluate", lambda data, *rest: scored.append(data))
    args = ["evaluate", str(data), "--models", str(tiny_models), "--json", str(tmp_path / "no" / "such" / "m.json")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "folder" in result.stderr and "does not exist" in result.stderr
    assert scored == []  # refused before any film was scored


def test_a_site_of_two_folders_is_not_scored_down_for_the_classes_it_does_not_hold(
    tiny_models: Path, tmp_path: Path
) -> None:
    # NORMAL/ and ABNORMAL/ only, every NORMAL film right: macro-F1 was 0.25 and the absent
    # classes showed recall 0.000; a missing split read the whole tree and was reported as `test`.
    for i in range(3):
        (tmp_path / "site" / "NORMAL").mkdir(parents=True, exist_ok=True)
        grey_image(tmp_path / "site" / "NORMAL" / f"n{i}.png", 110)
    gate, classifier = load_models(tiny_models, "cpu")
    report = evaluate(tmp_path / "site", "test", Screener(gate, classifier))
    overall = report["overall"]
    assert report["split"] is None and overall["accuracy"] == 1.0 and overall["macro_f1"] == 1.0
    normal = classifier.spec.labels.index("NORMAL")
    assert [r is None for r in overall["recall"]] == [i != normal for i in range(4)]
    text = format_report(report)
    assert text.startswith("classifier evaluation on site: 3 images")
    assert "accuracy 1.0000 [0.292, 1.000]  macro-F1 1.0000 (no interval: a class has under 10 films) (of the 1" in text
    assert "n/a" in text.split("\n")[3]  # the first class row: COVID19 has no films
    (tmp_path / "tree" / "train" / "NORMAL").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"tree has no test/ folder \(its splits: train\)"):
        evaluate(tmp_path / "tree", "test", Screener(gate, classifier))


def test_a_tree_of_which_no_film_can_be_read_is_refused_not_reported_empty(tiny_models: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrbatch.cli import app
    from cxrbatch.evaluation import Scored, _gate_report

    for tree, classes in (("gate", ("XRAY", "NOT_XRAY")), ("classifier", ("NORMAL",))):
        for label in classes:
            (tmp_path / tree / "test" / label).mkdir(parents=True)
            (tmp_path / tree / "test" / label / f"{label.lower()}.png").write_bytes(b"not a png")
    gate, classifier = load_models(tiny_models, "cpu")
    # the gate tree raised TypeError (`~` of an empty float array); the classifier tree was an empty report, exit 0
    with pytest.raises(UsageError, match=r"gate: 2 labelled films found, none readable, so nothing.*not_xray\.png: "):
        evaluate(tmp_path / "gate", "test", Screener(gate, classifier))
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "classifier"), "--models", str(tiny_models)])
    assert result.exit_code == 2 and result.stdout == ""
    assert "classifier: 1 labelled film found, none readable" in result.stderr and "normal.png: " in result.stderr
    empty = _gate_report(Scored([], [], np.zeros(0), np.zeros((0, 4)), []), gate, {})
    assert empty["counts"] == {"xray": 0, "not_xray": 0} and empty["xray_kept"] is None


def test_evaluate_decides_refer_and_unfamiliar_as_run_does(tmp_path: Path) -> None:
    # P(NORMAL) 0.3219125 as float32: 1 - P is 0.678088 in float64 as run computes and writes it,
    # 0.678087 in float32 as evaluate computed it; a distance of 0.2699003 is 0.2699 as run writes it
    models = tmp_path / "models"
    models.mkdir()
    make_gate(models / "gate.onnx")
    make_constant_classifier(
        models / "classifier.onnx",
        [0.6, 0.3219125, 0.05, 0.0280875],
        0.2699003,
        referral_threshold=0.678088,
        familiarity_threshold=0.2699,
    )
    (tmp_path / "tree" / "COVID19").mkdir(parents=True)
    film = grey_image(tmp_path / "tree" / "COVID19" / "c.png", 20)
    gate, classifier = load_models(models, "cpu")
    [screened] = Screener(gate, classifier).screen([film])
    assert screened.refer is True and screened.unfamiliar is False  # run: referred, familiar
    report = evaluate(tmp_path / "tree", None, Screener(gate, classifier))
    assert report["referral"]["sensitivity"] == 1.0  # evaluate cleared it
    assert report["familiarity"]["unfamiliar"] == 0.0  # evaluate called it unfamiliar


def test_evaluate_json_on_stdout_is_stdout_alone(tiny_models: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from cxrbatch.cli import app

    (tmp_path / "test" / "NORMAL").mkdir(parents=True)
    grey_image(tmp_path / "test" / "NORMAL" / "n.png", 110)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--models", str(tiny_models), "--json", "-"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["overall"]["accuracy"] == 1.0  # the table came first: not JSON
    assert f"classifier evaluation on {tmp_path.name}/test: 1 images" in result.stderr


def test_evaluate_names_the_folder_it_was_given_as_dot(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "site" / "test" / "NORMAL").mkdir(parents=True)
    grey_image(tmp_path / "site" / "test" / "NORMAL" / "n.png", 110)
    gate, classifier = load_models(tiny_models, "cpu")
    monkeypatch.chdir(tmp_path / "site")
    report = evaluate(Path("."), "test", Screener(gate, classifier))
    assert report["data"] == "site"  # was "" and the table's "classifier evaluation on /test"
    assert format_report(report).startswith("classifier evaluation on site/test: 1 images")
    monkeypatch.chdir(tmp_path / "site" / "test")
    assert evaluate(Path(".."), "test", Screener(gate, classifier))["data"] == "site"
