"""Build one labelled tree from every source of a registry: convert, link, split, write.

The conversion is the developer set's (its README): 8-bit grey (alpha composited on black,
16-bit scaled from its minimum to its maximum), the longer side reduced to at most 320 px with
Lanczos (never enlarged), JPEG quality 90. An image's `id` is the first 12 hex digits of
sha1(b"WxH:" + grey pixels at the original size). Images of a `dataset` source are already
converted and are copied byte for byte with their manifest rows.

Clusters (`clusters`) decide the split: a cluster holding images of a dataset takes their split
(the most held-out one if they disagree: test, then val), so a test film of the developer set
stays a test film; any other cluster goes to train, val or test (70/15/15) by a hash of its
smallest id. Films whose copies carry more than one label are left out, as are corrupt,
unreadable, binarised and reserved files: each is a row of SKIPPED.csv, never a failure.
Exact pixel copies are kept once; the other locations go into the kept row's `note`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import shutil
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbatch import imaging
from cxrbatch.databuild import hashing
from cxrbatch.databuild.clusters import UnionFind, link_groups, near_duplicate_pairs
from cxrbatch.databuild.output import check_out
from cxrbatch.databuild.readers import SourceFiles, dataset_root, open_source
from cxrbatch.databuild.registry import ADMITTED_IN_DATASETS, RESERVED_FILE, RESERVED_REPOS, Source, load_registry
from cxrbatch.datasets import ABNORMAL
from cxrbatch.errors import ImageError, ReportError, UsageError

MANIFEST_COLUMNS = (
    "id", "split", "label", "source", "commit_or_version", "path_in_source", "license_as_stated",
    "patient_group", "cluster", "orig_width", "orig_height", "orig_format", "age_group", "note",
    "collection", "dhash256",
)  # fmt: skip
SKIPPED_COLUMNS = ("source", "path_in_source", "reason")
MAX_SIDE = 320
JPEG_QUALITY = 90
BINARY_SHARE = 0.70  # this share of pixels within 32 levels of black or white: a binarised image
SPLIT_ORDER = ("test", "val", "train")  # the most held-out split wins inside a cluster
CHUNK = 32


@dataclass(frozen=True)
class Candidate:
    """A source file the registry labels, and what the manifest says of it."""

    source: Source
    path: str
    label: str
    collection: str
    patients: tuple[str, ...]
    row: dict[str, str]  # the manifest row it starts from (a dataset's own; else the registry's fields)
    split: str = ""  # the split its source gives it (a dataset's own, or a rule's `split`); "" lets the cluster decide


@dataclass(frozen=True)
class Built:
    """A converted image: its bytes as stored and the hashes that link it."""

    candidate: Candidate
    id: str
    jpeg: bytes
    h64: int
    h4096: np.ndarray
    dhash256: str
    split: str = ""  # the split its source gives it


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote."""

    rows: list[dict[str, str]]
    skipped: list[tuple[str, str, str]]

    def counts(self) -> Counter[tuple[str, str, str]]:
        """Images per (collection, label, split)."""
        return Counter((r["collection"], r["label"], r["split"]) for r in self.rows)


def build(registry: Path, mirrors: Path, out: Path, base: Path, workers: int = 2, force: bool = False) -> BuildResult:
    """Build the tree of `registry` from `mirrors` into `out` (datasets resolve against `base`)."""
    sources = load_registry(registry)
    out = out.resolve()  # `--out .` has no name to write the .part folder beside
    read = [registry, mirrors, *(dataset_root(s, base) for s in sources if s.kind == "dataset")]
    check_out(out, force, read)
    built: list[Built] = []
    skipped: list[tuple[str, str, str]] = []
    opened: list[SourceFiles] = []
    try:
        for source in sources:  # every mirror and commit first: a missing last one stops the build at once
            opened.append(open_source(source, mirrors, base))
        _refuse_idle_patterns(sources, opened)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for source, files in zip(sources, opened, strict=True):
                candidates = list(_candidates(source, files, skipped))
                for chunk in _chunks(candidates, CHUNK):
                    payloads = [(c, _read(files, c)) for c in chunk]
                    for candidate, result in zip(chunk, pool.map(_convert_one, payloads), strict=True):
                        if isinstance(result, str):
                            skipped.append((source.label, candidate.path, result))
                        else:
                            built.append(result)
    finally:
        for files in opened:
            files.close()
    described = _link_and_split(built, skipped)
    _write(out, described, skipped)
    return BuildResult([row for row, _ in described], skipped)


def _refuse_idle_patterns(sources: list[Source], opened: list[SourceFiles]) -> None:
    """A rule that takes no file, a patient regex that reads no id or an exclusion that matches no
    file is refused before anything is converted: the films it was written for would be missing
    from the data set, kept in it, or split without their patient's other films."""
    idle = [
        f"{source.label} at {source.version[:10] or 'its files'}: {', '.join(patterns)}"
        for source, files in zip(sources, opened, strict=True)
        if source.kind != "dataset" and (patterns := source.idle_patterns(files.paths()))
    ]
    if idle:
        raise UsageError(
            f"Registry patterns that match no file: {'; '.join(idle)} (a typo in the glob or the patient regex, "
            "another commit, or a rule an earlier one takes every file of)"
        )


