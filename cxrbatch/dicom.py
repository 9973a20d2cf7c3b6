"""Read the pixels of a DICOM file into an 8-bit picture (needs the `dicom` extra: pydicom).

Order, as the standard has it: stored values -> Modality LUT (or rescale slope/intercept) ->
VOI LUT (or the first window centre/width) -> MONOCHROME1 or a Presentation LUT Shape of INVERSE
inverted (once where both say so) -> Pixel Padding values shown black; PALETTE COLOR values go
through their colour tables, and colour comes as 8-bit RGB; `cxrbatch.imaging` then
scales the result's minimum..maximum linearly to 0..255. Nothing from the header except what that needs is read,
and nothing of it (names, ids, dates) is ever put in a message.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np

from cxrbatch.dicom_streams import DEFLATED_HEAD, PREAMBLE_MAGIC, Inflating, preamble_restored
from cxrbatch.errors import ImageError
from cxrbatch.files import display_path
from cxrbatch.levels import Levels

if TYPE_CHECKING:  # pydicom is the optional `dicom` extra
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cxrbatch[dicom]' (in a source checkout: pip install '.[dicom]')"
# Decoders pydicom can use for compressed transfer syntaxes, as pip package names.
DECODER_HINT = "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg (or python-gdcm)"


@functools.cache
def _quiet_warnings() -> None:
    """pydicom's warnings ("Invalid value for VR IS: 'AB'" quotes the header) stay off stderr.
    Once (cached): each new filter resets what Python remembers of warnings already shown."""
    warnings.filterwarnings("ignore", module="pydicom")


def has_preamble(head: bytes) -> bool:
    """Whether a file's first bytes carry the DICM magic after the 128-byte preamble."""
    return len(head) >= 132 and head[128:132] == PREAMBLE_MAGIC


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
    return has_preamble(head)


def read_pixels(path: str | os.PathLike[str]) -> np.ndarray | Levels:
    """Return the first frame's display values: grey after the LUTs (float64 `Levels` for an
    integer frame, else a 2-D float64 array) or HxWx3 uint8 (colour)."""
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageError(f"DICOM file, but pydicom is not installed: {INSTALL_HINT}") from None
    # pydicom logs what it meets in a file (header values among it) and the traceback of a frame
    # it cannot decode: the row's error says what matters, and no header value goes to a log.
    # Set after its import, which sets its own level.
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    _quiet_warnings()
    _refuse_deflated_too_large(path)
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(preamble_restored(fh), force=True)
    except Exception as exc:  # pydicom raises many types for malformed files
        _raise_if_the_systems(exc)
        raise ImageError(f"unreadable DICOM file ({type(exc).__name__})") from None
    _name_transfer_syntax(ds)
    if "PixelData" not in ds:
        raise ImageError("DICOM file has no pixel data (not an image)")
    _refuse_too_large(ds)
    frames = _number(ds.get("NumberOfFrames"), 1)
    if "NumberOfFrames" in ds and frames == 1:  # absent for pydicom too when not a number (it reads it again)
        del ds.NumberOfFrames
    try:
        ds.pixel_array_options(index=0 if frames > 1 else None)  # decode the first frame only
        arr = ds.pixel_array
    except Exception as exc:  # missing decoder plugins and corrupt pixel data
        _raise_if_the_systems(exc)
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and syntax.is_compressed and not _can_decode(syntax, _number(ds.get("BitsStored"), 8)):
            raise ImageError(f"compressed DICOM ({syntax.name}) needs a decoder: {DECODER_HINT}") from None
        if syntax is not None and syntax.is_compressed:  # a decoder is there: the data is bad
            raise ImageError(f"compressed DICOM ({syntax.name}) whose pixel data is corrupt or truncated") from None
        raise ImageError(f"DICOM pixel data cannot be decoded ({type(exc).__name__})") from None
    del ds.PixelData  # the file's pixel bytes, inflated: the frame is in `arr` (up to 676 MB less held)
    if frames > 1:
        log.warning("%s: multi-frame DICOM (%d frames): screening the first frame only", display_path(path), frames)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        return _palette(arr, ds)
    if arr.ndim == 3:
        return _colour(arr, _number(ds.get("BitsStored"), 8))
    if arr.ndim != 2:
        raise ImageError(f"unsupported DICOM pixel layout {arr.shape}")

    def to_values(stored: np.ndarray) -> np.ndarray:
        try:
            values = apply_modality_lut(stored, ds)
        except (TypeError, ValueError):  # an empty or malformed RescaleSlope/Intercept: read as absent
            values = stored  # and no window, which is in rescaled units: the stored values' own range
        else:
            if _negative(ds.get("RescaleSlope")):
                # pydicom takes a window's output range from the rescale's ends, backwards after a
                # negative slope (the film inverted); the values are rescaled already
                del ds.RescaleSlope
            # an invalid window (width 0, not a number) is ignored, as viewers do
            try:
                values = apply_voi_lut(values, ds)
            except (TypeError, ValueError, ZeroDivisionError, IndexError, KeyError):
                pass
        return np.asarray(values).astype(np.float64, copy=False)  # a rescaled film is float64 already

    # Each stored level once, not each pixel (the LUTs work value by value): no float64 copies of the film.
    levels = Levels.of(arr)
    film = to_values(arr) if levels is None else levels.map(to_values)
    # after VOI, as the standard orders it; the Presentation LUT Shape is its last stage
    if photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        if isinstance(film, Levels):
            lo, hi = film.extremes() or (0.0, 0.0)  # a film has at least one level
            film = film.map(lambda values: hi + lo - values)
        else:
            film = film.max() + film.min() - film
    padding = _padding(ds, arr.dtype)
    if padding is None:
        return film
    if isinstance(film, Levels) and levels is not None:
        return _black_levels(film, (levels.values >= padding[0]) & (levels.values <= padding[1]))
    return _black_pixels(cast(np.ndarray, film), (arr >= padding[0]) & (arr <= padding[1]))


