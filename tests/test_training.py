"""Training recipes through the CLI on tiny blob datasets (needs the export extra), and the
operator mistakes `train` reports in one line."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY_TRAINING, blob_dataset
from PIL import Image, ImageOps
from typer.testing import CliRunner

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")
pytest.importorskip("tf2onnx", reason="the export extra (tf2onnx) is not installed")

from cxrbatch.cli import app
from cxrbatch.errors import UsageError
from cxrbatch.extras import export_module

pytestmark = pytest.mark.export
runner = CliRunner()
TINY = TINY_TRAINING
CLASSES = {"DARK": (False, False), "LIGHT": (True, False)}
SPLITS = ("train", "val", "test")


def test_checkpoint_sidecar_has_sorted_labels_and_config(exported: dict[str, Path]) -> None:
    summary = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    assert summary["labels"] == ["DARK", "LIGHT"]
    assert summary["config"]["alpha"] == 0.35 and summary["input"]["height"] == 32
    default = export_module("config").DEFAULTS[
        "classifier"
    ]  # options not given on the command line keep the role's defaults
    assert summary["config"]["cache_layer"] == default.cache_layer and summary["config"]["lr2"] == default.lr2
    assert summary["data"]["train"] == {"DARK": 12, "LIGHT": 12}
    gate = json.loads((exported["work"] / "gate.keras.json").read_text(encoding="utf-8"))
    assert gate["labels"] == ["NOT_XRAY", "XRAY"] and 0 < gate["threshold"] <= 0.5
    assert gate["positive_label"] == "XRAY" and summary["negative_label"] == "DARK"
    import PIL
    import tensorflow as tf

    made = summary["made_with"]  # what a bit-for-bit rerun needs the same of
    assert (made["tensorflow"], made["numpy"], made["pillow"]) == (tf.__version__, np.__version__, PIL.__version__)
    assert made["keras"] and made["python"].count(".") == 2 and "cores)" in made["cpu"]


def test_leave_source_out_training_with_source_alignment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = export_module("cache")
    framing: set[tuple[float, float]] = set()
    real_augment = cache.augment

    def recorded(img: Image.Image, rng: np.random.Generator, zoom_out: float, crop_area: float) -> Image.Image:
        framing.add((zoom_out, crop_area))
        return real_augment(img, rng, zoom_out, crop_area)

    monkeypatch.setattr(cache, "augment", recorded)
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=30, split_ids=True)
    rows = ["id,source"] + [f"{s}-{c}_{i},src{i % 3}" for s in SPLITS for c in ("DARK", "LIGHT") for i in range(30)]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ckpt = tmp_path / "clf.keras"
    args = ["train", "classifier", str(data), "--out", str(ckpt), *TINY, "--views", "2", "--zoom-out", "0.8"]
    args += ["--negative-label", "DARK"]
    args += ["--crop-area", "0.5", "--lr2", "2e-4", "--label-smoothing", "0.1"]
    result = runner.invoke(app, [*args, "--source-alignment", "1.0", "--exclude-source", "src2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "clf.keras.json").read_text(encoding="utf-8"))
    assert summary["data"]["train"] == {"DARK": 20, "LIGHT": 20} and summary["data"]["val"] == {"DARK": 20, "LIGHT": 20}
    assert summary["config"]["exclude_sources"] == ["src2"] and summary["config"]["source_alignment"] == 1.0
    assert summary["config"]["lr2"] == 2e-4 and summary["config"]["label_smoothing"] == 0.1
    assert framing == {(0.8, 0.5)}  # the framing options reach every augmented view
    assert summary["source_alignment"] == {"DARK": ["src0", "src1"], "LIGHT": ["src0", "src1"]}
    # train images per (source, label), the left-out src2 absent: 10 of each class from src0 and src1
    sources = summary["sources"]
    assert {s["source"] for s in sources} == {"src0", "src1"}
    assert [(s["source"], s["label"], s["train"]) for s in sources] == [
        ("src0", "DARK", 10), ("src0", "LIGHT", 10), ("src1", "DARK", 10), ("src1", "LIGHT", 10)
    ]  # fmt: skip
    onnx_path = tmp_path / "classifier.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(onnx_path), "--check-images", str(data / "val")])
    assert result.exit_code == 0, result.output
    import onnx

    from cxrbatch.models import METADATA_KEY

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props[METADATA_KEY])["training"]["sources"] == sources

    assert {o.name for o in onnx.load(str(onnx_path)).graph.output} == {"scores", "cam"}  # no alignment output


def test_phase_two_records_the_epoch_it_keeps_not_only_the_lowest_val_loss(exported: dict[str, Path]) -> None:
    # Phase 2 stops early on val accuracy and keeps that epoch's weights; the record gave only the
    # lowest val loss of any epoch, which the model card then quoted as the kept model's.
    kept = export_module("training").kept_epoch
    history = {"val_head_accuracy": [0.6, 0.8, 0.8, 0.7], "val_head_loss": [0.9, 0.7, 0.5, 0.4]}
    assert kept(history, "head_") == {
        "phase2_kept_epoch": 2,  # the first of the best accuracy, as Keras keeps it
        "phase2_kept_val_accuracy": 0.8,
        "phase2_kept_val_loss": 0.7,  # not 0.4, the lowest
    }
    summary = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    history_made = summary["history"]
    assert history_made["phase2_kept_epoch"] == 1 and history_made["phase2_epochs"] == 1
    assert history_made["phase2_kept_val_loss"] == history_made["phase2_best_val_loss"]  # one epoch: its own


def test_head_only_training_when_phase_two_has_no_epochs(tmp_path: Path) -> None:
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=6)
    args = ["train", "classifier", str(data), "--out", str(tmp_path / "c.keras"), *TINY[:-2], "--epochs2", "0"]
    args += ["--negative-label", "LIGHT"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c.keras.json").read_text(encoding="utf-8"))
    assert summary["history"]["phase1_epochs"] == 1 and summary["history"]["phase2_epochs"] == 0
    correct = summary["validation"]["val_accuracy"] * 12  # a share of the 12 val films, to 4 decimals
    assert abs(correct - round(correct)) < 12e-4 and 0 <= round(correct) <= 12


def _train(data: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / "c.keras"
    result = runner.invoke(app, ["train", "classifier", str(data), "--out", str(out), *TINY, *extra])
    return result.exit_code, result.stderr


def test_train_reports_operator_mistakes_in_one_line(tmp_path: Path) -> None:
    code, err = _train(tmp_path / "nowhere", tmp_path)
    assert code == 2 and "[error] Data folder not found:" in err
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=2)
    code, err = _train(data, tmp_path, "--negative-label", "DARK", "--exclude-source", "typo")
    assert (
        code == 2 and "[error] No image in the MANIFEST.csv comes from the collection(s) or source(s) ['typo']" in err
    )
    code, err = _train(data, tmp_path)  # the default negative label, NORMAL, is not a class here
    assert code == 2 and "[error] the classifier's negative label 'NORMAL' is not a class of" in err
    code, err = _train(data, tmp_path, "--negative-label", "DARK", "--base-weights", str(tmp_path / "no.h5"))
    assert code == 2 and "[error] Base weights not found:" in err
    for split in ("val", "train"):
        for folder in sorted((data / split).rglob("*"), reverse=True):
            folder.unlink() if folder.is_file() else folder.rmdir()
        (data / split).rmdir()
        code, err = _train(data, tmp_path, "--negative-label", "DARK")
        assert code == 2 and f"[error] {data} has no {split}/ folder" in err
    assert "Traceback" not in err and not (tmp_path / "c.keras").exists()


def test_gate_takes_no_negative_label(tmp_path: Path) -> None:
    data = blob_dataset(tmp_path / "gate", {"NOT_XRAY": (True, True), "XRAY": (False, False)}, per_class=2)
    result = runner.invoke(
        app, ["train", "gate", str(data), "--out", str(tmp_path / "g.keras"), "--negative-label", "XRAY"]
    )
    assert result.exit_code == 2 and "[error] only the classifier has a negative label" in result.stderr


def test_gate_takes_no_label_smoothing(tmp_path: Path) -> None:
    # the gate's loss has none: it trained without it, and its metadata said label_smoothing 0.1
    data = blob_dataset(tmp_path / "gate", {"NOT_XRAY": (True, True), "XRAY": (False, False)}, per_class=2)
    out = tmp_path / "g.keras"
    result = runner.invoke(app, ["train", "gate", str(data), "--out", str(out), *TINY, "--label-smoothing", "0.1"])
    assert result.exit_code == 2 and "[error] only the classifier takes a label smoothing" in result.stderr
    assert not out.exists()


def test_the_same_seed_gives_the_same_views(tmp_path: Path) -> None:
    cache = export_module("cache")
    config = export_module("config").DEFAULTS["classifier"]
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=1)
    path = next((data / "train" / "DARK").iterdir())
    spec = config.input_spec()
    first, again = (cache.views_of(path, spec, 11, 3, config) for _ in range(2))
    assert first.shape == (3, 224, 224, 1) and np.array_equal(first, again)
    assert not np.array_equal(first[1], first[2])  # two different augmented views
    assert np.array_equal(cache.views_of(path, spec, 12, 0, config)[0], first[0])  # the clean view first


def test_leave_one_collection_out_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    classes = {"DARK": (False, False), "LIGHT": (True, False), "VIVID": (True, True)}
    data = blob_dataset(tmp_path / "cxr", classes, per_class=6, split_ids=True)
    # DARK and LIGHT come from two collections each, VIVID from a third only
    collection = {
        "DARK": lambda i: f"col{'AB'[i % 2]}",
        "LIGHT": lambda i: f"col{'AB'[i % 2]}",
        "VIVID": lambda i: "colC",
    }
    rows = ["id,source,collection"] + [
        f"{s}-{c}_{i},repo,{collection[c](i)}" for s in SPLITS for c in classes for i in range(6)
    ]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    args = ["loco", str(data), "--json", str(tmp_path / "loco.json"), "--size", "32", "--alpha", "0.35"]
    args += ["--views", "2", "--epochs1", "2", "--negative-label", "DARK", "--features-cache", str(tmp_path / "f.npz")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "loco.json").read_text(encoding="utf-8"))
    assert list(record["folds"]) == ["colA", "colB"]  # VIVID's only collection is no fold
    for fold in ("colA", "colB"):
        result_of = record["folds"][fold]
        assert result_of["trained_on"] == 6 + 6  # train: 3 DARK, 3 LIGHT of the other collection, 6 VIVID
        assert result_of["n"] == 3 * 6  # every split's DARK and LIGHT films of the left-out collection
        dark, light = result_of["by_class"]["DARK"], result_of["by_class"]["LIGHT"]
        assert dark["n"] == light["n"] == 9 and dark["recall"] == dark["called_DARK"]
        assert 0.0 <= light["auc_vs_DARK"] <= 1.0 and "auc_vs_DARK" not in dark
    assert "colA" in result.output and "LIGHT" in result.output

    # the features are kept and reused: a second study computes none and gives the same record
    monkeypatch.setattr(export_module("loco"), "cache_activations", lambda *a, **k: pytest.fail("features again"))
    again = runner.invoke(app, [*args[:3], str(tmp_path / "again.json"), *args[4:], "--fold", "colC"])
    assert again.exit_code == 0, again.output
    skipped = json.loads((tmp_path / "again.json").read_text(encoding="utf-8"))["folds"]
    assert skipped == {"colC": {"skipped": "without it, no training image of ['VIVID']"}}
    # a tree that grew by one image: only that image's features are computed
    computed: list[int] = []
    real = export_module("cache").cache_activations

    def counted(model, split, *rest, **kw):  # type: ignore[no-untyped-def]
        computed.append(len(split.paths))
        return real(model, split, *rest, **kw)

    monkeypatch.setattr(export_module("loco"), "cache_activations", counted)
    Image.open(data / "train" / "DARK" / "train-DARK_0.png").rotate(90).save(data / "train" / "DARK" / "DARK_new.png")
    (data / "MANIFEST.csv").write_text("\n".join([*rows, "DARK_new,repo,colA"]) + "\n", encoding="utf-8")
    grown = runner.invoke(app, args)
    assert grown.exit_code == 0, grown.output
    assert computed == [1]
    assert json.loads((tmp_path / "loco.json").read_text(encoding="utf-8"))["folds"]["colB"]["trained_on"] == 13
    assert "54 reused, 1 computed (0 of them of a film that changed" in grown.stderr
    # a film changed under its id (a lung-cut tree keeps the ids): its features are computed again
    ImageOps.invert(Image.open(data / "val" / "LIGHT" / "val-LIGHT_2.png").convert("RGB")).save(
        data / "val" / "LIGHT" / "val-LIGHT_2.png"
    )
    changed = runner.invoke(app, args)
    assert changed.exit_code == 0 and computed == [1, 1], changed.output
    assert "54 reused, 1 computed (1 of them of a film that changed" in changed.stderr
    # a colC film in one cluster with a colA film (a copy under another collection's name): the
    # head without colA must not train on it
    clusters = ["id,source,collection,cluster"] + [f"{r},k{r.split(',')[0]}" for r in [*rows[1:], "DARK_new,repo,colA"]]
    moved = {f"{split}-VIVID_0" for split in SPLITS}
    clusters = [c.rsplit(",", 1)[0] + ",ktrain-DARK_0" if c.split(",")[0] in moved else c for c in clusters]
    (data / "MANIFEST.csv").write_text("\n".join(clusters) + "\n", encoding="utf-8")
    assert runner.invoke(app, args).exit_code == 0
    folds = json.loads((tmp_path / "loco.json").read_text(encoding="utf-8"))["folds"]
    # (the VIVID_0 films of every split share train-DARK_0's cluster: train's and val's are left out)
    assert (folds["colA"]["trained_on"], folds["colA"]["left_out_by_cluster"]) == (11, 2)
    assert (folds["colB"]["trained_on"], folds["colB"]["left_out_by_cluster"]) == (13, 0)
    unknown = runner.invoke(app, [*args, "--fold", "colZ"])
    assert unknown.exit_code == 2 and "collection(s) ['colZ']" in unknown.stderr


def test_study_with_a_second_tree_puts_each_films_features_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    classes = {"DARK": (False, False), "LIGHT": (True, False)}
    data = blob_dataset(tmp_path / "cxr", classes, per_class=4, split_ids=True)
    rows = ["id,source,collection"] + [
        f"{s}-{c}_{i},repo,col{'AB'[i % 2]}" for s in SPLITS for c in classes for i in range(4)
    ]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    other = tmp_path / "cut"  # the same films by id, otherwise made (here: cut and saved as JPEG)
    for path in data.glob("*/*/*.png"):
        target = other / path.relative_to(data).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img.crop((2, 2, img.width - 2, img.height - 2)).convert("RGB").save(target)
    widths: list[int] = []
    loco = export_module("loco")
    real = loco.fit_head

    def fit(head, config, train, val):  # type: ignore[no-untyped-def]
        widths.append(train[0].shape[-1])
        return real(head, config, train, val)

    monkeypatch.setattr(loco, "fit_head", fit)
    args = ["loco", str(data), "--json", str(tmp_path / "loco.json"), "--size", "32", "--alpha", "0.35"]
    args += ["--views", "2", "--epochs1", "1", "--negative-label", "DARK", "--fold", "colA"]
    alone = runner.invoke(app, args)
    both = runner.invoke(app, [*args, "--with", str(other), "--with-features-cache", str(tmp_path / "cut.npz")])
    assert alone.exit_code == 0 and both.exit_code == 0, both.output
    assert widths == [1280, 2560]
    assert json.loads((tmp_path / "loco.json").read_text(encoding="utf-8"))["with"] == "cut"
    assert (tmp_path / "cut.npz").is_file()
    next(other.glob("train/DARK/*.jpg")).unlink()
    short = runner.invoke(app, [*args, "--with", str(other)])
    assert short.exit_code == 2 and "lacks 1 film(s)" in short.stderr
    lone = runner.invoke(app, [*args, "--with-features-cache", str(tmp_path / "x.npz")])
    assert lone.exit_code == 2 and "needs --with" in lone.stderr


def test_train_refuses_before_training_what_would_fail_or_mislead_after_it(tmp_path: Path) -> None:
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=2)
    (tmp_path / "s.keras.json").mkdir()  # the sidecar's place: refused before, not after, the training
    outs = ((tmp_path / "runs", "is a folder"), (tmp_path / "c.onnx", "must name a .keras file"))
    for out, message in (*outs, (tmp_path / "s.keras", "--out's sidecar " + str(tmp_path / "s.keras.json"))):
        (tmp_path / "runs").mkdir(exist_ok=True)
        result = runner.invoke(
            app, ["train", "classifier", str(data), "--out", str(out), *TINY, "--negative-label", "DARK"]
        )
        assert result.exit_code == 2 and message in result.stderr
    inside = data / "train" / "DARK" / "c.keras"
    result = runner.invoke(
        app, ["train", "classifier", str(data), "--out", str(inside), *TINY, "--negative-label", "DARK"]
    )
    assert result.exit_code == 2 and "lies inside" in result.stderr
    seeds = (("--seed", "-1"), ("--seed", str(2**32)))  # numpy takes 0 .. 2**32 - 1: it was a traceback
    for option, value in (("--views", "0"), ("--epochs1", "0"), ("--size", "16"), ("--alpha", "0"), *seeds):
        code, err = _train(data, tmp_path, "--negative-label", "DARK", option, value)
        assert code == 2 and "[error] cannot train with" in err and option[2:] in err
    not_weights = next((data / "test" / "DARK").iterdir())
    code, err = _train(data, tmp_path, "--negative-label", "DARK", "--base-weights", str(not_weights))
    assert code == 2 and "cannot be loaded into MobileNetV2 of width 0.35" in err
    (data / "train" / "EMPTY").mkdir()  # a class folder with no film: not a three-class model in silence
    code, err = _train(data, tmp_path, "--negative-label", "DARK")
    assert code == 2 and "class folder(s) ['EMPTY'] hold no image" in err
    (data / "train" / "EMPTY").rmdir()
    film = next((data / "train" / "DARK").iterdir())
    film.write_bytes(b"not an image")
    code, err = _train(data, tmp_path, "--negative-label", "DARK")
    assert code == 2 and f"training film {film} cannot be read" in err
    assert "Traceback" not in err and not (tmp_path / "c.keras").exists()


def test_a_checkpoint_that_cannot_be_saved_leaves_the_last_one_and_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Keras writes the .keras file in place: a full disk at the end of the training was a traceback,
    # a truncated checkpoint, and the last run's checkpoint lost (its sidecar kept beside the bytes)
    import keras

    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=2)
    out = tmp_path / "runs" / "c.keras"
    out.parent.mkdir()
    out.write_bytes(b"the last run's checkpoint")
    (tmp_path / "runs" / "c.keras.json").write_text('{"the last run": 1}')

    def full_disk(model: keras.Model, filepath: str | Path, **kwargs: object) -> None:
        with open(filepath, "wb") as fh:
            fh.write(b"PK part of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", full_disk)
    code, err = _train(data, tmp_path / "runs", "--negative-label", "DARK")
    assert code == 1 and f"[error] Cannot write checkpoint {out}: No space left on device" in err
    assert "Traceback" not in err and out.read_bytes() == b"the last run's checkpoint"
    assert (tmp_path / "runs" / "c.keras.json").read_text() == '{"the last run": 1}'
    assert sorted(p.name for p in out.parent.iterdir()) == ["c.keras", "c.keras.json"]  # nothing half-written


def test_a_val_split_without_a_class_is_refused_saying_whether_a_left_out_source_emptied_it(tmp_path: Path) -> None:
    classes = {"DARK": (False, False), "LIGHT": (True, False), "VIVID": (True, True)}
    data = blob_dataset(tmp_path / "cxr", classes, per_class=2, split_ids=True)
    # every collection has films of every class, but colV holds the only val VIVID films
    rows = ["id,source,collection"] + [
        f"{s}-{c}_{i},repo,{'colV' if (s, c) == ('val', 'VIVID') else 'colA'}"
        for s in ("train", "val", "test")
        for c in classes
        for i in range(2)
    ]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    training, config = export_module("training"), export_module("config").DEFAULTS["classifier"]
    config = replace(config, negative_label="DARK")
    with pytest.raises(UsageError, match=r"judged on val: .* has no film of \['VIVID'\] once \['colV'\] are left out"):
        training.load_data(data, replace(config, exclude_sources=("colV",)))
    for film in (data / "val" / "VIVID").iterdir():
        film.unlink()
    (data / "val" / "VIVID").rmdir()
    code, err = _train(data, tmp_path, "--negative-label", "DARK")
    assert code == 2 and f"[error] the classifier is judged on val: {data / 'val'} has no film of ['VIVID']\n" in err


def test_unreadable_val_and_late_train_films_are_refused_before_any_model_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=3)
    late = [sorted((data / split / "LIGHT").iterdir())[-1] for split in ("train", "val")]
    late[0].write_bytes(b"not an image")
    late[1].write_bytes(b"")
    monkeypatch.setattr(export_module("training"), "build_model", lambda *a, **k: pytest.fail("a model was built"))
    code, err = _train(data, tmp_path, "--negative-label", "DARK")
    assert code == 2 and "[error] 2 training films cannot be read: " in err
    assert f"{late[0]} (" in err and f"{late[1]} (" in err and "Traceback" not in err


def test_the_gate_scores_its_xray_folder_whatever_the_folders_order(tmp_path: Path) -> None:
    two = blob_dataset(tmp_path / "g", {"CXR": (False, False), "PHOTO": (True, True)}, per_class=2)
    result = runner.invoke(app, ["train", "gate", str(two), "--out", str(tmp_path / "g.keras"), *TINY])
    assert result.exit_code == 2 and "needs two class folders, XRAY and one other" in result.stderr
    # XRAY sorts first here: its films are still the sigmoid's positives
    data = blob_dataset(tmp_path / "gate", {"XRAY": (False, False), "ZPHOTO": (True, True)}, per_class=4)
    split = export_module("training").load_data(data, export_module("config").DEFAULTS["gate"])[0]
    positives = export_module("training").positives(split, export_module("config").DEFAULTS["gate"])
    assert split.classes == ("XRAY", "ZPHOTO") and positives.tolist() == (split.labels == 0).tolist()
    assert positives.sum() == 4


def test_studies_refuse_before_the_work_what_would_overwrite_their_tree_or_measure_nothing(tmp_path: Path) -> None:
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=2, split_ids=True)
    manifest = data / "MANIFEST.csv"
    rows = "".join(f"{s}-{c}_{i},s{i}\n" for s in SPLITS for c in CLASSES for i in range(2))
    manifest.write_text("id,source\n" + rows, encoding="utf-8")
    before = manifest.read_bytes()
    args = ["--size", "32", "--alpha", "0.35", "--views", "1", "--epochs1", "1", "--negative-label", "DARK"]
    result = runner.invoke(app, ["loco", str(data), "--json", str(manifest), *args])
    assert result.exit_code == 2 and "lies inside" in result.stderr and manifest.read_bytes() == before
    film = next((data / "test" / "DARK").iterdir())
    result = runner.invoke(app, ["evaluate", str(data), "--json", str(film)])
    assert result.exit_code == 2 and "lies inside" in result.stderr and film.read_bytes()[:4] == b"\x89PNG"
    result = runner.invoke(app, ["loco", str(data), "--json", str(tmp_path / "l.json"), *args, "--fold", "nowhere"])
    assert result.exit_code == 2 and "comes from the collection(s) ['nowhere']" in result.stderr
    manifest.write_text("id,source\n", encoding="utf-8")  # no film names a collection: no fold to study
    result = runner.invoke(app, ["loco", str(data), "--json", str(tmp_path / "l.json"), *args])
    assert result.exit_code == 2 and "no collection to leave out" in result.stderr
    assert not (tmp_path / "l.json").exists()


def test_a_study_refuses_films_that_share_an_id(tmp_path: Path) -> None:
    # its features are kept by id: val/DARK/DARK_0.png and test/DARK/DARK_0.png took one film's
    data = blob_dataset(tmp_path / "cxr", CLASSES, per_class=2)
    (data / "MANIFEST.csv").write_text("id,source,collection\nother,repo,colA\n", encoding="utf-8")
    args = ["--size", "32", "--alpha", "0.35", "--views", "1", "--epochs1", "1", "--negative-label", "DARK"]
    result = runner.invoke(app, ["loco", str(data), "--json", str(tmp_path / "l.json"), *args, "--fold", "colA"])
    shared = f"{Path('train/DARK/DARK_0.png')} and {Path('val/DARK/DARK_0.png')}"
    assert result.exit_code == 2 and "films share an id (the file stem)" in result.stderr
    assert shared in result.stderr and "and 5 more; give each film a name of its own" in result.stderr


def test_the_features_cache_is_kept_apart_for_other_starting_weights_and_versions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loco, config = export_module("loco"), export_module("config").DEFAULTS["classifier"]
    one, other = tmp_path / "a.weights.h5", tmp_path / "b.weights.h5"
    one.write_bytes(b"weights one")
    other.write_bytes(b"weights two")
    keys = [loco._feature_key(config, weights) for weights in (None, one, other)]
    assert keys[0]["base_weights_sha256"] is None and len({json.dumps(k) for k in keys}) == 3
    # a film decoded or augmented otherwise gives other features: neither version's rows are reused
    import cxrbatch.imaging

    monkeypatch.setattr(cxrbatch.imaging, "PREPROCESSING_VERSION", cxrbatch.imaging.PREPROCESSING_VERSION + 1)
    keys.append(loco._feature_key(config, None))
    augment = export_module("augment")
    monkeypatch.setattr(augment, "AUGMENTATION_VERSION", augment.AUGMENTATION_VERSION + 1)
    keys.append(loco._feature_key(config, None))
    assert len({json.dumps(k) for k in keys}) == 5
    # a cache made before its rows carried their film's hash is computed again, not read
    old = tmp_path / "old.npz"
    np.savez(old, key=np.asarray(json.dumps(keys[-1])), views_ids=np.asarray(["a"]), views=np.zeros((1, 2, 4)),
             clean_ids=np.asarray(["b"]), clean=np.zeros((1, 1, 4)))  # fmt: skip
    assert loco._read_cache(old, keys[-1]) == {"views": {}, "clean": {}}
