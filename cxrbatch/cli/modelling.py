"""The model commands: `train`, `export` and `evaluate` (training and export need the export extra)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.cli import Device, _setup_logging, app
from cxrbatch.errors import EXIT_FATAL, ExtraMissing


def _export_module(name: str):  # type: ignore[no-untyped-def]
    """Import a module of the export extra, or explain how to install it."""
    import importlib

    try:
        return importlib.import_module(f"export.{name}")
    except ImportError as exc:
        raise ExtraMissing(
            f"this command needs the export extra ({exc.name} is missing): pip install 'cxrbatch[export]'"
        ) from None


@app.command()
def train(
    role: Annotated[str, typer.Argument(help="gate or classifier")],
    data_dir: Annotated[Path, typer.Argument(help="folder with train/ val/ test/ <CLASS>/ subfolders")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint to write (.keras); a .json sidecar goes beside it")],
    base_weights: Annotated[
        Path | None, typer.Option("--base-weights", help="ImageNet MobileNetV2 no-top .weights.h5 file")
    ] = None,
    size: Annotated[int | None, typer.Option(help="input side in pixels (default: gate 112, classifier 224)")] = None,
    alpha: Annotated[float, typer.Option(help="MobileNetV2 width multiplier")] = 1.0,
    views: Annotated[int | None, typer.Option(help="augmented views cached per training image")] = None,
    epochs1: Annotated[int | None, typer.Option(help="max epochs, phase 1 (frozen base)")] = None,
    epochs2: Annotated[int | None, typer.Option(help="max epochs, phase 2 (top blocks unfrozen)")] = None,
    seed: Annotated[int, typer.Option(help="random seed")] = 1234,
    source_alignment: Annotated[
        float | None, typer.Option(help="classifier: weight of the per-class source alignment loss in phase 2 (0: off)")
    ] = None,
    exclude_source: Annotated[
        list[str] | None,
        typer.Option("--exclude-source", help="leave a MANIFEST.csv source out of train and val (repeatable)"),
    ] = None,
    zoom_out: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="chance that an augmented view is set in a wider frame instead of cropped "
            "(default: classifier 0.5, gate 0)",
        ),
    ] = None,
    crop_area: Annotated[
        float | None,
        typer.Option(
            min=0.1, max=1.0, help="smallest share of a film's area a random zoom-in crop keeps (default 0.7)"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the gate or the classifier (needs the export extra).

    Example: cxrbatch train classifier data/cxr --out runs/classifier.keras --base-weights mnv2_no_top.weights.h5
    """
    _setup_logging(verbose, quiet=False)
    if role not in ("gate", "classifier"):
        raise typer.BadParameter("role must be gate or classifier")
    training = _export_module("training")
    default = training.DEFAULTS[role]
    overrides = {
        "size": size,
        "views": views,
        "epochs1": epochs1,
        "epochs2": epochs2,
        "source_alignment": source_alignment,
        "exclude_sources": tuple(exclude_source) if exclude_source else None,
        "zoom_out": zoom_out,
        "crop_area": crop_area,
    }
    config = replace(default, alpha=alpha, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    if base_weights is not None and not base_weights.is_file():
        raise typer.BadParameter(f"base weights not found: {base_weights}")
    summary = training.train(role, data_dir, out, base_weights, config)
    typer.echo(f"trained {role} in {summary['train_seconds']} s -> {out}", err=True)


@app.command()
def evaluate(
    data_dir: Annotated[Path, typer.Argument(help="labelled tree: [split/]<CLASS>/images, MANIFEST.csv optional")],
    split: Annotated[str, typer.Option(help="split folder to score (ignored if absent); all: every split")] = "test",
    source: Annotated[
        list[str] | None, typer.Option("--source", help="only images of this MANIFEST.csv source (repeatable)")
    ] = None,
    models: Annotated[Path | None, typer.Option("--models", help="folder with gate.onnx and classifier.onnx")] = None,
    frame: Annotated[
        float,
        typer.Option(
            min=0.5,
            max=2.0,
            help="stress test: each film centred in a frame this many times its size "
            "(above 1: black border around it; below 1: cut to its centre; 1: as it is)",
        ),
    ] = 1.0,
    json_out: Annotated[Path | None, typer.Option("--json", help="write the full metrics as JSON")] = None,
    device: Annotated[Device, typer.Option("--device", help="where the models run")] = Device.auto,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Measure the shipped models on labelled images: accuracy, macro-F1, per class and per source.

    Example: cxrbatch evaluate data/cxr --split test --json metrics.json
    """
    import json

    from cxrbatch import evaluation
    from cxrbatch.models import default_models_dir, load_models
    from cxrbatch.pipeline import Screener
    from cxrbatch.reports import write_text

    _setup_logging(verbose, quiet=False)
    transform = evaluation.Framed(frame) if frame != 1.0 else None
    gate, classifier = load_models(models or default_models_dir(), device.value)
    screener = Screener(gate, classifier, transform=transform)
    report = evaluation.evaluate(data_dir, split, screener, tuple(source or ()))
    if json_out is not None:
        write_text(json_out, json.dumps(report, indent=2) + "\n")
    typer.echo(evaluation.format_report(report))


@app.command("export")
def export_cmd(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint made by `cxrbatch train` (.keras with .json sidecar)")],
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write, e.g. models/classifier.onnx")],
    check_images: Annotated[
        Path | None, typer.Option("--check-images", help="folder of real images for the parity check")
    ] = None,
    version: Annotated[str, typer.Option(help="model version recorded in the metadata")] = "1.0.0",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Convert a trained checkpoint to ONNX with metadata, then check it against Keras (needs the export extra).

    Example: cxrbatch export runs/classifier.keras --out models/classifier.onnx --check-images samples
    """
    _setup_logging(verbose, quiet=False)
    onnx_export = _export_module("onnx_export")
    folder = check_images or Path(__file__).resolve().parent.parent / "samples"
    images = onnx_export.pick_check_images(folder) if folder.is_dir() else []
    try:
        result = onnx_export.export(ckpt, out, images, version=version)
    except onnx_export.ExportError as exc:
        typer.echo(f"[error] export check failed: {exc}", err=True)
        raise typer.Exit(EXIT_FATAL) from None
    parity = result["parity"]
    typer.echo(
        f"exported {out}: max |keras - onnx| {parity['max_abs_diff']:.2e} on {parity['images']} images", err=True
    )