def _raise_if_the_systems(exc: Exception) -> None:
    """Pass on out of memory and what the system said (an errno: `ulimit -n`, a failing disk): no
    fault of the file, which `imaging` and `decoding` say in its row, as for any other film."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno is not None):
        raise exc


def _padding(ds: Dataset, dtype: np.dtype) -> tuple[int, int] | None:
    """The stored values that are padding, not film (the frame a reader or an export puts around
    it): from the Pixel Padding Value to the Pixel Padding Range Limit where one is given, lowest
    first, read as the frame's own integers are (a value read with the other sign is one the
    header's US-or-SS type left open). None where there is no padding value, or none to read."""
    ends = [ds.get(key) for key in ("PixelPaddingValue", "PixelPaddingRangeLimit") if ds.get(key) is not None]
    if not ends or dtype.kind not in "iu":
        return None
    try:
        stored = [int(np.array(int(end), dtype=np.int64).astype(dtype)) for end in ends]  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return None
    return min(stored), max(stored)


def _black_levels(film: Levels, padding: np.ndarray) -> Levels:
    """A film's padding levels shown black: at its darkest value of film, so that the scaling from
    its minimum to its maximum counts the film alone (as viewers show padding)."""
    present = film.present()
    real = present & ~padding
    if not real.any() or not (present & padding).any():  # nothing but padding, or none of it
        return film
    values = np.array(film.values, dtype=np.float64)
    values[padding] = values[real].min()
    return Levels(film.index, values)


def _black_pixels(film: np.ndarray, padding: np.ndarray) -> np.ndarray:
    """`_black_levels` for a film held pixel by pixel (in place: the film is a float64 copy)."""
    if padding.all() or not padding.any():
        return film
    film[padding] = np.min(film, where=~padding, initial=np.inf)
    return film


