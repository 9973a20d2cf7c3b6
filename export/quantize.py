"""Static int8 quantisation of an exported model (QOperator, per-channel, U8 activations, S8 weights).

Calibration images are preprocessed exactly as at run time (from the model's own metadata). The
cxrbatch metadata is copied over with `"precision": "int8"`, less a referral threshold and its
calibration record, which were chosen on the float32 scores (`cxrbatch.modelspec.copy_metadata`).
A classifier's familiarity output is left out of the copy: its threshold and the val count the
site check compares a night with were set on the float32 features, which the int8 backbone moves
(on 1.4.0's network, 191 of 910 val films above the threshold instead of 10).
Whether an int8 model may replace the float one is decided by `cxrbatch evaluate` on both, per
class and per source. `cxrbatch quantize` makes the copy. quantize_static writes it to a temporary
folder; it takes DST's place only with its metadata, whole and loading
(`cxrbatch.models.save_model`).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from cxrbatch.discovery import iter_images
from cxrbatch.errors import ImageError, ReportError, UsageError
from cxrbatch.files import check_out
from cxrbatch.imaging import check_size, load_image
from cxrbatch.modelinput import to_model_input
from cxrbatch.models import read_metadata, save_model
from cxrbatch.modelspec import ModelSpec, copy_metadata

from .familiarity import remove_familiarity

log = logging.getLogger(__name__)

# The fewest calibration images an int8 copy is made from: its activation ranges are the extremes
# seen on them, and on a handful of films they are a guess (`--images` defaults to 200).
MIN_CALIBRATION_IMAGES = 20


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Calibration batches of `batch` images, preprocessed from the model's metadata; an image a
    screening run would not screen (unreadable, or too small to be a radiograph) is skipped with a
    warning, as the run would skip it."""

    def __init__(self, spec: ModelSpec, paths: list[Path], batch: int = 16) -> None:
        self.spec = spec
        self.chosen, self.read = len(paths), 0
        self.chunks = iter([paths[i : i + batch] for i in range(0, len(paths), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        for chunk in self.chunks:
            arrays = []
            for path in chunk:
                try:
                    img = load_image(path)
                    check_size(img)
                    arrays.append(to_model_input(img, self.spec.input))
                except ImageError as exc:
                    log.warning("calibration image skipped: %s (%s)", path, exc)
            self.read += len(arrays)
            if arrays:
                return {self.spec.input_name: np.stack(arrays)}
        return None


def quantize(src: Path, dst: Path, calibration: Path, images: int, force: bool = False) -> None:
    """Write an int8 copy of `src` calibrated on `images` images spread over `calibration`; an
    existing `dst` only with `force`."""
    if not src.is_file():
        raise UsageError(f"Model not found: {src}")
    meta = read_metadata(src)
    spec = ModelSpec.from_metadata(meta, str(src))
    spec.refuse_referral_head(str(src), "an int8 copy")
    spec.refuse_reduced_precision(str(src), "an int8 copy")
    if dst.resolve() == src.resolve():
        raise UsageError(f"DST {dst} is SRC: write the copy beside the float32 model, not over it")
    check_out(dst, ".onnx", "DST", force)
    reader = _Reader(spec, _chosen(calibration, images))
    proto = onnx.load(str(src))
    copied = copy_metadata(meta, "int8", str(src))
    if spec.familiarity_output:
        log.warning(
            "%s's familiarity threshold was set on its float32 features, which the int8 copy moves: the copy has "
            "no familiarity output (its familiarity and unfamiliar columns stay empty)",
            src,
        )
        remove_familiarity(proto, copied)
    try:  # quantize_static writes a model without our metadata: it takes dst's place only through save_model
        with tempfile.TemporaryDirectory(prefix="cxrbatch-quantize.") as work:
            model = _quantized(proto, Path(work) / dst.name, reader, calibration)
    except OSError as exc:  # a full temporary folder: onnxruntime writes its own working files there too
        reason = exc.strerror or str(exc)
        raise ReportError(f"Cannot quantize {src} in {tempfile.gettempdir()}: {reason}", reason) from None
    log.info(
        "calibrated on %d images (%d of the %d chosen skipped)", reader.read, reader.chosen - reader.read, reader.chosen
    )
    save_model(model, copied, dst)


def _chosen(calibration: Path, images: int) -> list[Path]:
    """`images` images spread over the folder `calibration`; refused where it cannot hold enough."""
    if images < MIN_CALIBRATION_IMAGES:
        raise UsageError(f"--images {images}: an int8 copy is calibrated on at least {MIN_CALIBRATION_IMAGES} images")
    found = list(iter_images([calibration]))
    if not found:
        raise UsageError(f"No calibration images under {calibration}")
    if len(found) < MIN_CALIBRATION_IMAGES:
        raise UsageError(
            f"{len(found)} calibration image(s) under {calibration}: an int8 copy needs {MIN_CALIBRATION_IMAGES}"
        )
    chosen = found[:: max(1, len(found) // images)][:images]
    log.info("reading %d calibration images (of %d found; --images %d)", len(chosen), len(found), images)
    return chosen


def _quantized(proto: onnx.ModelProto, out: Path, reader: _Reader, calibration: Path) -> onnx.ModelProto:
    """The int8 model quantize_static writes to `out` (a temporary file), read back."""
    try:
        quantize_static(
            proto,
            str(out),
            reader,
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    except (ValueError, RuntimeError):  # onnxruntime: "No data is collected", and the like
        if reader.read < MIN_CALIBRATION_IMAGES:
            raise _too_few(reader, calibration) from None
        raise
    if reader.read < MIN_CALIBRATION_IMAGES:
        raise _too_few(reader, calibration)
    return onnx.load(str(out))


def _too_few(reader: _Reader, calibration: Path) -> UsageError:
    return UsageError(
        f"only {reader.read} of the {reader.chosen} calibration images chosen under {calibration} could be read "
        f"as a screening run reads them (the others are named above); an int8 copy needs at least "
        f"{MIN_CALIBRATION_IMAGES}: give a folder with more readable images"
    )
