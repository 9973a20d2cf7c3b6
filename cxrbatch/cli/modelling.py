"""The model commands: `train`, `export`, `evaluate`, `probe` and `loco` (the commands that derive
a model from an exported one are in `cxrbatch.cli.derive`).

All but `evaluate` run the export side (`cxrbatch.extras`), imported only when the command runs,
so every `--help` works without the export extra. Errors are raised, never caught here: the
command group turns them into one `[error]` line and the exit code of their class.
"""

import contextlib
import json
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from cxrbatch.cli import Device, _setup_logging, app
from cxrbatch.extras import export_module

Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="log debug messages, and the traceback of a failure")]
BaseWeights = Annotated[
    Path | None,
    typer.Option("--base-weights", help="ImageNet MobileNetV2 no-top .weights.h5 file (default: random init)"),
]


class Role(str, Enum):
    """Which of the two models."""

    gate = "gate"
    classifier = "classifier"


def _json_target(path: Path | None, data_dir: Path) -> None:
    """Refuse, before the work, a --json file that cannot be written, or that lies inside the tree
    the command reads (over a film, over its MANIFEST.csv)."""
    from cxrbatch.datasets import refuse_out_inside
    from cxrbatch.reports import check_writable

    if path is not None and str(path) != "-":
        refuse_out_inside(data_dir, path, "--json")
        check_writable(path)


def _to_stdout(path: Path | None) -> bool:
    """Whether --json names stdout (-), which then holds the JSON alone: tables go to stderr."""
    return path is not None and str(path) == "-"


def _write_json(path: Path | None, data: dict[str, Any]) -> str:
    """The report as indented JSON, also written to `path` when given."""
    from cxrbatch.reports import write_text

    text = json.dumps(data, indent=2)
    if path is not None:
        write_text(path, text + "\n")
    return text


