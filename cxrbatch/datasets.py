"""Labelled image trees and their MANIFEST.csv: the one reader for training, the probe and `evaluate`.

The rule, the same for every reader:

- A tree is `DATA_DIR/[<split>/]<CLASS>/...` with splits `train`, `val`, `test`. A class is a
  non-hidden subfolder of the split folder that holds an image; its images are every image file
  below it (`discovery.iter_images`: recursive, sorted, hidden files skipped). Images are listed
  class by class in sorted class order.
- A split folder whose subfolders hold no image is flat: an image's class is the `label` column
  of the MANIFEST.csv in that folder (ids are file stems); images without a label are left out.
  Images lying beside class folders belong to no class: such a folder is refused, naming them.
- Classes are the sorted names found. Training takes them from train/ (at least two); another
  split of the same tree may lack a class but not add one.
- A MANIFEST.csv beside the splits (columns `id`, `source`, optionally `collection`, `kind`,
  `age_group`) tells where each image comes from, for leave-source-out runs and per-source
  metrics. An image's source is its `collection` where the manifest has one (a tree built by
  `cxrbatch data build` names the hospital or site there, since one repository may hold several
  collections and one collection may come from several repositories), else its `source`.
- A class folder named `ABNORMAL` holds films a reader called abnormal without naming the class
  (what most sites have: a normal/abnormal read). `evaluate` and `calibrate` count them as
  abnormal for refer or clear and leave them out of the class metrics; training refuses them.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxrbatch.discovery import iter_images
from cxrbatch.errors import UsageError, first_few

SPLITS = ("train", "val", "test")
MANIFEST = "MANIFEST.csv"
ABNORMAL = "ABNORMAL"  # a class folder of films read as abnormal, of no named class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Labelled images: paths with their integer labels (indices into `classes`)."""

    paths: list[Path]
    labels: np.ndarray
    classes: tuple[str, ...]

    def counts(self) -> dict[str, int]:
        """Count images per class."""
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.classes)}

    def names(self) -> list[str]:
        """The class name of each image."""
        return [self.classes[i] for i in self.labels.tolist()]

    def subset(self, keep: list[int]) -> Split:
        """The images at the indices `keep`, same classes."""
        return Split([self.paths[i] for i in keep], self.labels[keep], self.classes)


def class_names(data_dir: Path) -> tuple[str, ...]:
    """The classes of a training tree: those of its train/ split, sorted; at least two."""
    names = load_split(data_dir, "train").classes
    folders = {p.name for p in (data_dir / "train").iterdir() if p.is_dir() and not p.name.startswith(".")}
    empty = sorted(folders - set(names))
    if empty:  # a model without a class the tree names is not what anyone asked for
        raise UsageError(f"{data_dir / 'train'}: class folder(s) {empty} hold no image; fill or remove them")
    if ABNORMAL in names:
        raise UsageError(
            f"{data_dir / 'train' / ABNORMAL} holds films of no named class: they can calibrate and evaluate "
            "a model, not train one"
        )
    if len(names) < 2:
        raise UsageError(f"{data_dir / 'train'} needs at least two classes, found {list(names)}")
    return names


def load_split(data_dir: Path, split: str, classes: tuple[str, ...] | None = None) -> Split:
    """Read one split folder of a tree; with `classes` (train's), refuse a class outside them."""
    if not data_dir.is_dir():
        raise UsageError(f"Data folder not found: {data_dir}")
    root = data_dir / split
    if not root.is_dir():
        raise UsageError(f"{data_dir} has no {split}/ folder (expected {'/ '.join(SPLITS)}/ with <CLASS>/ folders)")
    paths, names = _read_folder(root)
    known = classes if classes is not None else tuple(sorted(set(names)))
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UsageError(f"{root} has class(es) {unknown} that train/ has not (its classes: {list(known)})")
    index = {name: i for i, name in enumerate(known)}
    return Split(paths, np.asarray([index[n] for n in names], dtype=np.int64), known)


def refuse_out_inside(data_dir: Path, out: Path, option: str = "--out") -> None:
    """Refuse an output written into the tree it is made from (over its MANIFEST.csv, its films,
    or among them, where the next read of the tree would take it for part of it)."""
    if out.resolve().is_relative_to(data_dir.resolve()):
        raise UsageError(f"{option} {out} lies inside {data_dir}: choose a place outside the tree")


