"""The lung-field box model (export/lungs.py): targets from masks and COCO boxes, the framed views'
box geometry, the crop and its fallback, and training from tiny git mirrors made here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_repo, png
from PIL import Image

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")

from cxrbatch.extras import export_module
from cxrbatch.imaging import load_image

lungs = export_module("lungs")


pytestmark = pytest.mark.export


def lungs_film(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """A dark film with a bright rectangle where the 'lungs' are (pixel box left, top, right, bottom)."""
    arr = np.full((size[1], size[0]), 20, dtype=np.uint8)
    arr[box[1] : box[3], box[0] : box[2]] = 230
    return Image.fromarray(arr, mode="L")


def test_mask_box_is_the_extent_of_the_set_pixels() -> None:
    mask = np.zeros((100, 200), dtype=bool)
    mask[10:31, 50:151] = True
    assert lungs.mask_box(mask) == pytest.approx((0.25, 0.10, 0.755, 0.31))
    assert lungs.mask_box(np.zeros((4, 4), dtype=bool)) is None


def test_coco_films_take_the_box_around_both_lungs_of_present_images_only() -> None:
    annotations = {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 200, "height": 100, "metadata": {"patientid": "7"}},
            {"id": 2, "file_name": "b.png", "width": 100, "height": 100},  # one lung only
            {"id": 3, "file_name": "gone.png", "width": 100, "height": 100},  # not in the repository
        ],
        "annotations": [
            {"image_id": 1, "bbox": [20, 10, 60, 80]},
            {"image_id": 1, "bbox": [110, 20, 70, 70]},
            {"image_id": 2, "bbox": [10, 10, 30, 30]},
            {"image_id": 3, "bbox": [10, 10, 30, 30]},
            {"image_id": 3, "bbox": [50, 10, 30, 30]},
        ],
    }
    films = lungs.coco_films(annotations, {"images/a.png", "images/b.png"})
    assert [(f.path, f.group) for f in films] == [("images/a.png", "ieee8023:7")]
    assert films[0].box == pytest.approx((0.10, 0.10, 0.90, 0.90))


def test_splits_follow_the_group_and_hold_about_a_tenth_each() -> None:
    groups = [f"g{i}" for i in range(2000)]
    splits = [lungs.split_of(g) for g in groups]
    assert splits == [lungs.split_of(g) for g in groups]
    assert 0.07 < splits.count("test") / 2000 < 0.13 and 0.07 < splits.count("val") / 2000 < 0.13


def test_framed_views_carry_the_box_to_where_the_lungs_are_in_the_view() -> None:
    film = lungs_film((300, 240), (60, 48, 240, 200))
    box = (60 / 300, 48 / 240, 240 / 300, 200 / 240)
    rng = np.random.default_rng(4)
    for _ in range(25):
        view, moved = lungs.framed_view(film, box, rng)
        arr = np.asarray(view.convert("L"), dtype=np.float64)
        h, w = arr.shape
        bright = arr > 125
        ys, xs = np.nonzero(bright)
        found = np.array([xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h])
        # Blur, noise and JPEG move edges by a pixel or two; mirrored padding can add bright copies
        # outside the box, so only the edges that lie inside the view are compared.
        inside = bright[round(moved[1] * h) : round(moved[3] * h), round(moved[0] * w) : round(moved[2] * w)]
        assert inside.mean() > 0.9
        if np.count_nonzero(bright) <= inside.size * 1.05:  # no mirrored copies in view
            assert found == pytest.approx(np.array(moved), abs=3 / min(w, h) + 0.01)


def test_crop_widens_the_box_by_the_margin_and_keeps_implausible_boxes_whole() -> None:
    assert lungs.crop_box((1000, 800), np.array([0.2, 0.25, 0.8, 0.75]), margin=0.1) == (140, 160, 860, 640)
    assert lungs.crop_box((1000, 800), np.array([-0.1, 0.0, 1.1, 1.0]), margin=0.1) == (0, 0, 1000, 800)
    assert lungs.crop_box((1000, 800), np.array([0.4, 0.4, 0.5, 0.9])) is None  # too narrow for both lungs
    assert lungs.crop_box((1000, 800), np.array([np.nan, 0.1, 0.9, 0.9])) is None
    film = lungs_film((100, 80), (10, 10, 90, 70))
    assert lungs.crop_to_lungs(film, np.array([0.4, 0.4, 0.5, 0.5])) is film
    assert lungs.crop_to_lungs(film, np.array([0.1, 0.125, 0.9, 0.875]), margin=0.0).size == (80, 60)


def test_a_checkpoint_of_another_role_is_not_taken_for_the_box_model(tmp_path: Path) -> None:
    # `train classifier`'s checkpoint has the box model's input and four outputs: its probabilities
    # were read as boxes and the tree written "cut", every film kept whole, with exit 0
    import keras

    from cxrbatch.errors import UsageError

    inputs = keras.Input((32, 32, 1), name="image")
    head = keras.layers.Dense(4, activation="softmax", name="head")(keras.layers.Flatten()(inputs))
    for role in ("classifier", "lungs"):
        keras.Model(inputs, head, name=f"cxrbatch_{role}").save(tmp_path / f"{role}.keras")
    with pytest.raises(UsageError, match=r"classifier\.keras is the model cxrbatch_classifier, not .*lungs train"):
        lungs.load_box_model(tmp_path / "classifier.keras")
    assert lungs.load_box_model(tmp_path / "lungs.keras").name == "cxrbatch_lungs"


def test_lungs_train_refuses_a_seed_numpy_cannot_take(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    for seed in ("-1", str(2**32)):  # it was numpy's traceback, exit 1
        args = ["lungs", "train", "--mirrors", str(tmp_path), "--out", str(tmp_path / "l.keras"), "--seed", seed]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "--seed" in result.stderr and not (tmp_path / "l.keras").exists()


@pytest.fixture(scope="module")
def box_mirrors(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, str]]]:
    """A JSRT-like repository (films and left/right lung masks) and a COCO lung-box repository."""
    root = tmp_path_factory.mktemp("mirrors")
    rng = np.random.default_rng(0)
    jsrt: dict[str, bytes] = {}
    coco_files: dict[str, bytes] = {}
    images, annotations = [], []
    for i in range(24):
        left, top = int(rng.integers(10, 40)), int(rng.integers(10, 40))
        right, bottom = int(rng.integers(160, 190)), int(rng.integers(150, 190))
        film = lungs_film((200, 200), (left, top, right, bottom))
        name = f"JPCNN{i:03d}"
        jsrt[f"JSRT/jsrt_images/images/{name}.IMG.png"] = png(film)
        for side, (x0, x1) in {"right": (left, 100), "left": (100, right)}.items():
            mask = np.zeros((100, 100), dtype=np.uint8)  # masks are half the film's size, as JSRT's are
            mask[top // 2 : bottom // 2, x0 // 2 : x1 // 2] = 255
            jsrt[f"JSRT/masks/masks/{side}_lung_png/{name}.png"] = png(Image.fromarray(mask, mode="L"))
        coco_files[f"images/f{i}.png"] = png(film)
        images.append({"id": i, "file_name": f"f{i}.png", "width": 200, "height": 200, "metadata": {"patientid": i}})
        annotations += [
            {"image_id": i, "bbox": [left, top, 100 - left, bottom - top]},
            {"image_id": i, "bbox": [100, top, right - 100, bottom - top]},
        ]
    coco_files["images/bad.png"] = b"not an image"  # listed with its boxes, unreadable: skipped, never fatal
    images.append({"id": 99, "file_name": "bad.png", "width": 200, "height": 200})
    annotations += [{"image_id": 99, "bbox": [10, 10, 80, 150]}, {"image_id": 99, "bbox": [100, 10, 80, 150]}]
    coco_files["annotations/annotations.json"] = json.dumps({"images": images, "annotations": annotations}).encode()
    sources = {
        "jsrt": {"repo": "t/jsrt", "commit": make_repo(root, "t/jsrt", jsrt)},
        "ieee8023": {"repo": "t/boxes", "commit": make_repo(root, "t/boxes", coco_files)},
    }
    return root, sources


def test_box_films_are_read_from_both_mirrors(box_mirrors: tuple[Path, dict[str, dict[str, str]]]) -> None:
    root, sources = box_mirrors
    films, readers = lungs.read_box_films(root, sources)
    for files in readers.values():
        files.close()
    assert sorted({f.source for f in films}) == ["ieee8023", "jsrt"] and len(films) == 49
    jsrt = {f.path: f.box for f in films if f.source == "jsrt"}
    coco = {f.path.replace("images/f", ""): f.box for f in films if f.source == "ieee8023" and "bad" not in f.path}
    for i in range(24):  # the same film's box from its masks and from its COCO boxes
        assert jsrt[f"JSRT/jsrt_images/images/JPCNN{i:03d}.IMG.png"] == pytest.approx(coco[f"{i}.png"], abs=0.011)


def test_trained_box_model_and_the_cropped_tree(
    box_mirrors: tuple[Path, dict[str, dict[str, str]]], tmp_path: Path
) -> None:
    root, sources = box_mirrors
    model, record = lungs.train_box_model(root, None, views=2, epochs=2, sources=sources)
    assert sum(record["films"].values()) == 48 and record["skipped"] == ["images/bad.png"] and record["views"] == 2
    per_source = record["val"]["per_source"].values()  # the split's IoU is its films' mean, source by source
    weighted = sum(s["films"] * s["mean_iou"] for s in per_source) / sum(s["films"] for s in per_source)
    assert record["val"]["mean_iou"] == pytest.approx(weighted, abs=1e-3)
    boxes = lungs.lung_box(model, [lungs_film((200, 200), (20, 20, 180, 180))])
    assert boxes.shape == (1, 4) and np.all((boxes >= 0) & (boxes <= 1))

    data = tmp_path / "data"
    for split, label, stem in [("train", "NORMAL", "aaa"), ("val", "TUBERCULOSIS", "bbb")]:
        (data / split / label).mkdir(parents=True)
        lungs_film((300, 260), (40, 30, 260, 230)).convert("RGB").save(data / split / label / f"{stem}.jpg")
    (data / "MANIFEST.csv").write_text("id,split,label\naaa,train,NORMAL\nbbb,val,TUBERCULOSIS\n")
    summary = lungs.crop_tree(data, model, tmp_path / "cut")
    assert summary["films"] == 2
    out = tmp_path / "cut"
    assert (out / "MANIFEST.csv").read_bytes() == (data / "MANIFEST.csv").read_bytes()
    with open(out / "lung-boxes.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == ["train/NORMAL/aaa.jpg", "val/TUBERCULOSIS/bbb.jpg"]
    for row in rows:
        cut = load_image((out / row["path"]).with_suffix(".png"))
        box = np.array([float(row[k]) for k in ("left", "top", "right", "bottom")])
        rect = lungs.crop_box((300, 260), box)
        assert row["cut"] == ("no" if rect is None else "yes")
        assert cut.size == ((300, 260) if rect is None else (rect[2] - rect[0], rect[3] - rect[1]))
        assert summary["kept_whole"] == sum(r["cut"] == "no" for r in rows)
    with pytest.raises(Exception, match="exists"):
        lungs.crop_tree(data, model, out)
    # what would have cut a tree into itself, lost a film, or read another model's outputs as boxes
    from cxrbatch.errors import UsageError

    with pytest.raises(UsageError, match="lies inside"):
        lungs.crop_tree(data, model, data / "test" / "CUT")
    lungs_film((300, 260), (40, 30, 260, 230)).save(data / "train" / "NORMAL" / "aaa.png")  # aaa.jpg's twin
    with pytest.raises(UsageError, match=r"would be cut to one PNG: train/NORMAL/aaa.png"):
        lungs.crop_tree(data, model, tmp_path / "cut2")
    (data / "train" / "NORMAL" / "aaa.png").write_bytes(b"not a film")
    (data / "train" / "NORMAL" / "aaa.jpg").unlink()
    with pytest.raises(UsageError, match=r"aaa\.png cannot be read"):
        lungs.crop_tree(data, model, tmp_path / "cut2")
    assert not (tmp_path / "cut2").exists() and not (tmp_path / ".cut2.partial").exists()  # a rerun may use it
    import keras

    four_classes = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3, activation="softmax")])
    with pytest.raises(UsageError, match="gives 3 values per film, not a lung box's 4"):
        lungs.crop_tree(data, four_classes, tmp_path / "cut2")
    with pytest.raises(UsageError, match="is not a Keras model"):
        lungs.load_box_model(data / "MANIFEST.csv")
