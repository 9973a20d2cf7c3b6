"""Where `cxrbatch data build` writes: a fresh folder put in place at the end, never over what it did not build."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import entry, film, make_repo, manifest_rows, png, rule

from cxrbatch.databuild import builder
from cxrbatch.databuild.builder import build


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
