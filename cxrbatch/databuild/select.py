"""A labelled folder of some of a built tree's films (`cxrbatch data select`), linked, not copied.

The fold studies calibrate a model on the val films of the collections it was trained on, and
score it on those of a collection it never saw. `cxrbatch calibrate` reads a site's folder of
`<LABEL>/` subfolders and knows nothing of splits or sources, so the selection is written as
such a folder: one symbolic link per film to the tree's own file (the films are not copied) and
a MANIFEST.csv of the selected rows, so that `evaluate` still reports per source on it. Selecting
again with `force` replaces only a folder that this module wrote.
"""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

from cxrbatch.datasets import (
    MANIFEST,
    SPLITS,
    Split,
    labelled_images,
    only_sources,
    read_manifest,
    refuse_out_inside,
    without_sources,
)
from cxrbatch.errors import UsageError


def select(
    data_dir: Path,
    split: str,
    out: Path,
    *,
    only: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
    force: bool = False,
) -> Split:
    """Link the films of `split` ("all": every split) from the sources `only` (if any) less `exclude` into `out`."""
    if split not in (*SPLITS, "all"):
        raise UsageError(f"--split {split!r}: choose one of {', '.join(SPLITS)} or all")
    manifest = read_manifest(data_dir)
    if (only or exclude) and not manifest:
        raise UsageError(f"{data_dir} has no {MANIFEST}: sources cannot be selected without one")
    refuse_out_inside(data_dir, out)
    if split != "all" and not (data_dir / split).is_dir():
        raise UsageError(f"{data_dir} has no {split}/ folder")
    chosen = without_sources(only_sources(labelled_images(data_dir, split), manifest, only), manifest, exclude)
    if not chosen.paths:
        raise UsageError("No film is left in this selection")
    links = [Path(label) / path.name for path, label in zip(chosen.paths, chosen.names(), strict=True)]
    if len(set(links)) < len(links):
        twice = sorted(str(link) for link, n in Counter(links).items() if n > 1)
        raise UsageError(f"selected films share the name(s) {twice[:3]}: select one split at a time")
    _clear(out, force)
    out.mkdir(parents=True)
    for path, link in zip(chosen.paths, links, strict=True):
        (out / link).parent.mkdir(exist_ok=True)
        (out / link).symlink_to(path.resolve())
    _write_manifest(out / MANIFEST, manifest, {p.stem for p in chosen.paths})
    return chosen


def _clear(out: Path, force: bool) -> None:
    """Refuse an existing `out`, or with `force` remove it if it holds only a selection (links and a manifest)."""
    if not out.exists():
        return
    if not force:
        raise UsageError(f"{out} exists; choose another folder or pass --force to replace an earlier selection")
    foreign = [
        p for p in out.rglob("*") if not (p.is_symlink() or p.is_dir() or (p.parent == out and p.name == MANIFEST))
    ]
    if not out.is_dir() or foreign:
        raise UsageError(f"{out} holds files that `cxrbatch data select` did not write; it is left as it is")
    shutil.rmtree(out)


def _write_manifest(target: Path, manifest: dict[str, dict[str, str]], ids: set[str]) -> None:
    """Write the tree's manifest rows of the selected films (every column, the tree's order); none without one."""
    if not manifest:
        return
    with target.open("w", newline="", encoding="utf-8") as out:
        writer = csv.DictWriter(out, fieldnames=list(next(iter(manifest.values()))), lineterminator="\n")
        writer.writeheader()
        writer.writerows(row for film, row in manifest.items() if film in ids)
