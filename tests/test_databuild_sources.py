"""What `cxrbatch data build` takes from its sources: odd file names, datasets beside repositories."""

from __future__ import annotations

from pathlib import Path

from helpers import NON_UTF8, entry, film, make_repo, manifest_rows, png, rule, skipped_rows

from cxrbatch.databuild.builder import build


def test_a_file_name_that_is_not_utf8_is_written_with_escapes(tmp_path: Path) -> None:
    mirrors = tmp_path / "mirrors"
    black = png(film(3).point(lambda _: 0))  # binarised: its name goes into SKIPPED.csv
    commit = make_repo(
        mirrors, "o/r", {f"img/{NON_UTF8}": png(film(1)), "img/ok.png": png(film(2)), "img/\udce9.png": black}
    )
    registry = tmp_path / "r.toml"
    registry.write_text(entry("o/r", commit, rule("img/*.png", "NORMAL", "x")))
    out = tmp_path / "out"
    build(registry, mirrors, out, tmp_path)
    assert sorted(r["path_in_source"] for r in manifest_rows(out)) == ["img/ok.png", "img/scan-\\xff\\xfe.png"]
    assert [r["path_in_source"] for r in skipped_rows(out)] == ["img/\\xe9.png"]
