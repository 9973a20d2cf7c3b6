"""Evaluation metrics and labelled-tree discovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image
from PIL import Image

from cxrbatch.errors import UsageError
from cxrbatch.evaluation import Framed, classification_metrics, evaluate, format_report, labelled_images, roc_auc
from cxrbatch.models import load_models
from cxrbatch.pipeline import Screener


def test_metrics_on_a_known_confusion_matrix() -> None:
    # truth 0: 3 right, 1 called 1; truth 1: 2 right; truth 2: 1 right, 1 called 0
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    m = classification_metrics(y, pred, 3, ci=True)
    assert m["confusion"] == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["recall"] == pytest.approx([0.75, 1.0, 0.5])
    assert m["precision"] == pytest.approx([0.75, 2 / 3, 1.0])
    f1 = [0.75, 0.8, 2 / 3]
    assert m["f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    low, high = m["ci95"]["accuracy"]
    assert low <= m["accuracy"] <= high and high - low > 0


def test_roc_auc_counts_ordered_pairs_and_half_ties() -> None:
    positive = np.array([True, True, False, False, False])
    # pairs (pos, neg): 0.9 beats all three; 0.4 beats 0.1, ties 0.4, loses to 0.5 -> (3 + 1 + 0.5) / 6
    assert roc_auc(np.array([0.9, 0.4, 0.4, 0.1, 0.5]), positive) == pytest.approx(4.5 / 6)
    assert roc_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    assert roc_auc(np.array([0.1, 0.2, 0.3, 0.4, 0.5]), positive) == 0.0
    assert roc_auc(np.ones(5), positive) == 0.5
    assert roc_auc(np.ones(3), np.array([True, True, True])) is None


def test_absent_class_scores_zero_not_nan() -> None:
    m = classification_metrics(np.array([0, 0]), np.array([0, 0]), 2)
    assert m["recall"] == [1.0, 0.0] and not np.isnan(m["macro_f1"])


def test_labelled_images_from_folders_and_from_manifest(tmp_path: Path) -> None:
    (tmp_path / "test" / "NORMAL").mkdir(parents=True)
    grey_image(tmp_path / "test" / "NORMAL" / "n1.png", 110)
    paths, truth = labelled_images(tmp_path, "test")
    assert [p.name for p in paths] == ["n1.png"] and truth == ["NORMAL"]
    flat = tmp_path / "flat"
    flat.mkdir()
    grey_image(flat / "abc.png", 20)
    grey_image(flat / "unlisted.png", 20)
    (flat / "MANIFEST.csv").write_text("id,file,label\nabc,abc.png,COVID19\n", encoding="utf-8")
    paths, truth = labelled_images(flat, "test")
    assert [p.name for p in paths] == ["abc.png"] and truth == ["COVID19"]
    with pytest.raises(UsageError, match="No labelled images"):
        labelled_images(tmp_path / "test" / "NORMAL", None)


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
    report = evaluate(tmp_path, "test", gate, classifier, Screener(gate, classifier))
    assert report["kind"] == "classifier" and report["images"] == 13
    assert report["overall"]["confusion"][1] == [0, 3, 0, 1]
    assert report["overall"]["accuracy"] == pytest.approx(12 / 13)
    assert report["by_source"]["src-b"]["n"] == 4 and report["by_source"]["src-a"]["accuracy"] == 1.0
    assert report["gate_accepted"] == 1.0
    assert report["auc"]["COVID19"] == 1.0  # the darkest images get the highest COVID19 scores
    text = format_report(report)
    assert "accuracy 0.9231" in text and "[source] src-a" in text


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
    paths, _ = labelled_images(tmp_path, "all")
    assert len(paths) == 9 and {p.parent.parent.name for p in paths} == {"train", "val", "test"}
    report = evaluate(tmp_path, "all", gate, classifier, screener, sources=("held-out",))
    assert report["images"] == 6 and list(report["by_source"]) == ["held-out"]
    # train's held-out NORMAL is dark (the tiny model calls it COVID19); the other five are right
    assert report["overall"]["confusion"][:2] == [[3, 0, 0, 0], [1, 2, 0, 0]]
    assert report["sources"] == ["held-out"] and f"{tmp_path.name}/all: 6 images" in format_report(report)
    with pytest.raises(UsageError, match="from the source"):
        evaluate(tmp_path, "all", gate, classifier, screener, sources=("nowhere",))


def test_framed_stress_test_changes_what_the_models_see(tiny_models: Path, tmp_path: Path) -> None:
    folder = tmp_path / "test" / "TUBERCULOSIS"
    folder.mkdir(parents=True)
    for i in range(3):
        grey_image(folder / f"tb{i}.png", 250)
    gate, classifier = load_models(tiny_models, "cpu")
    plain = evaluate(tmp_path, "test", gate, classifier, Screener(gate, classifier))
    assert plain["overall"]["confusion"][3] == [0, 0, 0, 3] and plain["transform"] is None
    # in a black frame 1.5x its size a white film averages 250 / 2.25: mid-grey, NORMAL to the tiny model
    framed = evaluate(tmp_path, "test", gate, classifier, Screener(gate, classifier, transform=Framed(1.5)))
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


def test_evaluate_refuses_unknown_class_folders(tiny_models: Path, tmp_path: Path) -> None:
    (tmp_path / "test" / "CATS").mkdir(parents=True)
    grey_image(tmp_path / "test" / "CATS" / "c.png", 100)
    gate, classifier = load_models(tiny_models, "cpu")
    with pytest.raises(UsageError, match="match neither"):
        evaluate(tmp_path, "test", gate, classifier, Screener(gate, classifier))