@app.command()
def train(
    role: Annotated[Role, typer.Argument(metavar="ROLE", help="which model to train: gate or classifier")],
    data_dir: Annotated[Path, typer.Argument(help="folder with train/ val/ (test/) <CLASS>/ subfolders")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint to write (.keras); a .json sidecar goes beside it")],
    base_weights: BaseWeights = None,
    size: Annotated[int | None, typer.Option(help="input side in pixels (default: gate 112, classifier 224)")] = None,
    alpha: Annotated[float, typer.Option(help="MobileNetV2 width multiplier")] = 1.0,
    views: Annotated[
        int | None,
        typer.Option(
            help="views cached per training image: the image itself and views-1 augmented "
            "(default: gate 3, classifier 10)"
        ),
    ] = None,
    epochs1: Annotated[
        int | None,
        typer.Option(
            help="most epochs of phase 1, the head on frozen features; early stopping may end it sooner (default: 40)"
        ),
    ] = None,
    epochs2: Annotated[
        int | None,
        typer.Option(
            help="most epochs of phase 2, the layers above the cache point unfrozen; 0 skips it "
            "(default: gate 8, classifier 30)"
        ),
    ] = None,
    lr2: Annotated[
        float | None,
        typer.Option(min=1e-7, max=1e-2, help="Adam learning rate of phase 2 (default: gate 0.0001, classifier 3e-05)"),
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option(min=0.0, max=0.5, help="classifier: of the head's loss (default: 0)")
    ] = None,
    seed: Annotated[int, typer.Option(help="random seed (the same seed gives the same views)")] = 1234,
    source_alignment: Annotated[
        float | None,
        typer.Option(help="classifier: weight of the per-class source alignment loss in phase 2 (default: 0, off)"),
    ] = None,
    exclude_source: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude-source",
            help="leave a collection or source out of train and val, and films in its clusters (repeatable)",
        ),
    ] = None,
    zoom_out: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="chance that an augmented view is set in a wider frame instead of cropped "
            "(default: gate 0, classifier 0.5)",
        ),
    ] = None,
    crop_area: Annotated[
        float | None,
        typer.Option(
            min=0.1, max=1.0, help="smallest share of a film's area a random zoom-in crop keeps (default: 0.7)"
        ),
    ] = None,
    negative_label: Annotated[
        str | None,
        typer.Option(
            help="classifier: the class folder that is not a finding, recorded in the model (default: NORMAL)"
        ),
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Train the gate or the classifier (needs the export extra).

    Example: cxrbatch train classifier data/cxr --out runs/classifier.keras --base-weights mnv2_no_top.weights.h5
    """
    _setup_logging(verbose, quiet=False)
    config_module = export_module("config")
    overrides = {
        "size": size,
        "views": views,
        "epochs1": epochs1,
        "epochs2": epochs2,
        "lr2": lr2,
        "label_smoothing": label_smoothing,
        "source_alignment": source_alignment,
        "exclude_sources": tuple(exclude_source) if exclude_source else None,
        "zoom_out": zoom_out,
        "crop_area": crop_area,
        "negative_label": negative_label,
    }
    default = config_module.DEFAULTS[role.value]
    config = replace(default, alpha=alpha, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    summary = export_module("training").train(role.value, data_dir, out, base_weights, config)
    typer.echo(f"trained {role.value} in {summary['train_seconds']} s -> {out}", err=True)


@app.command()
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="labelled tree: [split/]<CLASS>/images, MANIFEST.csv optional")],
    split: Annotated[
        str, typer.Option(help="split folder to score (a tree without splits: all of it); all: every split")
    ] = "test",
    source: Annotated[
        list[str] | None,
        typer.Option("--source", help="only images of this collection or MANIFEST.csv source (repeatable)"),
    ] = None,
    models: Annotated[
        Path | None,
        typer.Option("--models", help="folder with gate.onnx and classifier.onnx (default: the shipped models)"),
    ] = None,
    frame: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=2.0,
            help="stress test: each film centred in a frame this many times its size "
            "(above 1: black border around it; below 1: cut to its centre; 1: as it is)",
        ),
    ] = 1.0,
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="also write the full metrics as JSON, or - for stdout (the table then to stderr)"),
    ] = None,
    device: Annotated[Device, typer.Option("--device", help="where the models run")] = Device.auto,
    verbose: Verbose = False,
) -> None:
    """Measure the models on labelled images: accuracy, macro-F1, per class and per source (no extra needed).

    Example: cxrbatch evaluate data/cxr --split test --json metrics.json
    """
    from cxrbatch import evaluation
    from cxrbatch.models import default_models_dir, load_models
    from cxrbatch.pipeline import Screener

    _setup_logging(verbose, quiet=False)
    _json_target(json_out, data_dir)  # before the scoring, not after it
    transform = evaluation.Framed(frame) if frame != 1.0 else None
    gate, classifier = load_models(models or default_models_dir(), device.value)
    report = evaluation.evaluate(data_dir, split, Screener(gate, classifier, transform=transform), tuple(source or ()))
    # shown even if the JSON then cannot be written; on stderr when the JSON goes to stdout, which
    # then holds the JSON alone (as `run`'s stdout holds one report)
    typer.echo(evaluation.format_report(report), err=_to_stdout(json_out))
    _write_json(json_out, report)


@app.command("export")
def export_cmd(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint made by `cxrbatch train` (.keras with .json sidecar)")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write, e.g. models/classifier.onnx")],
    check_images: Annotated[
        Path,
        typer.Option(
            "--check-images",
            help="folder of real images of the kind the model will see (e.g. the val split); up to 32 spread "
            "over it must give the same outputs in Keras and onnxruntime",
        ),
    ],
    version: Annotated[str, typer.Option(help="model version recorded in the metadata")] = "1.0.0",
    verbose: Verbose = False,
) -> None:
    """Convert a trained checkpoint to ONNX with metadata, then check it against Keras (needs the export extra).

    Example: cxrbatch export runs/classifier.keras --out models/classifier.onnx --check-images data/cxr/val
    """
    _setup_logging(verbose, quiet=False)
    onnx_export = export_module("onnx_export")
    result = onnx_export.export(ckpt, out, onnx_export.pick_check_images(check_images), version=version)
    parity = result["parity"]
    typer.echo(
        f"exported {out}: max |keras - onnx| {parity['max_abs_diff']:.2e} on {parity['images']} images", err=True
    )


@app.command()
def probe(
    ckpt: Annotated[Path, typer.Argument(help="classifier checkpoint made by `cxrbatch train`")],
    data_dir: Annotated[Path, typer.Argument(help="its training tree, with a MANIFEST.csv `source` column")],
    base_weights: Annotated[
        Path | None,
        typer.Option("--base-weights", help="also probe this ImageNet initialisation, for comparison"),
    ] = None,
    label: Annotated[
        str | None, typer.Option(help="class whose images are probed (default: the checkpoint's negative label)")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="also write the report to this file, or - for stdout (printed once)")
    ] = None,
    verbose: Verbose = False,
) -> None:
    """Measure how well a classifier's features tell an image's source: a shortcut check (needs the export extra).

    Prints, as JSON, a linear probe's val accuracy at naming the source of images of one class,
    against the majority baseline.

    Example: cxrbatch probe runs/classifier.keras data/cxr --base-weights mnv2_no_top.weights.h5
    """
    _setup_logging(verbose, quiet=False)
    _json_target(json_out, data_dir)
    with contextlib.redirect_stdout(sys.stderr):  # stdout holds the report alone
        report = export_module("probe").probe(ckpt, data_dir, base_weights, label)
    text = _write_json(json_out, report)
    if not _to_stdout(json_out):  # or it would be there twice
        typer.echo(text)


@app.command()
def loco(
    data_dir: Annotated[Path, typer.Argument(help="training tree with a MANIFEST.csv naming each image's collection")],
    json_out: Annotated[
        Path, typer.Option("--json", help="write the study's record here, or - for stdout (the table then to stderr)")
    ],
    base_weights: BaseWeights = None,
    fold: Annotated[
        list[str] | None,
        typer.Option("--fold", help="collection to leave out (repeatable; default: every one whose class has others)"),
    ] = None,
    features_cache: Annotated[
        Path | None, typer.Option("--features-cache", help="keep the features here and reuse them when they match")
    ] = None,
    with_tree: Annotated[
        Path | None,
        typer.Option(
            "--with",
            help="a second tree of the same films by id (e.g. cut to the lung field): "
            "each film's features of both trees side by side",
        ),
    ] = None,
    with_cache: Annotated[
        Path | None, typer.Option("--with-features-cache", help="as --features-cache, for the --with tree")
    ] = None,
    size: Annotated[int, typer.Option(help="input side in pixels")] = 224,
    alpha: Annotated[float, typer.Option(help="MobileNetV2 width multiplier")] = 1.0,
    views: Annotated[int, typer.Option(min=1, help="views per training image (the image and views-1 augmented)")] = 10,
    seed: Annotated[int, typer.Option(help="random seed")] = 1234,
    zoom_out: Annotated[float, typer.Option(min=0.0, max=1.0, help="as `train --zoom-out`")] = 0.5,
    crop_area: Annotated[float, typer.Option(min=0.1, max=1.0, help="as `train --crop-area`")] = 0.7,
    label_smoothing: Annotated[float, typer.Option(min=0.0, max=0.5, help="of the head's loss")] = 0.0,
    epochs1: Annotated[
        int, typer.Option(min=1, help="most epochs of each head (early stopping may end it sooner)")
    ] = 40,
    negative_label: Annotated[str, typer.Option(help="the class folder that is not a finding")] = "NORMAL",
    verbose: Verbose = False,
) -> None:
    """Leave-one-collection-out study of the head-only classifier recipe (needs the export extra).

    For each collection, a head trained without its images scores all of them: recall per class,
    share called NORMAL, AUCs. The recipe is `train classifier --epochs2 0` with the same options.

    Example: cxrbatch loco data/union --json runs/loco.json --base-weights mnv2_no_top.weights.h5
    """
    _setup_logging(verbose, quiet=False)
    _json_target(json_out, data_dir)
    config_module = export_module("config")
    config = replace(
        config_module.DEFAULTS["classifier"], size=size, alpha=alpha, views=views, seed=seed, zoom_out=zoom_out,
        crop_area=crop_area, label_smoothing=label_smoothing, epochs1=epochs1, epochs2=0,
        negative_label=negative_label,
    )  # fmt: skip
    loco_module = export_module("loco")
    if with_cache is not None and with_tree is None:
        raise typer.BadParameter("--with-features-cache needs --with", param_hint="--with-features-cache")
    also = None if with_tree is None else (with_tree, with_cache)
    with contextlib.redirect_stdout(sys.stderr):  # Keras prints its epochs to stdout, which holds the table
        record = loco_module.study(data_dir, base_weights, config, tuple(fold or ()), features_cache, also)
    _write_json(json_out, record)
    typer.echo(loco_module.format_study(record), err=_to_stdout(json_out))  # stdout: one report