def _candidates(source: Source, files: SourceFiles, skipped: list[tuple[str, str, str]]) -> Iterator[Candidate]:
    if source.kind == "dataset":
        yield from _dataset_candidates(source, files, skipped)
        return
    for path in files.paths():
        rule = source.rule_for(path)
        if rule is None:
            continue
        if RESERVED_FILE.search(path):
            skipped.append((source.label, path, "named like a file reserved for independent evaluation"))
            continue
        patient = rule.patient_key(path)
        row = {
            "source": source.label,
            "commit_or_version": source.version,
            "path_in_source": path,
            "license_as_stated": source.licence,
            "age_group": rule.age_group or source.age_group,
            "note": source.note,
        }
        yield Candidate(source, path, rule.label, rule.collection, (patient,) if patient else (), row, rule.split)


def _dataset_candidates(source: Source, files: SourceFiles, skipped: list[tuple[str, str, str]]) -> Iterator[Candidate]:
    try:  # a BOM, as every other reader of a MANIFEST.csv allows (datasets.read_manifest)
        rows = list(csv.DictReader(io.StringIO(files.read("MANIFEST.csv").decode("utf-8-sig"), newline="")))
    except UnicodeDecodeError:
        raise UsageError(f"Dataset {source.name}: its MANIFEST.csv is not UTF-8") from None
    unmapped = sorted({r["source"] for r in rows} - set(source.collections))
    if unmapped:
        raise UsageError(f"Registry dataset {source.name}: no collection given for its sources {unmapped}")
    for row in sorted(rows, key=lambda r: r["id"]):
        path = f"{row['split']}/{row['label']}/{row['id']}.jpg"
        reserved = _reserved_row(row)
        if reserved:
            skipped.append((source.label, path, f"{reserved}: {row['source']}:{row.get('path_in_source', '')}"))
            continue
        patients = tuple(p for p in row.get("patient_group", "").split(";") if p)
        patients += (f"{source.name}#cluster:{row['cluster']}",) if row.get("cluster") else ()
        yield Candidate(source, path, row["label"], source.collections[row["source"]], patients, row, row["split"])


def _reserved_row(row: dict[str, str]) -> str:
    """Why a dataset's row is reserved for independent evaluation ("" if it is not): the registry
    refuses these repositories and skips these names in every other source."""
    repo = row["source"].lower()
    if repo in RESERVED_REPOS and (repo, row.get("commit_or_version", "")) not in ADMITTED_IN_DATASETS:
        return "from a repository reserved for independent evaluation"
    if RESERVED_FILE.search(row.get("path_in_source", "")):
        return "named like a file reserved for independent evaluation"
    return ""


def _read(files: SourceFiles, candidate: Candidate) -> bytes | str:
    try:
        return files.read(candidate.path)
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"  # a FolderFiles error names the absolute path


def _convert_one(payload: tuple[Candidate, bytes | str]) -> Built | str:
    candidate, data = payload
    if isinstance(data, str):
        return data
    try:
        if candidate.source.kind == "dataset":
            return _stored(candidate, data, candidate.row["id"], candidate.split)
        return _convert(candidate, data)
    except ImageError as exc:
        return str(exc)


def _convert(candidate: Candidate, data: bytes) -> Built | str:
    grey = imaging.decode_bytes(data, name=f"{candidate.source.name}: {candidate.path}").convert("L")
    with Image.open(io.BytesIO(data)) as probe:  # decodable: decode_bytes read it
        orig_format = f"{probe.format} ({probe.mode})"
    imaging.check_size(grey)
    pixels = np.asarray(grey)
    if np.mean((pixels < 32) | (pixels > 223)) >= BINARY_SHARE:
        return "binarised (70 % or more of the pixels within 32 levels of black or white)"
    width, height = grey.size
    image_id = hashing.pixel_id(grey)
    scale = MAX_SIDE / max(width, height)
    if scale < 1:
        grey = grey.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    grey.save(buffer, "JPEG", quality=JPEG_QUALITY)
    row = dict(candidate.row, orig_width=str(width), orig_height=str(height), orig_format=orig_format)
    return _stored(replace(candidate, row=row), buffer.getvalue(), image_id, candidate.split)


def _stored(candidate: Candidate, jpeg: bytes, image_id: str, split: str) -> Built:
    """Hash the image as it is stored, so the manifest's dHash can be checked against the files."""
    stored = imaging.decode_bytes(jpeg).convert("L")
    return Built(
        candidate, image_id, jpeg, hashing.dhash64(stored), hashing.dhash4096(stored), hashing.dhash256(stored), split
    )


