"""Decode image files into pictures.

One decode serves both models: `load_image` gives an 8-bit "L" or "RGB" picture, and
`modelinput.to_model_input` derives each model's tensor from it as that model's `InputSpec` says.
The training code in `export/` calls the same two functions, so what a model saw while training
is what it sees at run time.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO, TextIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from cxrbatch import dicom
from cxrbatch.errors import ImageError
from cxrbatch.files import display_path
from cxrbatch.levels import Levels, to_8bit

# Anything smaller than this on its short side is no radiograph worth screening.
MIN_SIDE = 32
# Part of the ledger's run fingerprint: raise it whenever a change here can change a model input
# (decoding, resizing, equalisation), so that results made before are not reused.
# 2: 16-bit and float TIFFs stored "white is zero" are read the right way round (they were inverted).
# 3: DICOM: a Presentation LUT Shape of INVERSE inverts a MONOCHROME2 film, and a window after a
#    negative rescale slope no longer inverts the film (both were screened as negatives).
# 4: DICOM: Pixel Padding values are shown black and left out of the film's scaling.
PREPROCESSING_VERSION = 4
HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I", "F")  # modes scaled from their minimum to their maximum
WHITE_IS_ZERO = 0  # TIFF tag 262 (PhotometricInterpretation): 0 = the smallest value is white
# Pillow reads 16-bit colour as 8 bits a channel (the high bytes): a film of 14 bits or fewer in
# such a file comes out below this level everywhere, and the gate rejects it as no X-ray.
LOW_BITS_ONLY = 64
PIXELS_AT_ONCE = 1 << 20  # a float film is scaled to 8 bits this many pixels at a time (8 MB of float64)

log = logging.getLogger(__name__)

# What Pillow warns while it reads a file ("Truncated File Read" from a corrupt EXIF block, a
# malformed MPO) went to stderr outside the run's log, naming no file, and only the first time.
# Now each is shown every time, and while `load_image` reads a file it becomes a log line naming
# that file (`_named_warning`). An image between Pillow's pixel limit and twice it is decoded
# without a word: that warning tells nothing a row needs (above twice the limit the file is an
# error row, "image too large to decode safely"). Filters added later are checked first.
warnings.filterwarnings("always", module="PIL")
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
_reading = threading.local()  # `.name`: the file this thread is reading (`_reading_file`)


def load_image(path: str | os.PathLike[str], draft_size: int | None = None) -> Image.Image:
    """Decode a file into an 8-bit "L" or "RGB" image with EXIF orientation applied.

    DICOM files (the DICM preamble, or a .dcm name on a file that is neither text nor an image
    Pillow knows) go through `cxrbatch.dicom`. With
    `draft_size`, JPEGs are decoded at a reduced scale that is still at least `draft_size`
    pixels on each side (libjpeg's DCT scaling), which is several times faster. Every way a
    file can fail becomes an ImageError whose message says what is wrong with it.
    """
    size = _regular_file_size(path)
    if size == 0:
        raise ImageError("empty file (0 bytes)")
    try:
        with open(path, "rb") as fh, _reading_file(display_path(path)):
            head = fh.read(132)
            fh.seek(0)
            if dicom.is_dicom(path, head) and (dicom.has_preamble(head) or not _other_format(fh, head)):
                return _from_values(dicom.read_pixels(path))
            return _decode(fh, head, draft_size)
    except ImageError:
        raise
    except OSError as exc:
        raise ImageError(_os_message(path, exc)) from None


@contextmanager
def _reading_file(name: str | None) -> Iterator[None]:
    """While this thread reads the file `name`, a warning raised is a log line naming it."""
    _reading.name = name
    try:
        yield
    finally:
        _reading.name = None


def _named_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` for the whole process: a warning raised while `load_image` (or
    `decode_bytes`, given a name) reads a file on this thread is a log line naming the file; any
    other is shown as before."""
    name = getattr(_reading, "name", None)
    if name is None:
        _show_warning(message, category, filename, lineno, file, line)
    else:
        log.warning("%s: %s from the decoder: %s", name, category.__name__, message)


_show_warning = warnings.showwarning
warnings.showwarning = _named_warning


def decode_bytes(data: bytes, draft_size: int | None = None, name: str | None = None) -> Image.Image:
    """Decode an image file held in memory (not DICOM) into "L" or "RGB", as `load_image` does;
    a warning raised meanwhile is a log line naming the file as `name` where it is given."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    with _reading_file(name):
        return _decode(io.BytesIO(data), data[:132], draft_size)


def _regular_file_size(path: str | os.PathLike[str]) -> int:
    """Stat before opening: a FIFO or device named like an image would block a plain open()."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(_os_message(path, exc)) from None
    if stat.S_ISDIR(st.st_mode):  # a folder the walk could not list (cxrbatch.discovery)
        try:
            os.listdir(path)
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else exc.strerror or str(exc)
            raise ImageError(f"folder cannot be read ({reason}): its files were not screened") from None
        raise ImageError("is a directory, not an image")
    if not stat.S_ISREG(st.st_mode):
        raise ImageError("not a regular file (a pipe, socket or device)")
    return st.st_size


# in a decoding error that the run's limits caused, not the file: a heatmap it kept from being drawn
# is drawn again by a rerun into the same report (`heatmaps`), as one a full disk kept from being written
NOT_THE_FILE = "not a fault of the file"


def _os_message(path: str | os.PathLike[str], exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "broken symbolic link" if os.path.islink(path) else "file vanished before it could be read"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    return _system_message(exc)


def _system_message(exc: OSError) -> str:
    """An error row's message for what the system said while the file was read or decoded."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):  # `ulimit -n`: Pillow could not even import a plugin
        return f"cannot read file: {exc.strerror} (the process's limit, ulimit -n, or the system's): {NOT_THE_FILE}"
    return f"cannot read file: {exc.strerror or exc}"


def _decode(fh: BinaryIO, head: bytes, draft_size: int | None) -> Image.Image:
    try:
        # Not closed: it reads `fh`, which the caller closes, and the picture returned may be its own
        # pixels (closing it drops them; the copy that took doubled the memory of a large film).
        img = Image.open(fh)
        if draft_size and img.format == "JPEG":
            img.draft("RGB" if img.mode not in ("L", "1") else "L", (draft_size, draft_size))
        img.seek(0)  # animated files: the first frame
        # a tile is (codec, extents, offset, args): a named tuple since Pillow 11, a plain one in 10
        deep_colour = img.mode in ("RGB", "RGBA") and any(";16" in str(args) for _, _, _, args in img.tile)
        if img.format == "JPEG":  # an arithmetic-coded JPEG's decoder needs the whole stream at once
            # (Pillow reads a block at a time; for other formats, a tiled TIFF on Pillow < 11.1
            # read the whole file per tile)
            img.decodermaxblock = max(img.decodermaxblock, _size_of(fh))
        img.load()
        # Pillow turns an 8-bit "white is zero" TIFF round itself, not a 16-bit or float one
        tags = getattr(img, "tag_v2", {})  # a TIFF's
        inverted = img.format == "TIFF" and img.mode in HIGH_DEPTH and tags.get(262) == WHITE_IS_ZERO
        if img.format == "TIFF" and img.mode == "I" and _unsigned_32(img):  # Pillow's "I" is signed
            grey = _window_to_l(np.asarray(img).view(np.uint32))
        else:
            grey = _to_8bit(img)
        if deep_colour and max(high for _, high in grey.getextrema()) < LOW_BITS_ONLY:  # type: ignore[misc]
            raise ImageError(
                "16-bit colour image whose values use only the low bits (read 8 bits a channel, it is nearly "
                "black): save the film as 16-bit grey"
            )
        grey = _upright(img, grey)
        return ImageOps.invert(grey) if inverted else grey
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large to decode safely ({exc})") from None
    except UnidentifiedImageError:
        if _looks_like_text(head):
            raise ImageError("a text or HTML file, not an image") from None
        raise ImageError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # the system's error (a failing disk, ulimit -n):
            raise ImageError(_system_message(exc)) from None  # Pillow's own for bad data carry no errno
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except (ImageError, MemoryError):  # out of memory is the process's limit, not the file's fault (`decoding`)
        raise
    except Exception as exc:  # Pillow's decoders raise other types on hostile data; one file, one error row
        raise ImageError(f"corrupt image ({type(exc).__name__}: {exc})") from None


_TURNS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(img: Image.Image, picture: Image.Image) -> Image.Image:
    """`picture` (made from `img`) turned as `img`'s EXIF Orientation says, as a viewer shows it.
    Not ImageOps.exif_transpose: it also writes the EXIF block back, and fails on values Pillow
    reads but cannot write (a signed rational -1/0), which left such a film unscreened."""
    turn = _TURNS.get(img.getexif().get(ExifTags.Base.Orientation, 1))
    return picture if turn is None else picture.transpose(turn)


def _unsigned_32(img: Image.Image) -> bool:
    """Whether a TIFF read in Pillow's signed 32-bit mode holds unsigned 32-bit samples."""
    tags = getattr(img, "tag_v2", {})  # a TIFF's tags (TiffImageFile)
    bits, fmt = tags.get(258), tags.get(339, (1,))
    return tuple(bits or ()) == (32,) and tuple(fmt if isinstance(fmt, tuple) else (fmt,)) == (1,)


def _other_format(fh: BinaryIO, head: bytes) -> bool:
    """Whether a file named .dcm without the DICM preamble is text or an image Pillow knows (a JPEG
    or a web page saved under that name) rather than a DICOM file without its preamble."""
    if _looks_like_text(head):
        return True
    try:
        with Image.open(fh):
            return True
    except Image.DecompressionBombError:  # an image Pillow knows, too large: `_decode` says so
        return True
    except Exception:  # not a format Pillow knows (a preamble-less DICOM file), or unreadable as one
        return False
    finally:
        fh.seek(0)


def _size_of(fh: BinaryIO) -> int:
    """The length of a seekable stream, leaving its position where it was."""
    at = fh.tell()
    try:
        return fh.seek(0, io.SEEK_END)
    finally:
        fh.seek(at)


def _looks_like_text(head: bytes) -> bool:
    sample = head.lstrip(b"\xef\xbb\xbf")[:128]
    return bool(sample) and all(b in b"\t\n\r" or 32 <= b < 127 for b in sample)


def _from_values(values: np.ndarray | Levels) -> Image.Image:
    if isinstance(values, Levels):
        return values.to_l()
    if values.ndim == 3:
        return Image.fromarray(values, mode="RGB")
    return _window_to_l(values)


def _to_8bit(img: Image.Image) -> Image.Image:
    """Bring any Pillow mode to "L" or "RGB" without silent truncation or lost alpha."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in HIGH_DEPTH:
        return _window_to_l(np.asarray(img))
    if mode == "1":
        return img.convert("L")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        return _over_black(img, "L" if mode in ("LA", "La") else "RGB")
    return img.convert("RGB")  # a palette without transparency, CMYK, YCbCr, LAB, HSV and the like


def _over_black(img: Image.Image, base: str) -> Image.Image:
    """A picture with transparency as `base` ("L" or "RGB"), over black where it is transparent,
    a band of rows at a time: whole, its copies in other modes (RGBA, the colour, the black, the
    result) took four times its size (an RGBA PNG of 169 megapixels peaked at 2.99 GB in a run)."""
    out = Image.new(base, img.size, 0)
    for rows in _bands(img.height, img.width):
        band = img.crop((0, rows.start, img.width, rows.stop))
        if band.mode == "P":  # its transparency is a palette entry's
            band = band.convert("RGBA")
        out.paste(band.convert(base), (0, rows.start), band.convert(base + "A").getchannel("A"))
    return out


def _bands(height: int, width: int) -> Iterator[slice]:
    """The rows of a `height` x `width` film in bands of about `PIXELS_AT_ONCE` pixels, top first."""
    step = max(1, PIXELS_AT_ONCE // max(1, width))
    for top in range(0, height, step):
        yield slice(top, min(height, top + step))


def _window_to_l(arr: np.ndarray) -> Image.Image:
    """Scale a high-bit-depth grey array linearly from its minimum to its maximum. Integer
    pixels go through a table of the same float64 sums, one per level (`cxrbatch.levels`): the
    same output, with no float64 copies of the film (a 36-megapixel 16-bit PNG peaked at 305 MB,
    against 1,542 MB)."""
    if arr.ndim != 2:
        raise ImageError(f"unsupported pixel layout {arr.shape}")
    levels = Levels.of(arr)
    if levels is not None:
        return levels.to_l()
    # A float film (or an integer one of too many levels) a few rows at a time: a 1 MB deflated
    # float TIFF of 169 megapixels, under Pillow's limit, peaked at 7.4 GB in whole-film float64 copies
    if arr.dtype.kind == "f":
        finite = np.isfinite(arr)
        if not finite.any():
            return Image.new("L", (arr.shape[1], arr.shape[0]), 0)
        lo, hi = float(arr.min(where=finite, initial=np.inf)), float(arr.max(where=finite, initial=-np.inf))
        del finite
    else:
        lo, hi = float(arr.min()), float(arr.max())
    out = np.empty(arr.shape, dtype=np.uint8)
    for rows in _bands(*arr.shape):
        out[rows] = to_8bit(arr[rows].astype(np.float64), lo, hi)
    return Image.fromarray(out, mode="L")


def check_size(img: Image.Image, min_side: int = MIN_SIDE) -> None:
    """Refuse images too small to be a radiograph."""
    if min(img.size) < min_side:
        raise ImageError(f"image is {img.width}x{img.height}: too small to be a radiograph (min side {min_side} px)")
