"""Labelled trees, manifests and source selection: the one reader of training and evaluation data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image

from cxrbatch.datasets import (
    class_names,
    labelled_images,
    left_out,
    load_split,
    only_sources,
    read_manifest,
    sources_of,
    without_sources,
)
from cxrbatch.errors import UsageError


def _tree(root: Path, classes: tuple[str, ...] = ("DARK", "LIGHT"), per_class: int = 4) -> Path:
    for split in ("train", "val"):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                grey_image(folder / f"{split}-{name}_{i}.png", 20 + i)
    return root


def test_labelled_images_from_folders_and_from_manifest(tmp_path: Path) -> None:
    (tmp_path / "test" / "NORMAL").mkdir(parents=True)
    grey_image(tmp_path / "test" / "NORMAL" / "n1.png", 110)
    images = labelled_images(tmp_path, "test")
    assert [p.name for p in images.paths] == ["n1.png"] and images.names() == ["NORMAL"]
    flat = tmp_path / "flat"
    flat.mkdir()
    grey_image(flat / "abc.png", 20)
    grey_image(flat / "unlisted.png", 20)
    (flat / "MANIFEST.csv").write_text("id,file,label\nabc,abc.png,COVID19\n", encoding="utf-8")
    images = labelled_images(flat, "test")
    assert [p.name for p in images.paths] == ["abc.png"] and images.names() == ["COVID19"]
    with pytest.raises(UsageError, match="No labelled images"):
        labelled_images(tmp_path / "test" / "NORMAL", None)
    with pytest.raises(UsageError, match="Evaluation folder not found"):
        labelled_images(tmp_path / "nowhere", "test")


def test_all_joins_every_split_present(tmp_path: Path) -> None:
    _tree(tmp_path, per_class=2)
    images = labelled_images(tmp_path, "all")
    assert len(images.paths) == 8 and {p.parent.parent.name for p in images.paths} == {"train", "val"}
    assert images.counts() == {"DARK": 4, "LIGHT": 4}


def test_training_split_lists_classes_in_sorted_order(tmp_path: Path) -> None:
    _tree(tmp_path, ("LIGHT", "DARK", ".hidden"))
    classes = class_names(tmp_path)
    assert classes == ("DARK", "LIGHT")
    split = load_split(tmp_path, "val", classes)
    assert split.labels.tolist() == [0] * 4 + [1] * 4
    assert [p.name for p in split.paths[:2]] == ["val-DARK_0.png", "val-DARK_1.png"]
    assert split.counts() == {"DARK": 4, "LIGHT": 4}


def test_operator_mistakes_in_a_training_tree_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="Data folder not found"):
        class_names(tmp_path / "nowhere")
    with pytest.raises(UsageError, match=r"has no train/ folder"):
        class_names(tmp_path)
    _tree(tmp_path / "one", ("ONLY",))
    with pytest.raises(UsageError, match="at least two classes"):
        class_names(tmp_path / "one")
    data = _tree(tmp_path / "cxr")
    (data / "val" / "EXTRA").mkdir()
    grey_image(data / "val" / "EXTRA" / "x.png", 90)
    with pytest.raises(UsageError, match=r"class\(es\) \['EXTRA'\] that train/ has not"):
        load_split(data, "val", class_names(data))
    with pytest.raises(UsageError, match=r"has no test/ folder"):
        load_split(data, "test", class_names(data))
    _tree(tmp_path / "read", ("ABNORMAL", "NORMAL"))  # a site's normal/abnormal reads: no class to learn
    with pytest.raises(UsageError, match="ABNORMAL holds films of no named class: they can calibrate and evaluate"):
        class_names(tmp_path / "read")


def test_a_class_missing_from_val_counts_zero(tmp_path: Path) -> None:
    data = _tree(tmp_path)
    for path in (data / "val" / "LIGHT").iterdir():
        path.unlink()
    split = load_split(data, "val", class_names(data))
    assert split.counts() == {"DARK": 4, "LIGHT": 0}


def test_manifest_sources(tmp_path: Path) -> None:
    assert read_manifest(tmp_path) == {}
    (tmp_path / "MANIFEST.csv").write_text("id,source\na,src-a\nb,\n", encoding="utf-8")
    manifest = read_manifest(tmp_path)
    assert manifest["a"]["source"] == "src-a"
    assert sources_of([Path("x/a.png"), Path("b.jpg"), Path("c.png")], manifest) == ["src-a", "", ""]


def test_without_and_only_sources_select_by_manifest_source(tmp_path: Path) -> None:
    data = _tree(tmp_path)
    manifest = {
        f"train-{c}_{i}": {"source": "left-out" if i == 0 else "kept"} for c in ("DARK", "LIGHT") for i in range(4)
    }
    split = load_split(data, "train", class_names(data))
    kept = without_sources(split, manifest, ("left-out",))
    assert sorted(p.stem for p in kept.paths) == [f"train-{c}_{i}" for c in ("DARK", "LIGHT") for i in (1, 2, 3)]
    assert kept.counts() == {"DARK": 3, "LIGHT": 3} and kept.classes == split.classes
    assert without_sources(split, manifest, ()) is split
    only = only_sources(split, manifest, ("left-out",))
    assert [p.stem for p in only.paths] == ["train-DARK_0", "train-LIGHT_0"]
    assert np.array_equal(only.labels, [0, 1])
    with pytest.raises(UsageError, match=r"comes from the collection\(s\) or source\(s\) \['typo'\]"):
        without_sources(split, manifest, ("typo",))
    with pytest.raises(UsageError, match="from the collection"):
        only_sources(split, manifest, ("typo",))
    val = load_split(data, "val", split.classes)  # its images are not in the manifest at all
    with pytest.raises(UsageError, match="No image of this selection"):
        only_sources(val, manifest, ("kept",))


def test_leaving_a_collection_out_leaves_out_its_clusters_in_every_collection(tmp_path: Path) -> None:
    # The curated Kaggle set holds re-encoded Kermany films: a fold "without kermany" trained on
    # them under the other collection's name, then was scored on kermany as a collection it never saw.
    data = _tree(tmp_path)
    manifest = {
        f"train-{c}_{i}": {"source": "repo/x", "collection": "kept", "cluster": f"k{c}{i}"}
        for c in ("DARK", "LIGHT")
        for i in range(4)
    }
    manifest["train-DARK_0"].update(collection="kermany")
    manifest["train-LIGHT_0"].update(collection="kermany", source="repo/k")
    manifest["train-DARK_1"].update(cluster="kDARK0")  # a copy of kermany's film, in "kept"
    manifest["val-copy"] = {"source": "repo/x", "collection": "kept", "cluster": "kLIGHT0"}  # its cluster: other split
    split = load_split(data, "train", class_names(data))
    assert left_out(split.paths, manifest, ("kermany",)).tolist() == [
        True,
        True,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    kept = without_sources(split, manifest, ("kermany",))
    assert sorted(p.stem for p in kept.paths) == ["train-DARK_2", "train-DARK_3"] + [
        f"train-LIGHT_{i}" for i in (1, 2, 3)
    ]
    # only_sources scores the collection's own films, copies elsewhere are not its films
    assert [p.stem for p in only_sources(split, manifest, ("kermany",)).paths] == ["train-DARK_0", "train-LIGHT_0"]
    # a repository's name selects its films too (`data select --exclude-source repo/k`)
    assert [p.stem for p in only_sources(split, manifest, ("repo/k",)).paths] == ["train-LIGHT_0"]
    assert len(without_sources(split, manifest, ("repo/k",)).paths) == 7
    # a name that is one rows' collection and other rows' repository is refused, not guessed
    clash = {**manifest, "val-x": {"source": "kermany", "collection": "other"}}
    with pytest.raises(UsageError, match=r"names a collection of the MANIFEST\.csv and the source of other rows"):
        without_sources(split, clash, ("kermany",))
    # without a cluster column nothing more is left out than the collection's own films
    bare = {k: {"collection": v["collection"]} for k, v in manifest.items()}
    assert len(without_sources(split, bare, ("kermany",)).paths) == 6


def test_a_manifest_saved_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    (tmp_path / "MANIFEST.csv").write_text("id,label,collection\nabc,NORMAL,site-a\n", encoding="utf-8-sig")
    assert read_manifest(tmp_path) == {"abc": {"id": "abc", "label": "NORMAL", "collection": "site-a"}}


def test_a_manifest_without_ids_or_with_an_id_twice_is_refused(tmp_path: Path) -> None:
    # An id twice let one film take another's source; no id column read as no manifest at all.
    (tmp_path / "MANIFEST.csv").write_text("id,label,source\nabc,NORMAL,a/one\nabc,NORMAL,evil/dup\n", encoding="utf-8")
    with pytest.raises(UsageError, match="lists an id on more than one row: abc"):
        read_manifest(tmp_path)
    (tmp_path / "MANIFEST.csv").write_text("name,label\nabc,NORMAL\n", encoding="utf-8")
    with pytest.raises(UsageError, match="has no `id` column"):
        read_manifest(tmp_path)


def test_a_manifest_id_that_two_films_of_the_tree_bear_is_refused_naming_them(tmp_path: Path) -> None:
    # ids are file stems: val/DARK/x.png and test/LIGHT/x.jpg both took the one row of x
    data = _tree(tmp_path)
    (data / "test" / "LIGHT").mkdir(parents=True)
    grey_image(data / "test" / "LIGHT" / "val-DARK_1.jpg", 200)
    grey_image(data / "test" / "LIGHT" / "unlisted.png", 200)
    grey_image(data / "train" / "LIGHT" / "unlisted.png", 210)
    (data / "MANIFEST.csv").write_text("id,source\nval-DARK_1,a\ntrain-DARK_0,b\n", encoding="utf-8")
    shared = f"{Path('val/DARK/val-DARK_1.png')} and {Path('test/LIGHT/val-DARK_1.jpg')}"
    with pytest.raises(UsageError, match=f"films share an id \\(the file stem\\).*: {re.escape(shared)}; give"):
        read_manifest(data)
    (data / "test" / "LIGHT" / "val-DARK_1.jpg").unlink()  # a stem no row names takes no film's row
    assert set(read_manifest(data)) == {"val-DARK_1", "train-DARK_0"}
    assert len(labelled_images(data, "all").paths) == 18


def test_a_manifest_that_is_not_utf8_csv_is_refused_by_name(tmp_path: Path) -> None:
    # A spreadsheet's Latin-1 export raised UnicodeDecodeError: a traceback, not a message
    (tmp_path / "MANIFEST.csv").write_text("id,source\nn1,Hôpital\n", encoding="latin-1")
    with pytest.raises(UsageError, match=r"MANIFEST\.csv is not UTF-8 text: it must be UTF-8"):
        read_manifest(tmp_path)
    (tmp_path / "MANIFEST.csv").write_text("id,source\nn1," + "x" * 200_000 + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"MANIFEST\.csv cannot be read as CSV \(field larger than field limit"):
        read_manifest(tmp_path)


def test_empty_subfolders_are_no_classes_and_images_beside_class_folders_are_refused(tmp_path: Path) -> None:
    # a flat labelled folder with an empty subfolder lost all its labels ("No labelled images ...")
    flat = tmp_path / "flat"
    (flat / "old").mkdir(parents=True)
    (flat / "notes").mkdir()
    (flat / "notes" / "readme.txt").write_text("not a film", encoding="utf-8")
    grey_image(flat / "abc.png", 20)
    (flat / "MANIFEST.csv").write_text("id,label\nabc,COVID19\n", encoding="utf-8")
    images = labelled_images(flat, "test")
    assert [p.name for p in images.paths] == ["abc.png"] and images.names() == ["COVID19"]
    # images lying directly in a split folder that has class folders were neither scored nor named
    split = tmp_path / "tree" / "test"
    (split / "NORMAL").mkdir(parents=True)
    (split / "PNEUMONIA").mkdir()
    grey_image(split / "NORMAL" / "n.png", 110)
    grey_image(split / "loose.png", 110)
    (split / ".hidden.png").write_bytes(b"")
    (split / "MANIFEST.csv").write_text("id,label\nloose,NORMAL\n", encoding="utf-8")
    with pytest.raises(
        UsageError, match=r"test holds class folders \(NORMAL\) and images beside them, of no class: loose\.png; move"
    ):
        labelled_images(tmp_path / "tree", "test")
    data = _tree(tmp_path / "cxr")  # training reads its splits by the same rule
    grey_image(data / "train" / "stray.png", 20)
    with pytest.raises(UsageError, match=r"train holds class folders \(DARK, LIGHT\) and images beside them"):
        class_names(data)