def _link_and_split(built: list[Built], skipped: list[tuple[str, str, str]]) -> list[tuple[dict[str, str], Built]]:
    """Cluster the images, drop copies that disagree on the label, and give each row its split;
    each row comes with the image it describes (the copy whose JPEG is written).

    Copies (identical pixels, near-duplicates) of one film must carry one label; a film whose
    copies disagree is left out. Films of one patient may differ (a later film of the same
    patient can show a disease): patients only join clusters, for the split.
    """
    copies = UnionFind(len(built))
    link_groups(([f"pixels:{b.id}"] for b in built), copies)
    if built:
        h64 = np.asarray([b.h64 for b in built], dtype=np.uint64)
        for i, j in near_duplicate_pairs(h64, np.stack([b.h4096 for b in built])):
            copies.union(i, j)
    keep = [True] * len(built)
    for indices in _members(copies).values():
        labels = sorted({built[i].candidate.label for i in indices})
        if _disagree(set(labels)):
            for i in indices:
                keep[i] = False
                c = built[i].candidate
                reason = f"copies of this film carry more than one label ({', '.join(labels)})"
                skipped.append((c.source.label, c.path, reason))
    # every film links, a dropped one too: its copies may be two patients' ids of one person
    clusters = UnionFind(len(built))
    link_groups(([f"copy:{r}", *b.candidate.patients] for r, b in zip(copies.groups(), built, strict=True)), clusters)
    rows: list[tuple[dict[str, str], Built]] = []
    for indices in _members(clusters).values():
        members = [built[i] for i in indices if keep[i]]
        if members:
            rows += _cluster_rows(members)
    return sorted(rows, key=lambda described: described[0]["id"])


def _disagree(labels: set[str]) -> bool:
    """Whether copies of one film carry labels that cannot all be true. A read of ABNORMAL agrees
    with one named finding (it only names no class), not with NORMAL."""
    named = labels - {ABNORMAL}
    return len(named) > 1 or (ABNORMAL in labels and "NORMAL" in named)


def _members(uf: UnionFind) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for i, root in enumerate(uf.groups()):
        members.setdefault(root, []).append(i)
    return members


def _cluster_rows(images: list[Built]) -> list[tuple[dict[str, str], Built]]:
    """One row per distinct image, from its first copy; the others' locations go into its note."""
    key = min(b.id for b in images)
    own = {b.split for b in images if b.split}
    split = next((s for s in SPLIT_ORDER if s in own), "") or _hash_split(key)
    cluster = f"k{key}"
    patients = sorted({p for b in images for p in b.candidate.patients if "#cluster:" not in p})
    rows: dict[str, tuple[dict[str, str], Built]] = {}
    for b in images:
        c = b.candidate
        if b.id in rows:
            kept, _ = rows[b.id]
            kept["note"] = "; ".join(n for n in (kept["note"], f"same pixels at {c.source.label}:{c.path}") if n)
            continue
        row = {column: c.row.get(column, "") for column in MANIFEST_COLUMNS}
        row.update(
            id=b.id, split=split, label=c.label, cluster=cluster, patient_group=";".join(patients),
            collection=c.collection, dhash256=b.dhash256,
        )  # fmt: skip
        rows[b.id] = (row, b)
    return list(rows.values())


def _hash_split(key: str) -> str:
    share = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 16**8
    return "train" if share < 0.70 else "val" if share < 0.85 else "test"


def _write(out: Path, described: list[tuple[dict[str, str], Built]], skipped: list[tuple[str, str, str]]) -> None:
    """Write into a fresh folder beside `out`, then put it in place: no half-built tree under its name.
    Each row's file is the JPEG of the copy the row describes (a dataset's own, where it has one)."""
    part = out.with_name(f".{out.name}.part")
    shutil.rmtree(part, ignore_errors=True)
    try:
        part.mkdir(parents=True)
        for row, image in described:
            target = part / row["split"] / row["label"] / f"{row['id']}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image.jpeg)
        rows = [[row[c] for c in MANIFEST_COLUMNS] for row, _ in described]
        _write_csv(part / "MANIFEST.csv", MANIFEST_COLUMNS, rows)
        _write_csv(part / "SKIPPED.csv", SKIPPED_COLUMNS, sorted(skipped))
        if out.exists():
            shutil.rmtree(out)
        part.rename(out)
    except BaseException as exc:  # an interrupt or any other failure leaves no half-written folder either
        shutil.rmtree(part, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ReportError(f"Cannot write the data set to {out}: {exc.strerror or exc}") from None
        raise


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]] | list[tuple[str, str, str]]) -> None:
    """Write UTF-8 CSV. A mirror's file name is bytes: one that is not UTF-8 (held as surrogates)
    is written with \\xNN escapes, as the reports write such names."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([_escaped(cell) for cell in row] for row in rows)


def _escaped(cell: str) -> str:
    """A cell as UTF-8 text whatever the locale: a mirror's path is UTF-8 decoded with surrogateescape
    (readers.GitFiles), so its undecodable bytes go back the same way and become \\xNN escapes."""
    return cell.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _chunks(items: list[Candidate], size: int) -> Iterator[list[Candidate]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