def split_used(data_dir: Path, split: str | None) -> str | None:
    """The split `labelled_images` reads: `split` where its folder exists ("all": where any split
    folder does), None for a tree without split folders (read whole). A tree with split folders
    but not the one asked for is a UsageError, not the whole tree read in its place."""
    present = [s for s in SPLITS if (data_dir / s).is_dir()]
    if split and ((split == "all" and present) or (data_dir / split).is_dir()):
        return split
    if split and present:
        raise UsageError(f"{data_dir} has no {split}/ folder (its splits: {', '.join(present)})")
    return None


def labelled_images(data_dir: Path, split: str | None) -> Split:
    """Read the images to evaluate: `data_dir/split` if that folder exists, else `data_dir` itself
    (a tree without splits, or a flat labelled folder); `split="all"` joins every split present
    (for sources a model never saw, such as a leave-source-out run's)."""
    used = split_used(data_dir, split)
    if used == "all":
        roots = [data_dir / s for s in SPLITS if (data_dir / s).is_dir()]
    else:
        roots = [data_dir / used if used else data_dir]
    paths: list[Path] = []
    names: list[str] = []
    for root in roots:
        if not root.is_dir():
            raise UsageError(f"Evaluation folder not found: {root}")
        found, labels = _read_folder(root)
        paths += found
        names += labels
    if not paths:
        where = roots[0] if len(roots) == 1 else data_dir
        raise UsageError(f"No labelled images under {where} (expected <CLASS>/ folders or a {MANIFEST} with labels)")
    classes = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    return Split(paths, np.asarray([index[n] for n in names], dtype=np.int64), classes)


def _read_folder(root: Path) -> tuple[list[Path], list[str]]:
    """The images of one split folder and their class names, by the module's rule."""
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    paths: list[Path] = []
    names: list[str] = []
    for folder in folders:
        found = list(iter_images([folder]))
        paths += found
        names += [folder.name] * len(found)
    if paths:
        refuse_loose(root, folders, sorted(set(names)))
    else:  # flat: no subfolder holds an image (an empty one, or one of notes, is no class)
        manifest = read_manifest(root)
        for path in iter_images([root]):
            label = manifest.get(path.stem, {}).get("label")
            if label:
                paths.append(path)
                names.append(label)
    return paths, names


def refuse_loose(root: Path, folders: list[Path], classes: list[str]) -> None:
    """Refuse images lying beside class folders: they belong to no class, and left out they would
    be missing from every figure without a word."""
    loose = list(iter_images([root], skip=folders))  # the files of `root` itself
    if loose:
        raise UsageError(
            f"{root} holds class folders ({', '.join(classes)}) and images beside them, of no class: "
            f"{first_few([p.name for p in loose], 5, ', ')}; move each into its class folder, or out of the tree"
        )


def read_manifest(data_dir: Path) -> dict[str, dict[str, str]]:
    """Map image id (file stem) to its MANIFEST.csv row; {} without a manifest. A manifest with no
    `id` column, one id on two rows, or one id that two films of the tree bear (in any of its
    splits) is a UsageError: its rows, or those films, could not be told apart, and a film would
    take another's source, label or cluster."""
    manifest = data_dir / MANIFEST
    if not manifest.is_file():
        return {}
    fields, rows = _manifest_rows(manifest)
    if "id" not in fields:
        raise UsageError(f"{manifest} has no `id` column (the file stem of each image)")
    ids = Counter(row["id"] for row in rows)
    twice = sorted(i for i, n in ids.items() if n > 1)
    if twice:
        raise UsageError(f"{manifest} lists an id on more than one row: {first_few(twice, 5, ', ')}")
    present = [data_dir / s for s in SPLITS if (data_dir / s).is_dir()]
    refuse_shared_ids(iter_images(present or [data_dir]), data_dir, listed=set(ids))
    return {row["id"]: row for row in rows}


def refuse_shared_ids(paths: Iterable[Path], where: Path, listed: set[str] | None = None) -> None:
    """Refuse films that share an id (their file stem), naming the first few: whatever is looked up
    by id (a manifest row, a kept feature) would be one film's for both. With `listed`, only ids
    among them count (a stem no manifest row names takes no film's row)."""
    first: dict[str, Path] = {}
    shared: list[str] = []
    for path in paths:
        if listed is None or path.stem in listed:
            seen = first.setdefault(path.stem, path)
            if seen != path:
                shared.append(f"{_within(seen, where)} and {_within(path, where)}")
    if shared:
        raise UsageError(
            f"{where}: films share an id (the file stem), so they cannot be told apart: {first_few(shared, 3, '; ')}"
            "; give each film a name of its own"
        )


