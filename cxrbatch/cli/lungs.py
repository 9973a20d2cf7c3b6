"""`cxrbatch lungs train` and `cxrbatch lungs crop`: the lung-field box model and the cropped
training tree that measures it (export extra; see export/lungs.py)."""

from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.cli import _setup_logging, app
from cxrbatch.cli.modelling import BaseWeights, Verbose, _write_json
from cxrbatch.extras import export_module

lungs_app = typer.Typer(
    no_args_is_help=True,
    help="The lung-field box model: train it from lung outlines, cut a training tree to the lung field.\n\n"
    "Example: cxrbatch lungs train --mirrors MIRRORS --out runs/lungs.keras --base-weights W",
)
app.add_typer(lungs_app, name="lungs")


@lungs_app.command("train")
def train(
    mirrors: Annotated[Path, typer.Option("--mirrors", help="folder of local git mirrors (owner+name/)")],
    out: Annotated[Path, typer.Option("--out", help="write the Keras box model here (.keras)")],
    base_weights: BaseWeights = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the training record here")] = None,
    views: Annotated[int, typer.Option(min=1, help="views per training film (the film and views-1 framed)")] = 8,
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="random seed")] = 1234,
    verbose: Verbose = False,
) -> None:
    """Train the box around both lungs on JSRT's lung masks and the ieee8023 lung boxes.

    Reads the two repositories from MIRRORS at the commits in export/lungs.py; prints the
    record (films per split, box IoU on val and test per source).

    Example: cxrbatch lungs train --mirrors MIRRORS --out runs/lungs.keras --base-weights W --json runs/lungs.json
    """
    _setup_logging(verbose, quiet=False)
    if out.suffix != ".keras":
        raise typer.BadParameter("the box model is saved as a .keras file", param_hint="--out")
    lungs = export_module("lungs")
    model, record = lungs.train_box_model(mirrors, base_weights, views=views, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    typer.echo(_write_json(json_out, record))


@lungs_app.command("crop")
def crop(
    data_dir: Annotated[Path, typer.Argument(help="training tree (split/CLASS/files and MANIFEST.csv)")],
    model: Annotated[Path, typer.Option("--model", help="box model from `cxrbatch lungs train`")],
    out: Annotated[Path, typer.Option("--out", help="new folder for the cropped tree")],
    verbose: Verbose = False,
) -> None:
    """Copy a training tree with every film cut to its lung field (PNG, same ids and manifest).

    Example: cxrbatch lungs crop data/union --model runs/lungs.keras --out data/union-lung
    """
    _setup_logging(verbose, quiet=False)
    lungs = export_module("lungs")
    summary = lungs.crop_tree(data_dir, lungs.load_box_model(model), out)
    typer.echo(f"{summary['films']} films written to {out}; {summary['kept_whole']} kept whole (no lung box found)")
