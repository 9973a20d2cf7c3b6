"""The training-time augmentation: views of a radiograph as other sources would frame and encode it."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageFilter

from cxrbatch.modelinput import in_frame

# Part of the key of `loco`'s features cache (as `imaging.PREPROCESSING_VERSION` is): raise it
# whenever a change here or in `cache.views_of` can change a view drawn from the same seed (a
# draw added, dropped or reordered, another range or perturbation), so that features of views
# made before are not reused.
AUGMENTATION_VERSION = 1


def augment(img: Image.Image, rng: np.random.Generator, zoom_out: float = 0.0, crop_area: float = 0.70) -> Image.Image:
    """Perturb a radiograph the way other sources differ: framing, side, resolution, blur, contrast, JPEG.

    Every image is brought down to at most 224 px on its longer side and re-encoded as JPEG at a
    random quality, so that the resolution and compression of the weakest source (224-px JPEGs)
    stop being a clue to the label.

    Framing: with probability `zoom_out` the film is set in a larger frame (`zoom_out_frame`),
    otherwise a random crop zooms in, keeping about `crop_area` to all of the film's area. The
    only TB source is cropped tight to the lungs; a film from elsewhere shows more around them,
    and a model trained on tight crops only stops seeing TB as soon as there is a border.
    """
    framed = zoom_out > 0 and rng.random() < zoom_out  # no draw at 0: earlier recipes replay exactly
    img = zoom_out_frame(img, rng) if framed else _random_crop(img, rng, crop_area)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rng.random() < 0.7:
        img = img.rotate(float(rng.uniform(-8, 8)), resample=Image.Resampling.BILINEAR, fillcolor=0)
    return degrade(img, rng)


def degrade(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What other sources do to a film's pixels, framing aside: at most 224 px on the longer side
    (144-224 at random), blur, gamma, noise and JPEG re-encoding at quality 40-95, each at random."""
    side = int(rng.integers(144, 225))
    scale = side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    if rng.random() < 0.5:
        gamma = math.exp(float(rng.uniform(math.log(0.7), math.log(1.4))))
        img = img.point([round(255 * (v / 255) ** gamma) for v in range(256)] * len(img.getbands()))
    if rng.random() < 0.25:
        img = _add_noise(img, float(rng.uniform(2, 8)), rng)
    if rng.random() < 0.8:
        img = _reencode(img, int(rng.integers(40, 96)))
    return img


def _random_crop(img: Image.Image, rng: np.random.Generator, least: float) -> Image.Image:
    w, h = img.size
    area = float(rng.uniform(least, 1.0)) * w * h
    aspect = math.exp(float(rng.uniform(math.log(0.8), math.log(1.25))))
    cw = min(w, max(1, round(math.sqrt(area * aspect))))
    ch = min(h, max(1, round(math.sqrt(area / aspect))))
    x0 = int(rng.integers(0, w - cw + 1))
    y0 = int(rng.integers(0, h - ch + 1))
    return img.crop((x0, y0, x0 + cw, y0 + ch))


def zoom_out_frame(img: Image.Image, rng: np.random.Generator, most: float = 1.5) -> Image.Image:
    """Set the film in a frame 1 to `most` times its width and, independently, its height, at a
    random place: a wider field of view, as other collections take it. The frame is black, a
    random flat grey, or the film mirrored outwards (anatomy-like surroundings)."""
    if most < 1.0:
        raise ValueError(f"a frame is at least as large as the film, not {most}x")
    w, h = img.size
    width = round(w * float(rng.uniform(1.0, most)))
    height = round(h * float(rng.uniform(1.0, most)))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    fill = rng.random()
    if fill < 0.3:
        arr = np.asarray(img)
        pad = [(top, height - h - top), (left, width - w - left)] + [(0, 0)] * (arr.ndim - 2)
        return Image.fromarray(np.pad(arr, pad, mode="symmetric"), mode=img.mode)
    return in_frame(img, width, height, left, top, grey=0 if fill < 0.65 else int(rng.integers(0, 256)))


def _add_noise(img: Image.Image, sigma: float, rng: np.random.Generator) -> Image.Image:
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode=img.mode)


def _reencode(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as out:
        out.load()
        return out.copy()
