"""What `cxrbatch data build` takes from its sources: odd file names, datasets beside repositories."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from helpers import NON_UTF8, entry, film, make_repo, manifest_rows, png, rule, skipped_rows
from PIL import Image

from cxrbatch.databuild import hashing
from cxrbatch.databuild.builder import build

DATASET_COLUMNS = ("id", "split", "label", "source", "commit_or_version", "path_in_source", "cluster")


def make_dataset(root: Path, films: list[tuple[str, str, str, str, bytes]]) -> None:
    """A folder in this project's format: (id, source, commit, path_in_source, JPEG bytes), all test/NORMAL."""
    (root / "test" / "NORMAL").mkdir(parents=True)
    with (root / "MANIFEST.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(DATASET_COLUMNS)
        for i, (image_id, source, commit, path, jpeg) in enumerate(films):
            (root / "test" / "NORMAL" / f"{image_id}.jpg").write_bytes(jpeg)
            writer.writerow([image_id, "test", "NORMAL", source, commit, path, f"c{i}"])


def jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def pixel_id(image: Image.Image) -> str:
    return hashlib.sha1(b"%dx%d:" % image.size + image.tobytes()).hexdigest()[:12]


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


def test_the_film_written_is_the_copy_its_row_describes(tmp_path: Path) -> None:
    """A dataset film and a repository film with identical pixels: one row, the dataset's (listed
    first), and its file is the dataset's JPEG, not the repository's conversion of the same film."""
    same = film(7, (100, 90))
    stored = jpeg(same, quality=40)  # the dataset's own JPEG, unlike the build's quality 90
    make_dataset(tmp_path / "dev", [(pixel_id(same), "up/stream", "abc", "a.png", stored)])
    commit = make_repo(tmp_path / "mirrors", "o/r", {"img/a.png": png(same), "img/b.png": png(film(8))})
    registry = tmp_path / "r.toml"
    dataset = '[[source]]\ndataset = "dev"\n[source.collections]\n"up/stream" = "dev"\n\n'
    registry.write_text(dataset + entry("o/r", commit, rule("img/*.png", "NORMAL", "x")))
    out = tmp_path / "out"
    build(registry, tmp_path / "mirrors", out, tmp_path)
    row = next(r for r in manifest_rows(out) if r["id"] == pixel_id(same))
    assert (row["source"], row["split"], row["note"]) == ("up/stream", "test", "same pixels at o/r:img/a.png")
    written = out / "test" / "NORMAL" / f"{row['id']}.jpg"
    assert written.read_bytes() == stored
    with Image.open(written) as image:
        assert row["dhash256"] == hashing.dhash256(image)


def test_a_dataset_row_reserved_for_independent_evaluation_is_skipped(tmp_path: Path) -> None:
    """A dataset's rows pass the registry's refusals too: a reserved repository's film (but the
    developer set's kaggle-curated films, at their commit) and a file named like a reserved one."""
    kaggle = ("KishoreNMproject/lung_disease", "7c68edc76a9398cf886f8caaab6d2ba2d802061d")
    rows = [
        ("pi-null-mezon/OpenIST", "abc", "a/b.png"),
        ("someone/tbdb", "abc", "TB_Chest/Tuberculosis/Tuberculosis-12.png"),
        (kaggle[0], "0" * 40, "test/NORMAL/x.jpeg"),
        (*kaggle, "test/NORMAL/y.jpeg"),
        ("someone/tbdb", "abc", "TB_Chest/Normal/n1.png"),
    ]
    films = [film(50 + i) for i in range(len(rows))]
    make_dataset(tmp_path / "dev", [(pixel_id(f), *row, jpeg(f, 90)) for f, row in zip(films, rows, strict=True)])
    collections = "".join(f'"{source}" = "c{i}"\n' for i, source in enumerate(dict.fromkeys(r[0] for r in rows)))
    registry = tmp_path / "r.toml"
    registry.write_text(f'[[source]]\ndataset = "dev"\n[source.collections]\n{collections}')
    out = tmp_path / "out"
    build(registry, tmp_path / "mirrors", out, tmp_path)
    assert sorted(r["path_in_source"] for r in manifest_rows(out)) == ["TB_Chest/Normal/n1.png", "test/NORMAL/y.jpeg"]
    reasons = {r["path_in_source"]: r["reason"] for r in skipped_rows(out)}
    assert reasons == {
        f"test/NORMAL/{pixel_id(films[0])}.jpg": "from a repository reserved for independent evaluation: "
        "pi-null-mezon/OpenIST:a/b.png",
        f"test/NORMAL/{pixel_id(films[1])}.jpg": "named like a file reserved for independent evaluation: "
        "someone/tbdb:TB_Chest/Tuberculosis/Tuberculosis-12.png",
        f"test/NORMAL/{pixel_id(films[2])}.jpg": "from a repository reserved for independent evaluation: "
        "KishoreNMproject/lung_disease:test/NORMAL/x.jpeg",
    }
