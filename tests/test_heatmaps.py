"""Class-activation heatmaps: the map is right, files are named by hash, flagged-only works."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from helpers import make_classifier, make_gate, make_region_classifier
from PIL import Image
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.heatmaps import class_map, heatmap_name, overlay
from cxrbatch.models import load_models


def test_class_map_peaks_where_the_head_looks(tmp_path: Path) -> None:
    make_gate(tmp_path / "gate.onnx")
    make_region_classifier(tmp_path / "classifier.onnx")
    _, classifier = load_models(tmp_path, "cpu")
    flat = np.full((1, 32, 32, 1), 200.0, dtype=np.float32)
    out = classifier.run(flat, with_cam=True)
    assert int(out["scores"][0].argmax()) == 0  # COVID19: the top-left mask weighs most
    covid = class_map(out["cam"][0], 0)
    assert covid[:16, :16].min() == 1.0 and covid[16:, :].max() == 0.0 and covid[:, 16:].max() == 0.0
    normal = class_map(out["cam"][0], 1)
    assert normal[16:, 16:].min() == 1.0 and normal[:16, :].max() == 0.0


def test_overlay_outlines_the_hot_region_and_leaves_the_film_readable() -> None:
    film = np.tile(np.linspace(40, 220, 200).astype(np.uint8), (200, 1))  # a grey ramp
    picture = Image.fromarray(film, mode="L")
    heat = np.zeros((7, 7))
    heat[:3, :3] = 1.0
    arr = np.asarray(overlay(picture, heat, "COVID19 0.90"), dtype=int)
    red = (arr[..., 0] > 200) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    rows, cols = np.nonzero(red)
    assert rows.max() < 110 and cols.max() < 110  # the outline stays around the hot top-left corner
    assert red[80, :].sum() >= 2  # and crosses the row inside it on its right side (and left edge)
    untouched = ~red
    untouched[:40, :140] = False  # the caption box
    grey = arr[untouched]
    assert (grey[:, 0] == grey[:, 1]).all() and (grey[:, 1] == grey[:, 2]).all()  # no colour wash anywhere else
    assert (arr[150, :, 0] == film[150]).all() and (arr[60, 60, 0] == film[60, 60])  # the film itself, inside too


def test_heatmap_names_come_from_a_hash_of_the_path() -> None:
    a = heatmap_name(Path("../../etc/passwd.png"))
    assert len(a) == 20 and a.endswith(".png") and "/" not in a and "passwd" not in a
    assert heatmap_name(Path("x/a.png")) != heatmap_name(Path("y/a.png"))


def test_run_writes_heatmaps_and_the_report_column(tiny_models: Path, incoming: Path, tmp_path: Path) -> None:
    out, maps = tmp_path / "r.csv", tmp_path / "maps"
    result = CliRunner().invoke(
        app, ["run", str(incoming), "--models", str(tiny_models), "--out", str(out), "--heatmaps", str(maps)]
    )
    assert result.exit_code == 3, result.stderr
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert list(rows[0])[-1] == "heatmap"
    for row in rows:
        if row["status"] == "classified":
            assert Path(row["heatmap"]).name == heatmap_name(Path(row["path"]))
            assert Image.open(row["heatmap"]).size[0] > 0
        else:
            assert row["heatmap"] == ""
    assert len(list(maps.iterdir())) == 4


def test_heatmaps_for_flagged_only(incoming: Path, tmp_path: Path) -> None:
    models, out, maps = tmp_path / "m", tmp_path / "r.csv", tmp_path / "maps"
    models.mkdir()
    make_gate(models / "gate.onnx")
    make_classifier(models / "classifier.onnx", review_threshold=0.5)  # mid-grey NORMAL (0.54) is then sure
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(incoming),
            "--models",
            str(models),
            "--out",
            str(out),
            "--heatmaps",
            str(maps),
            "--heatmaps-for",
            "flagged",
        ],
    )
    assert result.exit_code == 3, result.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["b_mid.jpg"]["label"] == "NORMAL" and rows["b_mid.jpg"]["needs_review"] == "false"
    assert rows["b_mid.jpg"]["heatmap"] == ""  # a sure NORMAL is not flagged
    assert all(rows[n]["heatmap"] for n in ("a_dark.png", "c_light.PNG", "d_white.jpeg"))
    assert len(list(maps.iterdir())) == 3
    assert CliRunner().invoke(app, ["run", str(incoming), "--heatmaps-for", "some"]).exit_code == 2