def _name_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without its file meta (no preamble, no header: as ACR-NEMA-era devices
    and some exports write it) the uncompressed transfer syntax it was read in: pydicom reads its
    header but will not decode pixels whose transfer syntax no header names."""
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding  # (None, None) where pydicom found none
    if little is not None:
        explicit = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else explicit


def _negative(value: object) -> bool:
    """Whether a header's number is below zero (False where it is absent or not a number)."""
    try:
        return float(value) < 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def _number(value: object, default: int) -> int:
    """A header's integer, or `default` where it is absent, empty or not a number."""
    try:
        return int(value) or default  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return default


def _can_decode(syntax: object, bits_stored: int) -> bool:
    """Whether pydicom has a decoder plugin available for this transfer syntax and depth (its
    Pillow plugin reads JPEG of 8 bits only: a 12-bit JPEG Extended film needs another)."""
    from pydicom.pixels import get_decoder

    try:
        plugins = set(get_decoder(syntax).available_plugins)  # type: ignore[arg-type]
    except (NotImplementedError, ValueError):  # a syntax pydicom knows no decoder for
        return False
    if plugins <= {"pillow"} and bits_stored > 8 and "2000" not in str(getattr(syntax, "name", "")):
        return False
    return bool(plugins)


def _refuse_too_large(ds: object) -> None:
    """Pillow's decompression-bomb limit, for DICOM too: a small compressed file can declare a frame
    of hundreds of megapixels, and decoding it would take gigabytes."""
    from PIL import Image

    pixels = int(getattr(ds, "Rows", 0) or 0) * int(getattr(ds, "Columns", 0) or 0)
    limit = None if Image.MAX_IMAGE_PIXELS is None else 2 * Image.MAX_IMAGE_PIXELS  # where Pillow refuses
    if limit is not None and pixels > limit:
        raise ImageError(f"image too large to decode safely ({pixels} pixels, more than {limit})")


def _refuse_deflated_too_large(path: str | os.PathLike[str]) -> None:
    """`_refuse_too_large` for a Deflated data set before pydicom inflates all of it into memory
    (a file of under 1 MB can inflate to gigabytes): its header, read as the stream inflates,
    long values before the pixels (a private element of zeros) skipped, never held."""
    try:  # pydicom's private reader of the file meta: a pydicom without it only loses this check
        from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
        from pydicom.uid import DeflatedExplicitVRLittleEndian

        with open(path, "rb") as raw:
            fh = preamble_restored(raw)  # read as dcmread reads it: its size is checked in such a file too
            read_preamble(fh, force=True)
            meta = _read_file_meta_info(fh)
            if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
                return
            header = read_dataset(
                cast(BinaryIO, Inflating(fh)),
                False,
                True,
                defer_size=DEFLATED_HEAD,
                stop_when=lambda tag, vr, length: tag >= 0x7FE00010,
            )
    except Exception:  # not readable so: dcmread says what is wrong
        return
    _refuse_too_large(header)


def _palette(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """A PALETTE COLOR frame through its red, green and blue lookup tables, as 8-bit RGB (its
    stored values are indices into the tables, not brightness)."""
    from pydicom.pixels import apply_color_lut

    try:
        rgb = apply_color_lut(arr, ds)[..., :3]  # an alpha table, if any, is dropped
        # the entries' bits as the descriptor gives them: 8-bit entries can come in 16-bit words
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    except Exception as exc:  # missing or malformed tables: pydicom raises several types
        raise ImageError(f"PALETTE COLOR DICOM without a usable colour palette ({type(exc).__name__})") from None
    return _colour(rgb, bits if bits in (8, 16) else 8 * rgb.dtype.itemsize)


def _colour(arr: np.ndarray, bits_stored: int) -> np.ndarray:
    """A colour frame as 8-bit RGB. pydicom (3.0 and later) has already turned YBR into RGB; values
    of more than 8 bits are scaled, not clipped."""
    if arr.dtype.itemsize > 1:
        top = float(2 ** min(max(bits_stored, 1), 8 * arr.dtype.itemsize) - 1)
        return np.clip(np.round(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)
