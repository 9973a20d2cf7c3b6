"""Static int8 quantisation of an exported model (QOperator, per-channel, U8 activations, S8 weights).

Calibration images are preprocessed exactly as at run time (from the model's own metadata). The
cxrbatch metadata is copied over with `"precision": "int8"`. A classifier's familiarity output is
left in float32 (its threshold was set on float32 values). Whether an int8 model may replace the
float one is decided by `cxrbatch evaluate` on both, per class and per source. `cxrbatch quantize`
makes the copy. quantize_static writes it to a temporary folder; it takes DST's place only with
its metadata, whole and loading (`cxrbatch.models.save_model`).
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
from cxrbatch.imaging import load_image, to_model_input
from cxrbatch.models import read_metadata, save_model
from cxrbatch.modelspec import ModelSpec

from .familiarity import familiarity_node_names

log = logging.getLogger(__name__)


class _Reader(CalibrationDataReader):  # type: ignore[misc]
    """Calibration batches of `batch` images, preprocessed from the model's metadata; an
    unreadable image is skipped with a warning, as a screening run would skip it."""

    def __init__(self, spec: ModelSpec, paths: list[Path], batch: int = 16) -> None:
        self.spec = spec
        self.read = 0
        self.chunks = iter([paths[i : i + batch] for i in range(0, len(paths), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        for chunk in self.chunks:
            arrays = []
            for path in chunk:
                try:
                    arrays.append(to_model_input(load_image(path), self.spec.input))
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
    found = list(iter_images([calibration]))
    if not found:
        raise UsageError(f"No calibration images under {calibration}")
    step = max(1, len(found) // images)
    proto = onnx.load(str(src))
    # the familiarity output stays float32: its threshold was set on float32 values
    keep = familiarity_node_names(proto) if spec.familiarity_output else []
    reader = _Reader(spec, found[::step][:images])
    log.info("calibrating on %d images (of %d found; --images %d)", len(found[::step][:images]), len(found), images)
    try:  # quantize_static writes a model without our metadata: it takes dst's place only through save_model
        with tempfile.TemporaryDirectory(prefix="cxrbatch-quantize.") as work:
            model = _quantized(proto, Path(work) / dst.name, reader, keep, calibration)
    except OSError as exc:  # a full temporary folder: onnxruntime writes its own working files there too
        reason = exc.strerror or str(exc)
        raise ReportError(f"Cannot quantize {src} in {tempfile.gettempdir()}: {reason}", reason) from None
    save_model(model, {**meta, "precision": "int8"}, dst)


def _quantized(
    proto: onnx.ModelProto, out: Path, reader: _Reader, keep: list[str], calibration: Path
) -> onnx.ModelProto:
    """The int8 model quantize_static writes to `out` (a temporary file), read back."""
    try:
        quantize_static(
            proto,  # with its familiarity nodes named, for the exclusion
            str(out),
            reader,
            quant_format=QuantFormat.QOperator,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=keep,
        )
    except (ValueError, RuntimeError):  # onnxruntime: "No data is collected", and the like
        if reader.read == 0:
            raise UsageError(f"none of the calibration images under {calibration} could be read") from None
        raise
    return onnx.load(str(out))
