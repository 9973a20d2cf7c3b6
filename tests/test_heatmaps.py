"""Class-activation heatmaps: the map is right, files are named by hash, flagged-only works."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from helpers import make_classifier, make_gate, make_region_classifier
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.files import umask
from cxrbatch.heatmaps import _square, class_map, heatmap_name, overlay
from cxrbatch.models import load_models
from cxrbatch.records import Record


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
    drawn = np.asarray(overlay(picture, heat, "COVID19 0.90"), dtype=int)
    band = drawn.shape[0] - 200  # the caption's, above the film
    assert 12 <= band < 60 and drawn.shape[1] == 200 and drawn[:band].max() == 255  # white text on black
    arr = drawn[band:]
    red = (arr[..., 0] > 200) & (arr[..., 1] < 100) & (arr[..., 2] < 100)
    rows, cols = np.nonzero(red)
    assert rows.max() < 110 and cols.max() < 110  # the outline stays around the hot top-left corner
    assert red[80, :].sum() >= 2  # and crosses the row inside it on its right side (and left edge)
    rim = (arr == 255).all(axis=2)  # the light rim beside the outline (the ramp is never white)
    assert rim[80, :].sum() >= 1 and np.nonzero(rim)[0].max() < 110 and np.nonzero(rim)[1].max() < 110
    marks = red | rim
    assert (arr[~marks] == film[~marks][:, None]).all()  # every other pixel is the film's: nothing covers it


@pytest.mark.parametrize(("size", "shown"), [((3000, 40), (512, 7)), ((40, 3000), (7, 512)), ((32, 32), (512, 512))])
def test_a_very_wide_tall_or_small_film_gets_a_heatmap_that_can_be_read(
    size: tuple[int, int], shown: tuple[int, int]
) -> None:
    # A 3000 x 40 film became a 512 x 7 picture under its caption box; a 32 x 32 one stayed 32 px
    # with its caption wider than the film.
    from cxrbatch.heatmaps import display_copy

    picture = display_copy(Image.new("RGB", size, (90, 90, 90)))
    assert picture.size == shown and picture.mode == "L"
    assert display_copy(Image.new("L", (300, 224))).size == (300, 224)  # a JPEG's reduced decode: kept as it is
    drawn = overlay(picture, np.zeros((7, 7)), "TUBERCULOSIS 0.97 (review)")
    band = drawn.height - picture.height
    assert band >= 12 and drawn.width >= picture.width  # the caption above the film, as wide as it needs
    film = np.asarray(drawn)[band:, : picture.width]
    assert (film == 90).all()  # the whole film shows, uncovered


def test_heatmap_names_come_from_a_hash_of_the_path_and_the_result() -> None:
    normal = Record.of(Path("x/a.png"), "classified", "g" * 12, "c" * 12, label="NORMAL", confidence=0.7)
    a = heatmap_name(Path("../../etc/passwd.png"), normal)
    assert len(a) == 20 and a.endswith(".png") and "/" not in a and "passwd" not in a
    assert heatmap_name(Path("x/a.png"), normal) != heatmap_name(Path("y/a.png"), normal)
    other = Record.of(Path("x/a.png"), "classified", "g" * 12, "c" * 12, label="PNEUMONIA", confidence=0.9)
    assert heatmap_name(Path("x/a.png"), normal) != heatmap_name(Path("x/a.png"), other)  # one picture per result
    raw, text = Path(os.fsdecode(b"x\xff.png")), Path("x\\xff.png")  # one report spelling, two names
    assert heatmap_name(raw, normal) != heatmap_name(text, normal)


def test_a_file_changed_after_screening_gets_no_heatmap_of_the_other_film(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch import runner as runner_module

    draw = runner_module.add_heatmaps

    def swap_then_draw(items, screener, folder, flagged_only):  # type: ignore[no-untyped-def]
        (incoming / "sub" / "c_light.PNG").write_bytes((incoming / "a_dark.png").read_bytes())
        return draw(items, screener, folder, flagged_only)

    monkeypatch.setattr(runner_module, "add_heatmaps", swap_then_draw)
    out, maps = tmp_path / "r.csv", tmp_path / "maps"
    args = ["run", str(incoming), "--models", str(tiny_models), "--out", str(out), "--heatmaps", str(maps)]
    assert CliRunner().invoke(app, args).exit_code == 3
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["c_light.PNG"]["heatmap"] == ""
    assert rows["c_light.PNG"]["error"] == "heatmap not drawn: the file has changed since it was screened"
    assert rows["a_dark.png"]["heatmap"] and Path(rows["a_dark.png"]["heatmap"]).is_absolute()


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
            score = float(row["referral_score"]) if row["referral_score"] else None
            result = Record.of(
                Path(row["path"]),
                "classified",
                "",
                "",
                label=row["label"],
                confidence=float(row["confidence"]),
                referral_score=score,
            )
            assert Path(row["heatmap"]).name == heatmap_name(Path(row["path"]), result)
            assert Image.open(row["heatmap"]).size[0] > 0
        else:
            assert row["heatmap"] == ""
    assert len(list(maps.glob("*.png"))) == 4


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
    assert len(list(maps.glob("*.png"))) == 3
    assert CliRunner().invoke(app, ["run", str(incoming), "--heatmaps-for", "some"]).exit_code == 2


@pytest.mark.parametrize("grey", [20, 60, 108, 160, 240])
def test_the_outline_stands_out_from_any_grey_without_its_colour(grey: int) -> None:
    # the red outline is as light as a grey of 108: where the film is that grey (lung, heart),
    # a reader who does not see red (one man in twelve) saw no mark at all
    film = Image.new("L", (200, 200), grey)
    heat = np.zeros((7, 7))
    heat[2:5, 2:5] = 1.0
    drawn = overlay(film, heat, "PNEUMONIA 0.90")
    lightness = np.asarray(drawn.convert("L"), dtype=int)[drawn.height - 200 :]
    marks = (np.asarray(drawn, dtype=int)[drawn.height - 200 :] != grey).any(axis=2)
    assert marks.any() and np.abs(lightness[marks] - grey).max() >= 80


@pytest.mark.parametrize(("height", "width"), [(410, 512), (512, 97), (9, 9), (1, 40)])
def test_the_outlines_square_gives_what_pillows_rank_filters_give_on_a_mask(height: int, width: int) -> None:
    # the outline's shrink and the rim's growth, once Pillow's MinFilter and MaxFilter (a third of a
    # heatmap's time): the same pixels at every size the outline uses, edges included
    rng = np.random.default_rng(height * width)
    for blobs in (
        rng.random((height, width)) > 0.5,
        np.kron(rng.random((3, 3)) > 0.5, np.ones((height, width)))[:height, :width] > 0,
    ):
        mask = Image.fromarray(blobs.astype(np.uint8) * 255, mode="L")
        for size in (3, 5, 7):
            shrunk, grown = (
                np.asarray(mask.filter(f(size))) > 0 for f in (ImageFilter.MinFilter, ImageFilter.MaxFilter)
            )
            assert np.array_equal(_square(blobs, size, np.logical_and), shrunk), size
            assert np.array_equal(_square(blobs, size, np.logical_or), grown), size


def test_a_link_planted_in_the_heatmaps_folder_is_replaced_not_written_through(
    tiny_models: Path, incoming: Path, tmp_path: Path
) -> None:
    # A heatmap's name is foretold by whoever knows the path and the models' answer: a link
    # planted at it (maps kept inside an upload folder) made the run overwrite the file it named
    # with a PNG, and a link planted at the folder's mark made the run create the file it named.
    out, maps = tmp_path / "r.csv", incoming / "maps"
    args = ["run", str(incoming), "--models", str(tiny_models), "--out", str(out), "--heatmaps", str(maps)]
    assert CliRunner().invoke(app, args).exit_code == 3
    drawn = sorted(maps.glob("*.png"))
    victim, elsewhere = tmp_path / "notes.txt", tmp_path / "created-by-the-run"
    victim.write_text("a staff file", encoding="utf-8")
    for png in drawn:
        png.unlink()
        png.symlink_to(victim)
    (maps / ".cxrbatch-heatmaps").unlink()
    (maps / ".cxrbatch-heatmaps").symlink_to(elsewhere)
    assert CliRunner().invoke(app, args).exit_code == 3
    assert victim.read_text(encoding="utf-8") == "a staff file"
    assert not os.path.lexists(elsewhere)
    assert all(not png.is_symlink() and Image.open(png).format == "PNG" for png in drawn)
    assert all(os.stat(png).st_mode & 0o777 == 0o666 & ~umask() for png in drawn)
