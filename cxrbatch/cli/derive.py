"""The commands that write a model derived from an exported one: `quantize` and `half` (smaller
copies), `familiarity` and `referral-head` (a classifier with an extra output computed from its
pooled features).

Each runs the export side (`cxrbatch.extras`), imported only when the command runs, so every
`--help` works without the export extra. Errors are raised, never caught here: the command group
turns them into one `[error]` line and the exit code of their class.
"""

from pathlib import Path
from typing import Annotated

import typer

from cxrbatch.cli import _setup_logging, app
from cxrbatch.cli.modelling import Verbose
from cxrbatch.extras import export_module

Force = Annotated[bool, typer.Option("--force", help="replace an existing DST")]
ExcludeSource = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude-source",
        help="leave a collection or source out (and its clusters), as the model's training did (repeatable)",
    ),
]


@app.command()
def quantize(
    src: Annotated[Path, typer.Argument(help="exported ONNX model")],
    dst: Annotated[Path, typer.Argument(help="int8 ONNX model to write")],
    calibration: Annotated[Path, typer.Option(help="folder of images to calibrate on, e.g. the train split")],
    images: Annotated[
        int,
        typer.Option(
            help="how many calibration images, spread over the folder (at least 20); at least 20 of them must be "
            "readable as a screening run reads them (not too small to be a radiograph)",
        ),
    ] = 200,
    force: Force = False,
    verbose: Verbose = False,
) -> None:
    """Write a static int8 copy of an exported model, for comparison with `cxrbatch evaluate`.

    A classifier with a referral head (the bundled one) is refused: take the model `cxrbatch export` wrote.
    An existing DST is refused unless --force.

    Example: cxrbatch quantize runs/c140/classifier.onnx runs/int8/classifier.onnx --calibration data/cxr/train
    """
    _setup_logging(verbose, quiet=False)
    export_module("quantize").quantize(src, dst, calibration, images, force)
    typer.echo(f"wrote int8 copy {dst}", err=True)


@app.command()
def half(
    src: Annotated[Path, typer.Argument(help="exported ONNX model")],
    dst: Annotated[Path, typer.Argument(help="float16 ONNX model to write (float32 inputs and outputs)")],
    force: Force = False,
    verbose: Verbose = False,
) -> None:
    """Write a float16 copy of an exported model, meant for the CUDA provider (needs the export extra).

    A classifier with a referral head (the bundled one) is refused: take the model `cxrbatch export` wrote.
    An existing DST is refused unless --force.

    Example: cxrbatch half runs/c140/classifier.onnx runs/fp16/classifier.onnx
    """
    _setup_logging(verbose, quiet=False)
    export_module("half").halve(src, dst, force)
    typer.echo(f"wrote float16 copy {dst}", err=True)


@app.command()
def familiarity(
    src: Annotated[Path, typer.Argument(help="exported classifier ONNX model")],
    dst: Annotated[Path, typer.Argument(help="classifier ONNX model to write, with the familiarity output")],
    data_dir: Annotated[
        Path,
        typer.Option("--data", help="the classifier's training data: train/ gives the statistics, val/ the threshold"),
    ],
    gate: Annotated[Path, typer.Option("--gate", help="the gate ONNX model (its decoding settings are shared)")],
    percentile: Annotated[
        float, typer.Option(min=50.0, max=100.0, help="val percentile of the distance above which a film is unfamiliar")
    ] = 99.0,
    exclude_source: ExcludeSource = None,
    statistic: Annotated[
        str,
        typer.Option(
            help="knn: 1 - cosine similarity to the 10th most similar training film; "
            "mahalanobis: distance to the training films' mean"
        ),
    ] = "knn",
    replace: Annotated[
        bool, typer.Option("--replace", help="replace the model's familiarity output instead of refusing")
    ] = False,
    version: Annotated[str | None, typer.Option(help="model version to record (default: unchanged)")] = None,
    verbose: Verbose = False,
) -> None:
    """Add a `familiarity` output to a classifier: how far a film's features lie from its training films'.

    Example: cxrbatch familiarity runs/classifier.onnx models/classifier.onnx --data data/cxr --gate models/gate.onnx
    """
    _setup_logging(verbose, quiet=False)
    excluded = tuple(exclude_source or ())
    record = export_module("familiarity").add_familiarity(
        src, dst, data_dir, gate, percentile, excluded, statistic=statistic, replace=replace, version=version
    )
    typer.echo(f"wrote {dst}: unfamiliar above {record['threshold']} ({record['threshold_rule']})", err=True)


@app.command("referral-head")
def referral_head(
    src: Annotated[Path, typer.Argument(help="exported classifier ONNX model")],
    dst: Annotated[Path, typer.Argument(help="classifier ONNX model to write, with the referral output")],
    data_dir: Annotated[
        Path,
        typer.Option(
            "--data", help="the classifier's training data with its MANIFEST.csv: train/ fits the head, val/ scales it"
        ),
    ],
    gate: Annotated[Path, typer.Option("--gate", help="the gate ONNX model (its decoding settings are shared)")],
    exclude_source: ExcludeSource = None,
    version: Annotated[str | None, typer.Option(help="model version to record (default: unchanged)")] = None,
    verbose: Verbose = False,
) -> None:
    """Add a bundled `referral` output to a classifier: abnormal against normal, learnt only from the
    differences within each training collection. The model's referral threshold is dropped: choose
    the new one with `cxrbatch calibrate` on the val split.

    Example: cxrbatch referral-head runs/classifier.onnx runs/headed/classifier.onnx --data data/union
    --gate models/gate.onnx
    """
    _setup_logging(verbose, quiet=False)
    record = export_module("referral_head").add_referral_head(
        src, dst, data_dir, gate, tuple(exclude_source or ()), version=version
    )
    aucs = ", ".join(f"{name} {auc:.3f}" for name, auc in record["left_out_auc"].items())
    if dst.name != "classifier.onnx":  # `--models` reads a folder's classifier.onnx and gate.onnx
        then = "copy it as classifier.onnx, with the gate as gate.onnx, into a folder F, then: cxrbatch calibrate "
        then += "VAL_DIR --models F --out DIR"
    else:
        gate_there = "" if (dst.parent / "gate.onnx").is_file() else f" (after copying the gate into {dst.parent})"
        then = f"cxrbatch calibrate VAL_DIR --models {dst.parent} --out DIR{gate_there}"
    typer.echo(
        f"wrote {dst}: penalty {record['penalty']:g}; within-collection AUC, each left out: {aucs}; "
        f"val AUC {record['val_auc']:.3f}. Now choose its threshold: {then}",
        err=True,
    )
