"""The models shipped in models/: they load, carry complete metadata, and get the samples right."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import pytest
from helpers import REPO, SHARED, needs_shared
from typer.testing import CliRunner

from cxrbatch import evaluation
from cxrbatch.cli import app
from cxrbatch.models import default_models_dir, load_models
from cxrbatch.pipeline import Screener
from cxrbatch.sitecheck import Reference, reference_of

SAMPLES = REPO / "samples"
EXPECTED = {
    "NORMAL2-IM-1437-0001.jpeg": ("classified", "NORMAL", "false"),
    "person1947_bacteria_4876.jpeg": ("classified", "PNEUMONIA", "false"),
    "chelsea.png": ("rejected", "", ""),
    "rocket.jpg": ("rejected", "", ""),
    "CT_small.dcm": ("rejected", "", ""),  # DICOM, read with the dicom extra (installed with the tests)
}


def test_bundled_models_load_with_complete_metadata() -> None:
    gate, classifier = load_models(default_models_dir(), "cpu")
    assert classifier.spec.labels == ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS")
    assert gate.spec.labels == ("NOT_XRAY", "XRAY") and gate.spec.positive_label == "XRAY"
    assert classifier.spec.cam_output == "cam"
    assert classifier.spec.negative_label == "NORMAL"
    for model in (gate, classifier):
        meta = model.spec.to_metadata()
        assert meta["version"] and meta["training"]["data"]["train"]
        assert meta["input"]["layout"] == "NHWC" and meta["input"]["value_range"] == [0, 255]
        assert 0 < model.spec.threshold < 1
    assert gate.path.stat().st_size <= 15 * 1024 * 1024
    # the classifier also holds its training films' unit features for the familiarity output (11 MB)
    assert classifier.path.stat().st_size <= 24 * 1024 * 1024
    meta = classifier.spec.to_metadata()
    record = meta["familiarity"]  # the features of every film the classifier was trained on
    assert record["neighbour"] == 10 and record["train_films"] == sum(meta["training"]["data"]["train"].values())
    assert 0 < (classifier.spec.familiarity_threshold or 0) < 2 and record["percentile"] == 99.0
    reference = reference_of(classifier.spec)  # the site check holds a run against the val films
    assert reference == Reference("validation films", record["val_unfamiliar"], record["val_films"])
    assert 0 < reference.unfamiliar < 0.02 * reference.films


def test_training_manifest_is_the_record_of_the_shipped_classifier() -> None:
    _, classifier = load_models(default_models_dir(), "cpu")
    training = classifier.spec.to_metadata()["training"]
    with (REPO / "models" / "training-manifest.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(len(r["dhash256"]) == 64 and int(r["dhash256"], 16) >= 0 for r in rows)
    assert all(r["source"] and r["path_in_source"] and r["license_as_stated"] for r in rows)
    train = Counter((r["collection"], r["label"]) for r in rows if r["split"] == "train")
    recorded = {(s["source"], s["label"]): s["train"] for s in training["sources"]}
    assert recorded == dict(train)
    assert sum(r["split"] == "train" for r in rows) == sum(training["data"]["train"].values())
    assert {lab for _, lab in train} == set(classifier.spec.labels)


@pytest.fixture(scope="module")
def sample_rows(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str, str]]:
    report = tmp_path_factory.mktemp("samples") / "report.csv"
    result = CliRunner().invoke(app, ["run", str(SAMPLES), "--out", str(report), "--quiet"])
    assert result.exit_code == 0, result.stderr
    rows = csv.DictReader(report.open(encoding="utf-8"))
    return {Path(r["path"]).name: (r["status"], r["label"], r["needs_review"]) for r in rows}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_samples_are_screened_as_their_provenance_says(sample_rows: dict[str, tuple[str, str, str]], name: str) -> None:
    assert set(sample_rows) == set(EXPECTED)
    assert sample_rows[name] == EXPECTED[name]


@needs_shared
def test_bench_folder_gives_one_row_per_file(tmp_path: Path) -> None:
    bench = SHARED / "data" / "bench"
    files = sorted(p.name for p in bench.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    report = tmp_path / "bench.csv"
    result = CliRunner().invoke(app, ["run", str(bench), "--out", str(report), "--quiet"])
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(report.open(encoding="utf-8")))
    assert sorted(Path(r["path"]).name for r in rows) == files
    with (bench / "MANIFEST.csv").open(encoding="utf-8") as fh:
        assert len(files) == sum(1 for _ in csv.DictReader(fh))  # every film the bench set lists
    statuses = [r["status"] for r in rows]
    assert statuses.count("error") == 0
    assert statuses.count("classified") == len(files)  # all are chest X-rays: gate 1.1.0 keeps all 294 (model card)


@needs_shared
def test_shipped_classifier_still_finds_tb_in_a_wider_frame() -> None:
    # the only TB source is cropped tight to the lungs; classifier 1.0.0, trained without
    # zoom-out views, found 2 of these 30 val TB films once each sat in a 1.25x black frame
    data = SHARED / "data" / "cxr"
    gate, classifier = load_models(default_models_dir(), "cpu")
    screener = Screener(gate, classifier, transform=evaluation.Framed(1.25))
    report = evaluation.evaluate(data, "val", screener, ("moudrah/Detecting_Tuberculosis_X-Rays",))
    recall = dict(zip(report["labels"], report["overall"]["recall"], strict=True))
    assert report["images"] == 60 and recall["TUBERCULOSIS"] >= 0.5 and recall["NORMAL"] >= 0.5


@pytest.mark.skipif(not (SHARED / "data").is_dir(), reason="../shared/data is not beside this checkout")
def test_models_do_not_ship_shared_files() -> None:
    import hashlib

    ours = [p for folder in ("samples", "models") for p in (REPO / folder).rglob("*") if p.is_file()]
    shipped = {hashlib.sha1(p.read_bytes()).hexdigest() for p in ours}
    with (SHARED / "data" / "bench" / "MANIFEST.csv").open(encoding="utf-8") as fh:
        bench = {row["file_sha1"] for row in csv.DictReader(fh)}
    assert not shipped & bench
