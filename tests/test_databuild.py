"""`cxrbatch data build`: a training tree from a source registry and local git mirrors.

Every test builds from tiny git repositories made here in a temporary folder (the builder reads
them with git at the registered commit, as it reads fetched mirrors).
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, entry, film, make_repo, manifest_rows, png, rule, skipped_rows, tree_bytes
from PIL import Image
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.databuild import hashing
from cxrbatch.databuild.builder import MANIFEST_COLUMNS, build
from cxrbatch.databuild.record import RECORD_COLUMNS
from cxrbatch.databuild.registry import load_registry
from cxrbatch.datasets import read_manifest, sources_of
from cxrbatch.errors import UsageError


@pytest.fixture
def two_sources(tmp_path: Path) -> tuple[Path, Path]:
    """Two repositories: one with TB and normal films by patient, one with pneumonia films."""
    mirrors = tmp_path / "mirrors"
    tb = {f"img/CHNCXR_{i:04d}_{i % 2}.png": png(film(i, (300 + i, 400))) for i in range(1, 13)}
    tb["README.md"] = b"not an image, and no rule takes it"
    first = make_repo(mirrors, "site/tb-set", tb)
    second = make_repo(mirrors, "site/pneumonia", {f"p/{i}.jpg": png(film(100 + i)) for i in range(8)})
    registry = tmp_path / "registry.toml"
    registry.write_text(
        entry("site/tb-set", first, rule("img/*_1.png", "TUBERCULOSIS", "shenzhen", r"CHNCXR_(\d+)_")
              + rule("img/*_0.png", "NORMAL", "shenzhen", r"CHNCXR_(\d+)_"))
        + entry("site/pneumonia", second, rule("p/*.jpg", "PNEUMONIA", "hospital-b"))
    )  # fmt: skip
    return registry, mirrors


def test_build_labels_converts_and_describes_every_image(two_sources: tuple[Path, Path], tmp_path: Path) -> None:
    registry, mirrors = two_sources
    out = tmp_path / "data"
    result = build(registry, mirrors, out, registry.parent)
    rows = manifest_rows(out)
    assert len(rows) == len(result.rows) == 20
    assert list(rows[0]) == list(MANIFEST_COLUMNS)
    by_label = {label: sum(r["label"] == label for r in rows) for label in ("TUBERCULOSIS", "NORMAL", "PNEUMONIA")}
    assert by_label == {"TUBERCULOSIS": 6, "NORMAL": 6, "PNEUMONIA": 8}
    assert {r["collection"] for r in rows} == {"shenzhen", "hospital-b"}
    assert not any(r["path_in_source"] == "README.md" for r in rows)
    for row in rows:
        stored = out / row["split"] / row["label"] / f"{row['id']}.jpg"
        with Image.open(stored) as image:
            assert image.format == "JPEG" and image.mode == "L"
            assert max(image.size) <= 320  # 400-px originals are reduced, 80-px ones kept
            assert row["dhash256"] == hashing.dhash256(image)
        assert row["license_as_stated"] == "CC BY 4.0"
    tb_row = next(r for r in rows if r["path_in_source"] == "img/CHNCXR_0003_1.png")
    assert (tb_row["orig_width"], tb_row["orig_height"]) == ("303", "400")
    assert tb_row["patient_group"] == "shenzhen:0003"
    original = np.asarray(film(3, (303, 400)))
    expected_id = hashlib.sha1(b"303x400:" + original.tobytes()).hexdigest()[:12]
    assert tb_row["id"] == expected_id


def test_rebuild_is_byte_identical(two_sources: tuple[Path, Path], tmp_path: Path) -> None:
    registry, mirrors = two_sources
    build(registry, mirrors, tmp_path / "a", registry.parent)
    build(registry, mirrors, tmp_path / "b", registry.parent, workers=1)
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert len(first) == 22  # 20 images, MANIFEST.csv, SKIPPED.csv
    assert first == second


def test_bad_and_reserved_files_are_listed_and_skipped(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    black_white = Image.fromarray(np.where(np.indices((60, 60))[1] < 30, 0, 255).astype(np.uint8), "L")
    files = {
        "x/good.png": png(film(1)),
        "x/truncated.png": png(film(2))[:60],
        "x/text.png": b"hello, not a picture",
        "x/lfs.png": b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
        "x/Normal-12.png": png(film(3)),
        "x/binary.png": png(black_white),
    }
    commit = make_repo(mirrors, "a/b", files)
    registry = tmp_path / "r.toml"
    registry.write_text(entry("a/b", commit, rule("x/*.png", "NORMAL", "site-a")))
    out = tmp_path / "data"
    result = build(registry, mirrors, out, tmp_path)
    assert [r["path_in_source"] for r in manifest_rows(out)] == ["x/good.png"]
    reasons = {r["path_in_source"]: r["reason"] for r in skipped_rows(out)}
    assert set(reasons) == {"x/truncated.png", "x/text.png", "x/lfs.png", "x/Normal-12.png", "x/binary.png"}
    assert "reserved for independent evaluation" in reasons["x/Normal-12.png"]
    assert "Git LFS pointer" in reasons["x/lfs.png"]
    assert reasons["x/binary.png"].startswith("binarised")
    assert len(result.skipped) == 5


def test_copies_and_patients_share_a_cluster_and_conflicting_copies_are_dropped(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    same = png(film(7, (200, 240)))
    resized = png(film(7, (200, 240)).resize((150, 180), Image.Resampling.LANCZOS))
    first = make_repo(mirrors, "a/one", {"n/a.png": same, "n/pat9_1.png": png(film(8)), "n/pat9_2.png": png(film(9))})
    conflicting = png(film(10))
    second = make_repo(
        mirrors, "b/two", {"n/copy.png": same, "n/small.png": resized, "c/x.png": conflicting, "t/x.png": conflicting}
    )
    registry = tmp_path / "r.toml"
    registry.write_text(
        entry("a/one", first, rule("n/*.png", "NORMAL", "one", r"(pat\d+)_"))
        + entry("b/two", second, rule("n/*.png", "NORMAL", "two") + rule("c/*", "COVID19", "two")
                + rule("t/*", "TUBERCULOSIS", "two"))
    )  # fmt: skip
    out = tmp_path / "data"
    build(registry, mirrors, out, tmp_path)
    rows = {r["path_in_source"]: r for r in manifest_rows(out)}
    # an exact copy is kept once, with a note; a resized copy is its own row in the same cluster
    assert "n/copy.png" not in rows
    assert "same pixels at b/two:n/copy.png" in rows["n/a.png"]["note"]
    assert rows["n/small.png"]["cluster"] == rows["n/a.png"]["cluster"]
    assert rows["n/small.png"]["split"] == rows["n/a.png"]["split"]
    # two films of one patient: one cluster, one split, the patient id on both
    assert rows["n/pat9_1.png"]["cluster"] == rows["n/pat9_2.png"]["cluster"]
    assert rows["n/pat9_1.png"]["patient_group"] == "one:pat9"
    # one film labelled COVID19 in one place and TUBERCULOSIS in another: neither is used
    assert "c/x.png" not in rows and "t/x.png" not in rows
    reasons = {r["path_in_source"]: r["reason"] for r in skipped_rows(out)}
    expected = "copies of this film carry more than one label (COVID19, TUBERCULOSIS)"
    assert reasons["c/x.png"] == reasons["t/x.png"] == expected


def test_a_dataset_source_keeps_its_files_rows_and_splits(tmp_path: Path) -> None:
    dataset = tmp_path / "dev"
    rows = []
    for i, split in enumerate(("train", "val", "test")):
        image = film(20 + i)
        target = dataset / split / "NORMAL" / f"id{i}.jpg"
        target.parent.mkdir(parents=True)
        image.save(target, "JPEG", quality=90)
        rows.append({"id": f"id{i}", "split": split, "label": "NORMAL", "source": "org/repo", "cluster": f"c{i}",
                     "patient_group": f"nih:{i}", "license_as_stated": "CC0"})  # fmt: skip
    with (dataset / "MANIFEST.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mirrors = tmp_path / "mirrors"
    # a film of the same NIH patient 1 from another repository joins that patient's (val) cluster
    commit = make_repo(mirrors, "c/nih", {"00000001_000.png": png(film(30)), "00000002_000.png": png(film(31))})
    registry = tmp_path / "r.toml"
    nih_rule = rule("*.png", "NORMAL", "nih-cxr14", r"^0*(\d+)_") + 'patient_namespace = "nih"\n'
    registry.write_text(
        '[[source]]\ndataset = "dev"\n[source.collections]\n"org/repo" = "dev-collection"\n\n'
        + entry("c/nih", commit, nih_rule)
    )
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)
    built = {r["path_in_source"] or r["id"]: r for r in manifest_rows(out)}
    for i, split in enumerate(("train", "val", "test")):
        row = built[f"id{i}"]
        assert row["split"] == split and row["collection"] == "dev-collection" and row["license_as_stated"] == "CC0"
        name = f"{split}/NORMAL/id{i}.jpg"
        assert (out / name).read_bytes() == (dataset / name).read_bytes()
    assert built["00000001_000.png"]["split"] == "val"
    assert built["00000001_000.png"]["cluster"] == built["id1"]["cluster"]
    # the manifest's collection is the source that training and evaluation go by
    manifest = read_manifest(out)
    assert sources_of([out / "val" / "NORMAL" / "id1.jpg"], manifest) == ["dev-collection"]

    registry.write_text('[[source]]\ndataset = "dev"\n[source.collections]\n"other/repo" = "x"\n')
    with pytest.raises(UsageError, match=r"no collection given for its sources \['org/repo'\]"):
        build(registry, mirrors, tmp_path / "out2", tmp_path)


def test_a_rule_can_hold_its_films_out_as_an_evaluation_site(tmp_path: Path) -> None:
    """Films read only as normal or abnormal, from a site no model trains on: all in test/."""
    mirrors = tmp_path / "mirrors"
    files = {f"normal/{i}.png": png(film(i)) for i in range(6)}
    files |= {f"abnormal/{i}.png": png(film(50 + i)) for i in range(6)}
    commit = make_repo(mirrors, "site/reads", files)
    registry = tmp_path / "sites.toml"
    held_out = 'split = "test"\n'
    registry.write_text(
        entry("site/reads", commit, rule("normal/*", "NORMAL", "site-c") + held_out
              + rule("abnormal/*", "ABNORMAL", "site-c") + held_out)
    )  # fmt: skip
    out = tmp_path / "sites"
    build(registry, mirrors, out, tmp_path)
    rows = manifest_rows(out)
    assert {(r["split"], r["label"]) for r in rows} == {("test", "NORMAL"), ("test", "ABNORMAL")} and len(rows) == 12
    assert sorted(p.name for p in (out / "test").iterdir()) == ["ABNORMAL", "NORMAL"]
    # another collection holds smaller copies: one read PNEUMONIA agrees with ABNORMAL, one read NORMAL does not
    smaller = {f"p/{i}.png": png(film(50 + i).resize((60, 48), Image.Resampling.LANCZOS)) for i in (0, 1)}
    other = make_repo(mirrors, "site/other", smaller)
    registry.write_text(
        registry.read_text() + entry("site/other", other, rule("p/0.png", "PNEUMONIA", "site-d")
                                     + rule("p/1.png", "NORMAL", "site-d"))
    )  # fmt: skip
    build(registry, mirrors, out, tmp_path, force=True)
    rows = {r["path_in_source"]: r for r in manifest_rows(out)}
    assert rows["p/0.png"]["label"] == "PNEUMONIA" and rows["abnormal/0.png"]["label"] == "ABNORMAL"
    assert rows["p/0.png"]["cluster"] == rows["abnormal/0.png"]["cluster"] and rows["p/0.png"]["split"] == "test"
    assert "p/1.png" not in rows and "abnormal/1.png" not in rows
    reasons = {r["path_in_source"]: r["reason"] for r in skipped_rows(out)}
    assert reasons["p/1.png"] == "copies of this film carry more than one label (ABNORMAL, NORMAL)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (entry("a/b", "abc123", rule("*", "NORMAL", "s")), "full 40-digit commit"),
        (entry("ml-workgroup/covid-19-image-repository", "a" * 40, rule("*", "COVID19", "s")), "reserved"),
        (entry("a/b", "a" * 40, rule("*", "NORMAL", "s"), licence=""), "state the licence"),
        (entry("a/b", "a" * 40, rule("*", "FRACTURE", "s")), "label 'FRACTURE' is not one of"),
        (entry("a/b", "a" * 40, rule("*", "NORMAL", "s", "no-group")), "needs a group"),
        (entry("a/b", "a" * 40, rule("*", "ABNORMAL", "s")), 'name no class to learn: give their rule split = "test"'),
        (entry("a/b", "a" * 40, rule("*", "NORMAL", "s") + 'split = "holdout"\n'), "split 'holdout' is not one of"),
        (entry("a/b", "a" * 40, ""), "needs \\[\\[source.files\\]\\] rules"),
        (entry("a/b", "a" * 40, rule("*", "NORMAL", "s")) * 2, "lists a source twice"),
        ('[[source]]\npackage = "pneumonia-model-package"\nlicence = "x"\n', "pinned as name==version"),
        ("not toml [", "not valid TOML"),
    ],
)
def test_registry_mistakes_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    registry = tmp_path / "r.toml"
    registry.write_text(text)
    with pytest.raises(UsageError, match=message):
        load_registry(registry)


def test_missing_mirror_or_commit_is_a_usage_error(two_sources: tuple[Path, Path], tmp_path: Path) -> None:
    registry, mirrors = two_sources
    with pytest.raises(UsageError, match=r"No mirror of site/tb-set .*fetch the repository first"):
        build(registry, tmp_path / "empty", tmp_path / "out", registry.parent)
    text = registry.read_text()
    commit = next(line.split('"')[1] for line in text.splitlines() if line.startswith("commit"))
    registry.write_text(text.replace(commit, "0" * 40, 1))
    with pytest.raises(UsageError, match="lacks commit 0000000000"):
        build(registry, mirrors, tmp_path / "out", registry.parent)
    assert not (tmp_path / "out").exists()


def test_a_missing_last_mirror_stops_the_build_before_any_conversion(
    two_sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch.databuild import builder

    registry, mirrors = two_sources
    shutil.rmtree(mirrors / "site+pneumonia")  # the registry's second source
    converted: list[object] = []
    monkeypatch.setattr(builder, "_convert_one", lambda payload: converted.append(payload))
    with pytest.raises(UsageError, match="No mirror of site/pneumonia"):
        build(registry, mirrors, tmp_path / "out", registry.parent)
    assert converted == []


def test_a_pattern_that_matches_no_file_stops_the_build_before_any_conversion(
    two_sources: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cxrbatch.databuild import builder

    registry, mirrors = two_sources
    text = registry.read_text()
    converted: list[object] = []
    monkeypatch.setattr(builder, "_convert_one", lambda payload: converted.append(payload))
    registry.write_text(text.replace('glob = "p/*.jpg"', 'glob = "p/*.jpeg"'))  # the pneumonia files are .jpg
    with pytest.raises(UsageError, match=r"match no file: site/pneumonia at [0-9a-f]{10}: rule 'p/\*.jpeg' \(a typo"):
        build(registry, mirrors, tmp_path / "out", registry.parent)
    shadowed = text.replace('glob = "img/*_0.png"', 'glob = "img/*_1.png"')  # the first rule takes them all
    registry.write_text(shadowed.replace('licence = "CC BY 4.0"', 'licence = "CC BY 4.0"\nexclude = ["img/*.jpg"]', 1))
    with pytest.raises(UsageError, match=r"site/tb-set at [0-9a-f]{10}: rule 'img/\*_1.png', exclude 'img/\*.jpg'"):
        build(registry, mirrors, tmp_path / "out", registry.parent)
    assert converted == [] and not (tmp_path / "out").exists()


def test_dhash256_is_the_documented_procedure() -> None:
    # brighter than the right-hand neighbour everywhere: every bit set; darker everywhere: none
    falling = Image.fromarray(np.tile(np.arange(255, 85, -10, dtype=np.uint8), (16, 1)), "L")
    rising = Image.fromarray(np.tile(np.arange(85, 255, 10, dtype=np.uint8), (16, 1)), "L")
    assert falling.size == rising.size == (17, 16)
    assert hashing.dhash256(falling) == "f" * 64
    assert hashing.dhash256(rising) == "0" * 64
    # only the first row falling: the first 16 bits (most significant first) are set
    first_row = np.tile(np.arange(85, 255, 10, dtype=np.uint8), (16, 1))
    first_row[0] = first_row[0][::-1]
    assert hashing.dhash256(Image.fromarray(first_row, "L")) == "ffff" + "0" * 60


def test_cli_builds_prints_counts_and_refuses_to_overwrite(two_sources: tuple[Path, Path], tmp_path: Path) -> None:
    registry, mirrors = two_sources
    out = tmp_path / "data"
    runner = CliRunner()
    args = ["data", "build", str(registry), "--mirrors", str(mirrors), "--out", str(out)]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "20 images written" in done.output
    assert any(line.split()[:2] == ["shenzhen", "TUBERCULOSIS"] for line in done.output.splitlines())
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "holiday.jpg").write_bytes(b"x")
    refused = runner.invoke(app, [*args[:-1], str(stranger), "--force"])
    assert refused.exit_code == 2 and "did not build" in refused.output
    assert (stranger / "holiday.jpg").read_bytes() == b"x"
    dataset = tmp_path / "devset"  # a folder of this project's format, not built here: a dataset source
    (dataset / "val" / "NORMAL").mkdir(parents=True)
    (dataset / "MANIFEST.csv").write_text("id,split,label\n", encoding="utf-8")
    (dataset / "README.md").write_text("the developer set", encoding="utf-8")
    refused = runner.invoke(app, [*args[:-1], str(dataset), "--force"])
    assert refused.exit_code == 2 and "did not build" in refused.output
    assert (dataset / "README.md").read_text(encoding="utf-8") == "the developer set"


def test_record_is_the_manifest_without_images_and_refuses_other_folders(
    two_sources: tuple[Path, Path], tmp_path: Path
) -> None:
    registry, mirrors = two_sources
    out = tmp_path / "data"
    build(registry, mirrors, out, registry.parent)
    record = tmp_path / "training-manifest.csv"
    runner = CliRunner()
    done = runner.invoke(app, ["data", "record", str(out), "--out", str(record)])
    assert done.exit_code == 0, done.output
    assert "record of 20 images" in done.output
    with record.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == list(RECORD_COLUMNS)
    assert [r["id"] for r in rows] == sorted(r["id"] for r in manifest_rows(out))
    built = {r["id"]: r for r in manifest_rows(out)}
    for row in rows:
        assert row == {c: built[row["id"]][c] for c in RECORD_COLUMNS}
        assert len(row["dhash256"]) == 64 and row["path_in_source"] and row["license_as_stated"] == "CC BY 4.0"
    manifest_before = (out / "MANIFEST.csv").read_bytes()
    for inside in (out / "MANIFEST.csv", out / "record.csv"):  # over the tree's own manifest, or into it
        refused = runner.invoke(app, ["data", "record", str(out), "--out", str(inside)])
        assert refused.exit_code == 2 and "lies inside" in refused.output
    assert (out / "MANIFEST.csv").read_bytes() == manifest_before and not (out / "record.csv").exists()
    stranger = tmp_path / "photos"
    stranger.mkdir()
    refused = runner.invoke(app, ["data", "record", str(stranger), "--out", str(tmp_path / "x.csv")])
    assert refused.exit_code == 2 and "MANIFEST.csv" in refused.output
    assert not (tmp_path / "x.csv").exists()


def _cli_build(tmp: Path, registry: str, out: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxrbatch.cli", "data", "build", str(tmp / registry), "--mirrors", str(tmp / "m"),
         "--out", str(tmp / out)],
        env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True,
    )  # fmt: skip


def test_manifest_does_not_depend_on_the_locale(tmp_path: Path) -> None:
    """_write_csv escapes cells with display_path, i.e. os.fsencode: the locale's encoding."""
    commit = make_repo(tmp_path / "m", "o/r", {"img/caf\u00e9.png": png(film(1)), "img/b.png": png(film(2))})
    (tmp_path / "r.toml").write_text(entry("o/r", commit, rule("img/*.png", "NORMAL", "x")), encoding="utf-8")
    utf8 = _cli_build(tmp_path, "r.toml", "a", LC_ALL="C.UTF-8")
    ascii_fs = _cli_build(tmp_path, "r.toml", "b", LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    assert utf8.returncode == 0, utf8.stderr
    assert ascii_fs.returncode == 0, ascii_fs.stderr[-300:]
    assert (tmp_path / "a" / "MANIFEST.csv").read_bytes() == (tmp_path / "b" / "MANIFEST.csv").read_bytes()


def test_a_copy_dropped_for_its_labels_still_links_its_patients(tmp_path: Path) -> None:
    """Film x is patient P1's in one repository and Q7's in another (labels disagree: both copies
    dropped). P1 and Q7 are one person, yet their other films are split apart."""
    x = film(7, (200, 240))
    a = make_repo(tmp_path / "m", "site/a", {"n/P1_x.png": png(x), "n/P1_y.png": png(film(11))})
    b = make_repo(tmp_path / "m", "site/b", {"c/Q7_x.png": png(x), "c/Q7_z.png": png(film(16))})
    (tmp_path / "r.toml").write_text(
        entry("site/a", a, rule("n/*.png", "NORMAL", "a", r"(P\d+)_"))
        + entry("site/b", b, rule("c/*.png", "COVID19", "b", r"(Q\d+)_"))
    )
    build(tmp_path / "r.toml", tmp_path / "m", tmp_path / "out", tmp_path)
    rows = {r["path_in_source"]: r for r in manifest_rows(tmp_path / "out")}
    assert set(rows) == {"n/P1_y.png", "c/Q7_z.png"}
    assert rows["n/P1_y.png"]["split"] == rows["c/Q7_z.png"]["split"]
    assert rows["n/P1_y.png"]["cluster"] == rows["c/Q7_z.png"]["cluster"]


def test_a_dataset_manifest_with_a_bom_is_read_as_the_other_commands_read_it(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "test" / "NORMAL").mkdir(parents=True)
    film(1).save(dev / "test" / "NORMAL" / "abc.jpg", "JPEG", quality=90)
    (dev / "MANIFEST.csv").write_bytes(b"\xef\xbb\xbfid,split,label,source\nabc,test,NORMAL,org/repo\n")
    (tmp_path / "r.toml").write_text('[[source]]\ndataset = "dev"\n[source.collections]\n"org/repo" = "dev"\n')
    build(tmp_path / "r.toml", tmp_path / "m", tmp_path / "out", tmp_path)
    assert [r["id"] for r in manifest_rows(tmp_path / "out")] == ["abc"]


def test_skipped_csv_holds_no_machine_path(tmp_path: Path) -> None:
    """A dataset row whose file is missing: its reason names the dataset's absolute path, so the
    same registry and dataset built from two checkouts give different SKIPPED.csv."""
    outs = []
    for where in ("one", "two"):
        dev = tmp_path / where / "dev"
        (dev / "test" / "NORMAL").mkdir(parents=True)
        film(1).save(dev / "test" / "NORMAL" / "abc.jpg", "JPEG", quality=90)
        (dev / "MANIFEST.csv").write_text("id,split,label,source\nabc,test,NORMAL,o/r\ngone,test,NORMAL,o/r\n")
        registry = tmp_path / where / "r.toml"
        registry.write_text('[[source]]\ndataset = "dev"\n[source.collections]\n"o/r" = "dev"\n')
        build(registry, tmp_path / where / "m", tmp_path / where / "out", registry.parent)
        outs.append((tmp_path / where / "out" / "SKIPPED.csv").read_text(encoding="utf-8"))
    assert outs[0] == outs[1], outs
