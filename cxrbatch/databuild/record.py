"""The training-data record of a shipped model: a built tree's manifest without the images.

`models/training-manifest.csv` is this record of the shipped classifier's tree: one row per image
with where it came from (source, commit or version, path in source, licence as stated), how it was
used (split, label, collection) and its `dhash256`, so anyone can check another collection for
overlap with the training films without having the films.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from cxrbatch.datasets import MANIFEST, read_manifest
from cxrbatch.errors import UsageError

RECORD_COLUMNS = (
    "id", "split", "label", "collection", "source", "commit_or_version", "path_in_source",
    "license_as_stated", "age_group", "patient_group", "dhash256",
)  # fmt: skip


def training_record(data_dir: Path) -> tuple[str, int]:
    """The record of the tree `cxrbatch data build` wrote to `data_dir`: CSV text sorted by id, and its rows."""
    read_manifest(data_dir)  # its checks: an `id` column, each id once
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        raise UsageError(f"{data_dir} has no {MANIFEST}: build it with `cxrbatch data build`")
    with manifest.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in RECORD_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{manifest} lacks the column(s) {missing}: was it written by `cxrbatch data build`?")
        rows = sorted(([row[c] for c in RECORD_COLUMNS] for row in reader), key=lambda r: r[0])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(RECORD_COLUMNS)
    writer.writerows(rows)
    return out.getvalue(), len(rows)
