"""cxrbatch: batch screening of chest X-rays with a gate and a classifier in ONNX."""

import os
import sys
import warnings

# onnxruntime 1.29 and later collect usage telemetry on Linux too: a device id and an event cache
# under ~/.cache/Microsoft/DeveloperTools/, uploaded when the machine can reach the collector. A
# screening tool that reads patients' films keeps to itself: the opt-out must be set before
# onnxruntime is imported, which in every cxrbatch process (the command, Ray actors) is after this
# package is. A user who wants telemetry sets ORT_DISABLE_TELEMETRY=0.
if "onnxruntime" in sys.modules and "ORT_DISABLE_TELEMETRY" not in os.environ:
    warnings.warn(
        "onnxruntime was imported before cxrbatch, so its telemetry is on in this process: "
        "set ORT_DISABLE_TELEMETRY=1 before importing onnxruntime",
        RuntimeWarning,
        stacklevel=2,
    )
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

from cxrbatch.errors import CxrBatchError, DeviceError, ImageError, ModelError, UsageError

__version__ = "0.1.0"

__all__ = ["CxrBatchError", "DeviceError", "ImageError", "ModelError", "UsageError", "__version__"]
