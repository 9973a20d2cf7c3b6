"""Where a build writes: an `--out` folder that it replaces whole, so it must hold nothing else.

A build writes a fresh folder beside `--out` and then puts it in place of `--out` (`builder`).
Before anything is read, the folder is checked: it must not hold what the build reads (the
registry, the mirrors, a dataset source), and an existing one is replaced only with `force` and
only if it holds nothing but what a build writes: MANIFEST.csv, SKIPPED.csv and
`split/LABEL/*.jpg` files, no links.
"""

from __future__ import annotations

from pathlib import Path

from cxrbatch.databuild.registry import LABELS
from cxrbatch.datasets import ABNORMAL, SPLITS
from cxrbatch.errors import UsageError

BUILT_FILES = ("MANIFEST.csv", "SKIPPED.csv")


def check_out(out: Path, force: bool, read: list[Path]) -> None:
    """Refuse an `out` (resolved) holding any of the paths in `read`, or not empty unless `force`
    and it holds only what a build writes."""
    inside = [path for path in read if path.resolve().is_relative_to(out)]
    if inside:
        raise UsageError(f"{inside[0]} lies inside --out {out}, which the build replaces: choose another --out")
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise UsageError(f"{out} exists and is not empty; pass --force to replace it")
    if not out.is_dir() or not all((out / name).is_file() for name in BUILT_FILES):
        # both are what a build writes; a MANIFEST.csv alone is also a dataset source (the
        # developer set), a `data select` folder or an evaluation site
        raise UsageError(
            f"{out} holds no MANIFEST.csv and SKIPPED.csv: refusing to replace a folder this command did not build"
        )
    foreign = not_built(out)
    if foreign:
        raise UsageError(
            f"{out} holds {foreign[0].relative_to(out)}, which a build does not write: refusing to replace a folder "
            "this command did not build"
        )


def not_built(out: Path) -> list[Path]:
    """What in `out` a build does not write, sorted."""
    foreign = []
    for top in out.iterdir():
        if top.name in BUILT_FILES and _is_file(top):
            continue
        if not (top.name in SPLITS and _is_folder(top)):
            foreign.append(top)
            continue
        for label in top.iterdir():
            if label.name in (*LABELS, ABNORMAL) and _is_folder(label):
                foreign += [p for p in label.iterdir() if not (p.suffix == ".jpg" and _is_file(p))]
            else:
                foreign.append(label)
    return sorted(foreign)


def _is_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()