def _within(path: Path, root: Path) -> Path:
    return path.relative_to(root) if path.is_relative_to(root) else path


def _manifest_rows(manifest: Path) -> tuple[list[str], list[dict[str, str]]]:
    """The column names and rows of a MANIFEST.csv; one that is not UTF-8 CSV (a spreadsheet's
    Latin-1 export) is a UsageError naming it."""
    try:
        with manifest.open(newline="", encoding="utf-8-sig") as fh:  # a BOM (a spreadsheet's save) is not part of "id"
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)
    except UnicodeDecodeError:
        raise UsageError(f'{manifest} is not UTF-8 text: it must be UTF-8 (save it again as "CSV UTF-8")') from None
    except csv.Error as exc:
        raise UsageError(f"{manifest} cannot be read as CSV ({exc}): it must be UTF-8 CSV") from None


def source_of(row: dict[str, str]) -> str:
    """The source a manifest row names: its `collection` where it has one, else its `source`."""
    return row.get("collection") or row.get("source", "")


def sources_of(paths: list[Path], manifest: dict[str, dict[str, str]]) -> list[str]:
    """The source (`source_of`) of each image ("" where unknown); ids are file stems."""
    return [source_of(manifest.get(p.stem, {})) for p in paths]


def _named(row: dict[str, str], sources: tuple[str, ...]) -> bool:
    """Whether a manifest row comes from one of `sources`, named by collection or by repository."""
    return source_of(row) in sources or row.get("source", "") in sources


def left_out(paths: list[Path], manifest: dict[str, dict[str, str]], sources: tuple[str, ...]) -> np.ndarray:
    """Which images a model trained without `sources` must not see: theirs, and every image that
    shares a cluster (the manifest's `cluster` column: copies of one film, one patient's films)
    with one of theirs, in any split. The same film under another collection's name (the curated
    Kaggle set holds re-encoded Kermany and ieee8023 films) would otherwise train a model that is
    then scored on that collection as one it never saw."""
    touched = {row["cluster"] for row in manifest.values() if row.get("cluster") and _named(row, sources)}
    rows = [manifest.get(p.stem, {}) for p in paths]
    return np.array([_named(r, sources) or r.get("cluster", "") in touched for r in rows], dtype=bool)


def without_sources(split: Split, manifest: dict[str, dict[str, str]], sources: tuple[str, ...]) -> Split:
    """The split less what a model trained without `sources` must not see (`left_out`)."""
    if not sources:
        return split
    _check_known(manifest, sources)
    gone = left_out(split.paths, manifest, sources)
    own = [_named(manifest.get(p.stem, {}), sources) for p in split.paths]
    by_cluster = int(gone.sum()) - sum(own)
    if by_cluster:
        log.info("left out with %s: %d more film(s) of other sources in their clusters", ", ".join(sources), by_cluster)
    return split.subset(np.flatnonzero(~gone).tolist())


def only_sources(split: Split, manifest: dict[str, dict[str, str]], sources: tuple[str, ...]) -> Split:
    """Only the images whose manifest source is one of `sources` (what a leave-source-out model never saw)."""
    if not sources:
        return split
    _check_known(manifest, sources)
    keep = [i for i, p in enumerate(split.paths) if _named(manifest.get(p.stem, {}), sources)]
    if not keep:
        raise UsageError(f"No image of this selection comes from the source(s) {list(sources)}")
    return split.subset(keep)


def _check_known(manifest: dict[str, dict[str, str]], sources: tuple[str, ...]) -> None:
    unknown = sorted(s for s in sources if not any(_named(row, (s,)) for row in manifest.values()))
    if unknown:
        raise UsageError(f"No image in the {MANIFEST} comes from the collection(s) or source(s) {unknown}")
    for name in sources:  # a collection of some rows and the repository of others: which is meant?
        if any(source_of(r) == name for r in manifest.values()) and any(
            r.get("source") == name and source_of(r) != name for r in manifest.values()
        ):
            raise UsageError(f"{name!r} names a collection of the {MANIFEST} and the source of other rows: rename one")
