"""`cxrbatch data select`: a labelled folder of some of a tree's films, by split and source, as links."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from helpers import grey_image
from typer.testing import CliRunner

from cxrbatch.calibration import labelled_films
from cxrbatch.cli import app
from cxrbatch.databuild.select import select
from cxrbatch.datasets import labelled_images, read_manifest, sources_of
from cxrbatch.errors import UsageError

SOURCES = ("nih", "kermany", "jsrt")


def _tree(root: Path) -> Path:
    """train/ and val/ with NORMAL and PNEUMONIA films; film i of each comes from SOURCES[i % 3] (jsrt: NORMAL only)."""
    rows = ["id,split,label,collection,source,note"]
    for split in ("train", "val"):
        for label in ("NORMAL", "PNEUMONIA"):
            (root / split / label).mkdir(parents=True)
            for i in range(6):
                source = SOURCES[i % 3]
                if source == "jsrt" and label != "NORMAL":
                    continue
                stem = f"{split[0]}{label[0]}{i}"
                grey_image(root / split / label / f"{stem}.png", 20 + 10 * i + 5 * (label != "NORMAL"))  # all different
                rows.append(f'{stem},{split},{label},{source},owner/{source},"a note, with a comma"')
    (root / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def test_select_links_the_films_of_the_chosen_split_and_sources_with_their_manifest_rows(tmp_path: Path) -> None:
    data = _tree(tmp_path / "union")
    out = tmp_path / "val-seen"
    chosen = select(data, "val", out, exclude=("nih",))
    assert chosen.counts() == {"NORMAL": 4, "PNEUMONIA": 2}
    links = sorted(p for p in out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in links] == [
        *(f"NORMAL/vN{i}.png" for i in (1, 2, 4, 5)),
        *(f"PNEUMONIA/vP{i}.png" for i in (1, 4)),
    ]
    for link in links:
        assert link.is_symlink() and link.resolve() == (data / "val" / link.parent.name / link.name).resolve()
    manifest = read_manifest(out)
    assert sorted(manifest) == sorted(p.stem for p in links)
    assert manifest["vN2"] == read_manifest(data)["vN2"]  # every column, quoting kept
    with (out / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        assert next(csv.reader(fh)) == ["id", "split", "label", "collection", "source", "note"]
    # what calibrate and evaluate read from the selection
    films = labelled_films(out, ("COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"))
    assert {label: len(paths) for label, paths in films.items()} == {"NORMAL": 4, "PNEUMONIA": 2}
    read = labelled_images(out, None)
    assert sorted(set(sources_of(read.paths, read_manifest(out)))) == ["jsrt", "kermany"]


def test_only_sources_and_every_split(tmp_path: Path) -> None:
    data = _tree(tmp_path / "union")
    chosen = select(data, "all", tmp_path / "nih-all", only=("nih",))
    assert chosen.counts() == {"NORMAL": 4, "PNEUMONIA": 4}
    assert sorted(p.name for p in (tmp_path / "nih-all").rglob("*.png")) == sorted(
        f"{s}{c}{i}.png" for s in "tv" for c in "NP" for i in (0, 3)
    )
    both = select(data, "train", tmp_path / "both", only=("nih", "jsrt"), exclude=("jsrt",))
    assert sorted(p.stem for p in both.paths) == ["tN0", "tN3", "tP0", "tP3"]


def test_refusals_leave_everything_as_it_was(tmp_path: Path) -> None:
    data = _tree(tmp_path / "union")
    out = tmp_path / "sel"
    select(data, "val", out)
    with pytest.raises(UsageError, match="--force"):
        select(data, "val", out, only=("jsrt",))
    assert len(list(out.rglob("*.png"))) == 10
    select(data, "val", out, only=("jsrt",), force=True)  # an earlier selection is replaced
    assert sorted(p.name for p in out.rglob("*.png")) == ["vN2.png", "vN5.png"]
    stranger = tmp_path / "photos"
    (stranger / "NORMAL").mkdir(parents=True)
    grey_image(stranger / "NORMAL" / "mine.png", 40)
    with pytest.raises(UsageError, match="did not write"):
        select(data, "val", stranger, force=True)
    assert (stranger / "NORMAL" / "mine.png").is_file() and not (stranger / "NORMAL" / "mine.png").is_symlink()
    with pytest.raises(UsageError, match="inside"):
        select(data, "val", data / "val-copy")
    with pytest.raises(UsageError, match="has no test/ folder"):
        select(data, "test", tmp_path / "t")
    for odd in ("", ".", "../union/val"):  # the split folders became labels of the selection
        with pytest.raises(UsageError, match=r"--split .*: choose one of train, val, test or all"):
            select(data, odd, tmp_path / "t")
    with pytest.raises(UsageError, match=r"source\(s\) \['typo'\]"):
        select(data, "val", tmp_path / "t", exclude=("typo",))
    with pytest.raises(UsageError, match="No film is left"):
        select(data, "val", tmp_path / "t", exclude=SOURCES)
    bare = tmp_path / "bare"
    (bare / "val" / "NORMAL").mkdir(parents=True)
    grey_image(bare / "val" / "NORMAL" / "a.png", 30)
    with pytest.raises(UsageError, match=r"no MANIFEST\.csv"):
        select(bare, "val", tmp_path / "t", only=("nih",))
    assert not (tmp_path / "t").exists() and not (data / "val-copy").exists()
    grey_image(bare / "val" / "NORMAL" / "b.png", 30)
    (bare / "test" / "NORMAL").mkdir(parents=True)
    grey_image(bare / "test" / "NORMAL" / "b.png", 30)
    with pytest.raises(UsageError, match=r"share the name\(s\) \['NORMAL/b\.png'\]"):
        select(bare, "all", tmp_path / "t")
    assert not (tmp_path / "t").exists()
    (bare / "test" / "NORMAL" / "b.png").unlink()
    select(bare, "val", tmp_path / "t")  # without sources a tree needs no manifest
    assert sorted(p.name for p in (tmp_path / "t").rglob("*.png")) == ["a.png", "b.png"]
    assert not (tmp_path / "t" / "MANIFEST.csv").exists()


def test_cli_prints_the_counts_and_exits_2_on_a_mistake(tmp_path: Path) -> None:
    data = _tree(tmp_path / "union")
    runner = CliRunner()
    args = ["data", "select", str(data), "--split", "val", "--exclude-source", "nih", "--out", str(tmp_path / "s")]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "linked 6 films" in done.output and "NORMAL 4, PNEUMONIA 2" in done.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    wrong = runner.invoke(app, [*args[:4], "--source", "typo", "--out", str(tmp_path / "u")])
    assert wrong.exit_code == 2 and "typo" in wrong.output
