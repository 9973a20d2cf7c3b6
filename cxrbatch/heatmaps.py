"""Class-activation heatmaps from the classifier's `cam` output, drawn over the radiograph.

The classifier's second output holds, for every position of its last feature map, the logit of
each class (the head's weights applied position by position). The map of the predicted class,
scaled to 0..1 and upsampled, is blended over the picture in a blue-to-red palette, with the
label and its probability written on top. File names come from a hash of the input path, never
from the path itself.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cxrbatch.imaging import display_path

DISPLAY_SIDE = 512  # the longer side of the picture kept for drawing heatmaps
ALPHA = 0.45


def heatmap_name(path: Path) -> str:
    """A file name for the heatmap of `path`: 16 hex digits of the sha256 of the path, .png."""
    return hashlib.sha256(display_path(path).encode("utf-8")).hexdigest()[:16] + ".png"


def display_copy(img: Image.Image) -> Image.Image:
    """A small grey copy of the decoded picture to draw the heatmap on."""
    grey = img.convert("L")
    grey.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BILINEAR)
    return grey


def class_map(cam: np.ndarray, index: int) -> np.ndarray:
    """The activation map (h x w) of one class, scaled to 0..1 (flat maps become all zero)."""
    m = cam[..., index].astype(np.float64)
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def overlay(picture: Image.Image, heat: np.ndarray, caption: str) -> Image.Image:
    """Blend the 0..1 map, upsampled to the picture, over it and write the caption on top."""
    w, h = picture.size
    up = np.asarray(Image.fromarray(heat.astype(np.float32), mode="F").resize((w, h), Image.Resampling.BILINEAR))
    up = np.clip(up, 0.0, 1.0)
    colour = np.stack([up, 1.0 - np.abs(2 * up - 1), 1.0 - up], axis=-1) * 255  # blue -> green -> red
    base = np.asarray(picture.convert("RGB"), dtype=np.float64)
    out = Image.fromarray(np.clip(base * (1 - ALPHA) + colour * ALPHA, 0, 255).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=max(12, h // 24))
    box = draw.textbbox((8, 8), caption, font=font)
    draw.rectangle((box[0] - 5, box[1] - 5, box[2] + 5, box[3] + 5), fill=(0, 0, 0))
    draw.text((8, 8), caption, fill=(255, 255, 255), font=font)
    return out


def write_heatmap(folder: Path, path: Path, picture: Image.Image, heat: np.ndarray, caption: str) -> Path:
    """Write the heatmap PNG of `path` into `folder` (atomically) and return where it went."""
    target = folder / heatmap_name(path)
    fd, tmp = tempfile.mkstemp(prefix=".heatmap.", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            overlay(picture, heat, caption).save(fh, format="PNG")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    return target
