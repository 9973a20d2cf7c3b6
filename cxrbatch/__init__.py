"""cxrbatch: batch screening of chest X-rays with a gate and a classifier in ONNX."""

from cxrbatch.errors import CxrBatchError, DeviceError, ImageError, ModelError, UsageError

__version__ = "0.1.0"

__all__ = ["CxrBatchError", "DeviceError", "ImageError", "ModelError", "UsageError", "__version__"]
