"""Where `cxrbatch data build` writes: a fresh folder put in place at the end, never over what it did not build."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import entry, film, make_repo, manifest_rows, png, rule, tree_bytes

from cxrbatch.databuild import builder
from cxrbatch.databuild.builder import build
from cxrbatch.errors import UsageError


@pytest.fixture
def one_source(tmp_path: Path) -> tuple[Path, Path]:
    mirrors = tmp_path / "mirrors"
    commit = make_repo(mirrors, "o/r", {f"img/{i}.png": png(film(i)) for i in range(4)})
    registry = tmp_path / "r.toml"
    registry.write_text(entry("o/r", commit, rule("img/*.png", "NORMAL", "x")))
    return registry, mirrors


def test_a_failed_write_leaves_no_part_folder(
    one_source: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, mirrors = one_source

    def fail(*args: object) -> None:
        raise RuntimeError("not an OSError")

    monkeypatch.setattr(builder, "_write_csv", fail)
    with pytest.raises(RuntimeError, match="not an OSError"):
        build(registry, mirrors, tmp_path / "out", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mirrors", "r.toml"]


def test_out_may_be_the_current_folder(
    one_source: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    registry, mirrors = one_source
    build(registry, mirrors, Path("."), tmp_path)
    assert len(manifest_rows(here)) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "mirrors", "r.toml"]


@pytest.mark.parametrize("inside", ["mirrors", "registry", "dataset"])
def test_force_refuses_an_out_that_holds_what_the_build_reads(
    one_source: tuple[Path, Path], tmp_path: Path, inside: str
) -> None:
    registry, mirrors = one_source
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)  # an earlier build: MANIFEST.csv and SKIPPED.csv are there
    if inside == "mirrors":
        mirrors = mirrors.rename(out / "mirrors")
    elif inside == "registry":
        registry = registry.rename(out / "r.toml")
    else:
        (out / "dev").mkdir()
        (out / "dev" / "MANIFEST.csv").write_text("id,split,label,source\n", encoding="utf-8")
        registry.write_text('[[source]]\ndataset = "dev"\n\n' + registry.read_text())
    before = tree_bytes(out)
    with pytest.raises(UsageError, match=r"lies inside --out .*out, which the build replaces"):
        build(registry, mirrors, out, out if inside == "dataset" else tmp_path, force=True)
    assert tree_bytes(out) == before


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("notes.txt", "notes.txt"),
        ("mirrors/o+r/HEAD", "mirrors"),
        ("train/NORMAL/readme.txt", "train/NORMAL/readme.txt"),
        ("test/OTHER/a.jpg", "test/OTHER"),
    ],
)
def test_force_replaces_only_what_a_build_writes(
    one_source: tuple[Path, Path], tmp_path: Path, extra: str, named: str
) -> None:
    registry, mirrors = one_source
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)
    (out / extra).parent.mkdir(parents=True, exist_ok=True)
    (out / extra).write_bytes(b"not built here")
    with pytest.raises(UsageError, match=f"out holds {named}, which a build does not write: refusing to replace"):
        build(registry, mirrors, out, tmp_path, force=True)
    assert (out / extra).read_bytes() == b"not built here"


def test_force_refuses_an_out_holding_links(one_source: tuple[Path, Path], tmp_path: Path) -> None:
    registry, mirrors = one_source
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)
    link = next(out.glob("*/NORMAL/*.jpg"))
    link.unlink()
    link.symlink_to(registry)  # a build writes no links; `data select` does
    with pytest.raises(UsageError, match="which a build does not write"):
        build(registry, mirrors, out, tmp_path, force=True)
    assert link.is_symlink()
    link.unlink()
    build(registry, mirrors, out, tmp_path, force=True)  # what a build wrote, less a film: replaced
    assert len(manifest_rows(out)) == 4
