"""`cxrbatch data`: the training tree rebuilt from the registry and local mirrors, its record, selections of it."""

from collections import Counter
from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.cli import _setup_logging, app

data_app = typer.Typer(
    no_args_is_help=True,
    help="Build training data from a source registry, record it, select from it.\n\n"
    "Example: cxrbatch data build export/registry.toml --mirrors MIRRORS --out DATA_DIR",
)
app.add_typer(data_app, name="data")


@data_app.command("build")
def build(
    registry: Annotated[Path, typer.Argument(help="the source registry (TOML), e.g. export/registry.toml")],
    mirrors: Annotated[
        Path, typer.Option("--mirrors", help="folder of local git mirrors (owner+name/) and wheel files")
    ],
    out: Annotated[Path, typer.Option("--out", help="folder to write the tree and MANIFEST.csv into")],
    force: Annotated[bool, typer.Option("--force", help="replace an earlier build in --out")] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, help="conversion threads")] = 2,
    base: Annotated[
        Path | None,
        typer.Option("--base", help="where a dataset source's folder is resolved [default: the registry's folder]"),
    ] = None,
) -> None:
    """Convert, deduplicate and split every source of REGISTRY into one labelled tree.

    Reads only local copies (it downloads nothing); the same inputs give byte-identical output.
    Files that cannot be used are listed in OUT/SKIPPED.csv with the reason. A rule's `split`
    keeps its films in that split; export/sites.toml builds evaluation sites (test/NORMAL and
    test/ABNORMAL) that no model trains on.

    Example: cxrbatch data build export/registry.toml --mirrors ~/mirrors --out ~/data/union
    """
    from cxrbatch.databuild.builder import build as build_tree
    from cxrbatch.errors import UsageError

    _setup_logging(verbose=False, quiet=False)
    if not registry.is_file():
        raise UsageError(f"Registry not found: {registry}")
    result = build_tree(registry, mirrors, out, base or registry.parent, workers=workers, force=force)
    typer.echo(f"{'collection':<28} {'label':<13} {'train':>6} {'val':>6} {'test':>6}")
    counts = result.counts()
    for collection, label in sorted({(c, lab) for c, lab, _ in counts}):
        row = [counts[(collection, label, split)] for split in ("train", "val", "test")]
        typer.echo(f"{collection:<28} {label:<13} {row[0]:>6} {row[1]:>6} {row[2]:>6}")
    reasons = Counter(reason.split(":")[0] for _, _, reason in result.skipped)
    typer.echo(f"{len(result.rows)} images written to {out}; {len(result.skipped)} files skipped (SKIPPED.csv)")
    for reason, n in reasons.most_common():
        typer.echo(f"  skipped {n}: {reason}")


@data_app.command("record")
def record(
    data_dir: Annotated[Path, typer.Argument(help="a tree written by `cxrbatch data build`")],
    out: Annotated[Path, typer.Option("--out", help="CSV to write, e.g. models/training-manifest.csv")],
) -> None:
    """Write the training-data record of a built tree: its manifest without the images.

    One row per image: source, commit or version, path in source, licence, split, label,
    collection and dhash256 (the check for overlap with other collections).

    Example: cxrbatch data record ~/data/union --out models/training-manifest.csv
    """
    from cxrbatch.databuild.record import training_record
    from cxrbatch.datasets import refuse_out_inside
    from cxrbatch.reports import write_text

    refuse_out_inside(data_dir, out)
    text, images = training_record(data_dir)
    write_text(str(out), text)
    typer.echo(f"wrote the record of {images} images to {out}", err=True)


@data_app.command("select")
def select(
    data_dir: Annotated[Path, typer.Argument(help="a labelled tree, e.g. one written by `cxrbatch data build`")],
    out: Annotated[Path, typer.Option("--out", help="folder to write the <LABEL>/ links and MANIFEST.csv into")],
    split: Annotated[str, typer.Option(help="split to take (train, val, test); all: every split")] = "val",
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="only films of this collection or MANIFEST.csv source (repeatable)"),
    ] = None,
    exclude_source: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-source",
            help="leave this collection or MANIFEST.csv source out, and films in its clusters (repeatable)",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an earlier selection in --out")] = False,
) -> None:
    """Link some of a tree's films into a labelled folder that `calibrate`, `evaluate` and `run` read.

    The films are linked, not copied; OUT/MANIFEST.csv keeps their rows. For example, a fold
    model trained without NIH is calibrated on the val films of the collections it saw:

    Example: cxrbatch data select data/union --split val --exclude-source nih-cxr14 --out runs/val-seen
    """
    from cxrbatch.databuild.select import select as select_films

    chosen = select_films(
        data_dir, split, out, only=tuple(source or ()), exclude=tuple(exclude_source or ()), force=force
    )
    counts = ", ".join(f"{label} {n}" for label, n in chosen.counts().items() if n)
    typer.echo(f"linked {len(chosen.paths)} films into {out} ({counts})")
