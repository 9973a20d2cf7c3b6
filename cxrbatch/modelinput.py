"""Turn a decoded picture into a model's input tensor, as that model's `InputSpec` says.

`imaging.load_image` reads a file once into an 8-bit "L" or "RGB" picture; `to_model_input` makes
each model's tensor from it (resize, colour, equalisation). The training code in `export/` calls
the same functions, so what a model saw while training is what it sees at run time. A change here
that can change a model input must raise `imaging.PREPROCESSING_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class InputSpec:
    """What one model expects: size, channels and the preprocessing applied before it."""

    height: int
    width: int
    channels: int  # 1 (grey) or 3 (RGB); the graph replicates grey itself
    colour: str  # "grey" or "rgb": how the decoded picture is converted first
    equalize: bool  # global histogram equalisation after resizing (grey only)
    resample: str = "bilinear"
    clahe: float = 0.0  # > 0: contrast-limited adaptive equalisation with this clip limit instead

    def __post_init__(self) -> None:
        if self.colour not in ("grey", "rgb") or self.channels not in (1, 3):
            raise ValueError(f"unsupported input spec: colour={self.colour}, channels={self.channels}")
        if self.colour == "rgb" and self.channels != 3:
            raise ValueError("an rgb input needs 3 channels")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"unsupported resample {self.resample!r}")
        if self.clahe < 0 or (self.clahe and self.equalize):
            raise ValueError("clahe needs a positive clip limit and excludes global equalize")


def equalize(grey: np.ndarray) -> np.ndarray:
    """Globally equalise the histogram of a uint8 grey array (flat images are left alone)."""
    hist = np.bincount(grey.ravel(), minlength=256)
    cdf = np.cumsum(hist)
    total = int(cdf[-1])
    first = int(cdf[np.flatnonzero(hist)[0]]) if total else 0
    if total == first:
        return grey
    lut = np.rint((cdf - first) / (total - first) * 255.0)
    return np.clip(lut, 0, 255).astype(np.uint8)[grey]


def clahe(grey: np.ndarray, clip_limit: float, tiles: int = 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 grey array.

    The image is cut into tiles x tiles regions; each region's histogram is clipped at
    `clip_limit` times its mean bin count (the excess spread over all bins) and turned into a
    mapping; every pixel then blends the mappings of the four nearest region centres bilinearly.
    Written to give what OpenCV's createCLAHE(clip_limit, (tiles, tiles)).apply gives (within one
    grey level), without depending on OpenCV.
    """
    h, w = grey.shape
    th, tw = -(-h // tiles), -(-w // tiles)
    padded = np.pad(grey, ((0, th * tiles - h), (0, tw * tiles - w)), mode="reflect")
    regions = padded.reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3).reshape(tiles * tiles, th * tw)
    offsets = (np.arange(tiles * tiles) * 256)[:, None]
    hist = np.bincount((regions + offsets).ravel(), minlength=tiles * tiles * 256).reshape(-1, 256)
    limit = max(1, int(clip_limit * th * tw / 256))
    clipped = np.maximum(hist - limit, 0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + clipped // 256
    # The remainder goes one pixel at a time to every step-th bin from 0, as OpenCV does.
    residual = clipped % 256
    step = np.maximum(256 // np.maximum(residual, 1), 1)
    bins = np.arange(256)[None, :]
    hist += (residual > 0) & (bins % step == 0) & (bins // step < residual)
    scale = np.float32(255.0 / (th * tw))
    lut = np.clip(np.rint(np.cumsum(hist, axis=1) * scale), 0, 255).reshape(tiles, tiles, 256)

    def axis(n: int, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pos = np.arange(n) / step - 0.5  # pixel n lies between region centres low and low + 1
        low = np.floor(pos)
        weight = pos - low
        low = low.astype(np.intp)
        return np.clip(low, 0, tiles - 1), np.clip(low + 1, 0, tiles - 1), weight

    y0, y1, wy = axis(h, th)
    x0, x1, wx = axis(w, tw)
    y0, y1, wy = y0[:, None], y1[:, None], wy[:, None]
    top = lut[y0, x0, grey] * (1 - wx) + lut[y0, x1, grey] * wx
    bottom = lut[y1, x0, grey] * (1 - wx) + lut[y1, x1, grey] * wx
    return np.clip(np.rint(top * (1 - wy) + bottom * wy), 0, 255).astype(np.uint8)


def to_model_input(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Make the float32 HxWxC tensor (values 0..255) that the model described by `spec` takes."""
    return model_pixels(img, spec).astype(np.float32)


def model_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """`to_model_input`'s values as uint8, a quarter of the bytes (what a decoding process sends)."""
    size, resample = (spec.width, spec.height), _RESAMPLE[spec.resample]
    if spec.colour == "rgb" and img.mode == "L":
        # Resized first, its channel repeated after: the pixels of converting first (L to RGB copies
        # the grey into each channel, and resizing treats channels alike) for a third of the work.
        arr = np.repeat(np.asarray(img.resize(size, resample), dtype=np.uint8)[:, :, None], 3, axis=2)
    else:
        mode = "L" if spec.colour == "grey" else "RGB"
        arr = np.asarray((img if img.mode == mode else img.convert(mode)).resize(size, resample), dtype=np.uint8)
    if spec.clahe and arr.ndim == 2:
        arr = clahe(arr, spec.clahe)
    elif spec.equalize:
        arr = equalize(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if spec.channels == 3 and arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def in_frame(
    img: Image.Image, width: int, height: int, left: int | None = None, top: int | None = None, grey: int = 0
) -> Image.Image:
    """The picture set in a `width` x `height` frame of flat `grey`, at (`left`, `top`) or centred:
    a wider field of view than the film's own, as another site might take it."""
    if img.mode not in ("L", "RGB"):
        raise ValueError(f"in_frame takes L or RGB pictures, not {img.mode}")
    if width < img.width or height < img.height:
        raise ValueError(f"a {width}x{height} frame cannot hold a {img.width}x{img.height} picture")
    left = (width - img.width) // 2 if left is None else left
    top = (height - img.height) // 2 if top is None else top
    if not (0 <= left <= width - img.width and 0 <= top <= height - img.height):
        raise ValueError(f"a picture at ({left}, {top}) would stick out of a {width}x{height} frame")
    frame = Image.new(img.mode, (width, height), (grey,) * len(img.getbands()))
    frame.paste(img, (left, top))
    return frame
