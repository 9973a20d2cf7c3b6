"""Read the pixels of a DICOM file into an 8-bit picture (needs the `dicom` extra: pydicom).

Order, as the standard has it: stored values -> Modality LUT (or rescale slope/intercept) ->
VOI LUT (or the first window centre/width) -> MONOCHROME1 inverted; `cxrbatch.imaging` then
scales the result's minimum..maximum linearly to 0..255. Nothing from the header except what that needs is read,
and nothing of it (names, ids, dates) is ever put in a message.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from cxrbatch.errors import ImageError

log = logging.getLogger(__name__)

PREAMBLE_MAGIC = b"DICM"
INSTALL_HINT = "pip install 'cxrbatch[dicom]' (in a source checkout: pip install '.[dicom]')"
# Decoders pydicom can use for compressed transfer syntaxes, as pip package names.
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


def is_dicom(path: str | os.PathLike[str], head: bytes | None = None) -> bool:
    """Tell whether a file is DICOM: a .dcm name, or the DICM magic after the 128-byte preamble."""
    if os.fspath(path).lower().endswith(".dcm"):
        return True
    if head is None:
        try:
            with open(path, "rb") as fh:
                head = fh.read(132)
        except OSError:
            return False
    return len(head) >= 132 and head[128:132] == PREAMBLE_MAGIC


def read_pixels(path: str | os.PathLike[str]) -> np.ndarray:
    """Return the first frame's display values: 2-D float (grey, after the LUTs) or HxWx3 uint8 (colour)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageError(f"DICOM file, but pydicom is not installed: {INSTALL_HINT}") from None
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types for malformed files
        raise ImageError(f"unreadable DICOM file ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugins and corrupt pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed:
            raise ImageError(f"compressed DICOM ({syntax.name}) needs a decoder: {DECODER_HINT}") from None
        raise ImageError(f"DICOM pixel data cannot be decoded ({type(exc).__name__})") from None
    if frames > 1:
        log.warning("multi-frame DICOM (%d frames): screening the first frame only", frames)
        arr = arr[0]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:
        return _colour(arr, photometric)
    if arr.ndim != 2:
        raise ImageError(f"unsupported DICOM pixel layout {arr.shape}")
    values = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    if photometric == "MONOCHROME1":  # after VOI, as the standard orders it
        values = values.max() + values.min() - values
    return values


def _colour(arr: np.ndarray, photometric: str) -> np.ndarray:
    from pydicom.pixels import convert_color_space

    if photometric.startswith("YBR"):
        arr = convert_color_space(arr, photometric, "RGB")
    return np.clip(arr, 0, 255).astype(np.uint8)
