"""Class-activation heatmaps from the classifier's `cam` output, drawn over the radiograph.

The classifier's second output holds, for every position of its last feature map, the logit of
each class (the head's weights applied position by position). The map of the predicted class,
scaled to 0..1 and upsampled, marks the film's strongest regions with a red outline, leaving the
film itself as it is, with the label and its probability in a band above it. File names come from
a hash of the input path, never from the path itself.

Heatmaps are a step after screening (`add_heatmaps`): the files are decoded again and run
through the classifier for their maps, so a result reused from the ledger gets its heatmap like
a fresh one, and a heatmap that cannot be written (a full disk) becomes a problem in that row's
`error` cell, never a lost report.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from cxrbatch.errors import ReportError
from cxrbatch.files import atomic_write, display_path
from cxrbatch.imaging import NOT_THE_FILE
from cxrbatch.records import CLASSIFIED, Record

if TYPE_CHECKING:
    from cxrbatch.pipeline import Screener

DISPLAY_SIDE = 512  # the longer side of the picture kept for drawing heatmaps, at most
SMALL_SIDE = 224  # a film whose longer side is below this is enlarged to DISPLAY_SIDE
HOT = 0.6  # the share of the map's range above which a region is marked as one of the strongest
OUTLINE = (255, 48, 32)
RIM = (255, 255, 255)  # 1 px outside the outline: the mark differs from every grey in lightness, not hue alone
MADE_BY = ("Software", "cxrbatch heatmap")  # a PNG text chunk: what tells a heatmap from a film
CAPTION_MARGIN = 6  # pixels around the caption in its band above the film
PNG_LEVEL = 1  # zlib level: the default (6) spent three quarters of a heatmap's time compressing


NOT_WRITTEN = "heatmap not written"  # a row's problem that a rerun into the same report mends
SAME_FILM = 1e-4  # probabilities drawn again differ from the screened ones by at most this, or the file changed


def unwritten(record: Record) -> bool:
    """Whether a reported row's heatmap could not be written (a full disk): its result stands,
    and a rerun into the same report draws the heatmap again (`cxrbatch.runner`)."""
    return record.status == CLASSIFIED and NOT_WRITTEN in (record.error or "")


def is_heatmap(path: Path) -> bool:
    """Whether a file is a heatmap this tool wrote: named as `heatmap_name` names them, and a PNG
    that says so (`MADE_BY`; a film named with 16 hex digits is not one). An unmarked heatmaps
    folder (its mark could not be written) holds such files."""
    stem, _, suffix = path.name.partition(".")
    if suffix != "png" or len(stem) != 16 or any(c not in "0123456789abcdef" for c in stem):
        return False
    try:
        with Image.open(path) as png:  # reads the chunks before the pixels only
            return png.format == "PNG" and png.info.get(MADE_BY[0]) == MADE_BY[1]
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def heatmap_name(path: Path, record: Record) -> str:
    """A file name for the heatmap of `path`'s result `record`: 16 hex digits of the sha256 of the
    path's bytes and the result, .png. Two results for one path (the file changed between two runs
    that write one report) get two pictures, not one drawn over the other."""
    result = f"{record.label}|{record.confidence}|{record.referral_score}".encode()
    return hashlib.sha256(os.fsencode(path) + b"\0" + result).hexdigest()[:16] + ".png"


def display_copy(img: Image.Image) -> Image.Image:
    """A grey copy of the decoded picture to draw the heatmap on: its longer side at most
    `DISPLAY_SIDE`, and a film smaller than `SMALL_SIDE` enlarged to it, so its map can be seen
    (a JPEG is decoded at a reduced scale no smaller than the model's input, and kept so: a
    larger picture doubled the cost of a heatmap)."""
    grey = img.convert("L")
    if max(grey.size) < SMALL_SIDE:
        scale = DISPLAY_SIDE / max(grey.size)
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        return grey.resize(size, Image.Resampling.BILINEAR)
    grey.thumbnail((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BILINEAR)  # shrinks only
    return grey


def class_map(cam: np.ndarray, index: int) -> np.ndarray:
    """The activation map (h x w) of one class, scaled to 0..1 (flat maps become all zero)."""
    m = cam[..., index].astype(np.float64)
    span = m.max() - m.min()
    return (m - m.min()) / span if span > 0 else np.zeros_like(m)


def overlay(picture: Image.Image, heat: np.ndarray, caption: str) -> Image.Image:
    """The film as it is, its strongest regions (the 0..1 map at `HOT` or above, upsampled to the
    picture) outlined in red with a light rim, and the caption in a black band above it: the film
    stays readable under the marks, and nothing covers it."""
    w, h = picture.size
    level = np.clip(np.rint(heat * 255), 0, 255).astype(np.uint8)
    up = Image.fromarray(level, mode="L").resize((w, h), Image.Resampling.BILINEAR)
    hot = np.asarray(up) >= HOT * 255
    width = max(3, 2 * (max(w, h) // 256) + 1)  # an odd square: a line of about 2 px per 256 px
    edge = hot & ~_square(hot, width, np.logical_and)  # the region's inner border
    rim = _square(hot, 3, np.logical_or) & ~hot  # 1 px just outside it
    film = picture.convert("RGB")
    film.paste(RIM, mask=_mask(rim))  # red alone is as light as a mid grey: unseen by a red-blind reader
    film.paste(OUTLINE, mask=_mask(edge))
    # the caption in a band above the film, never over it (it covered all of a very wide film)
    font = ImageFont.load_default(size=max(12, max(w, h) // 24))
    right, bottom = (math.ceil(v) for v in ImageDraw.Draw(film).textbbox((0, 0), caption, font=font)[2:])
    band = bottom + 2 * CAPTION_MARGIN
    out = Image.new("RGB", (max(w, right + 2 * CAPTION_MARGIN), h + band), (0, 0, 0))
    out.paste(film, (0, band))
    ImageDraw.Draw(out).text((CAPTION_MARGIN, CAPTION_MARGIN), caption, fill=(255, 255, 255), font=font)
    return out


def _square(mask: np.ndarray, size: int, combine: np.ufunc) -> np.ndarray:
    """Each pixel of a boolean mask combined (and: shrink, or: grow) over the `size` x `size`
    square around it, the edges repeated outward: what Pillow's MinFilter/MaxFilter give on a
    0/255 mask, row then column, in a thirtieth of their time (a third of a heatmap's, before)."""
    h, w = mask.shape
    padded = np.pad(mask, size // 2, mode="edge")
    rows = padded[:h]
    for i in range(1, size):
        rows = combine(rows, padded[i : i + h])
    out = rows[:, :w]
    for i in range(1, size):
        out = combine(out, rows[:, i : i + w])
    return out


def _mask(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(pixels.astype(np.uint8) * 255, mode="L")


def write_heatmap(
    folder: Path, path: Path, record: Record, picture: Image.Image, heat: np.ndarray, caption: str
) -> Path:
    """Write the heatmap PNG of `path`'s result `record` into `folder` (atomically) and return where it went."""
    target = folder / heatmap_name(path, record)
    drawn = overlay(picture, heat, caption)
    made_by = PngImagePlugin.PngInfo()
    made_by.add_text(*MADE_BY)

    def save(fh: IO[bytes]) -> None:
        drawn.save(fh, format="PNG", compress_level=PNG_LEVEL, pnginfo=made_by)

    # a link planted at the name (the name can be foretold) is replaced, never written through:
    # the heatmap overwrote the file it named, anywhere the run may write
    atomic_write(target, save, binary=True, what="heatmap", through_link=False)
    return target


def add_heatmaps(
    items: Sequence[tuple[Path | None, Record]], screener: Screener, folder: Path, flagged_only: bool
) -> list[Record]:
    """The records with a heatmap drawn for each classified one (or each flagged one), in order.

    A file that can no longer be decoded, one whose content changed since it was screened (its
    path is None, where the ledger saw it, or its probabilities drawn again are not the screened
    ones), a label the classifier does not have, or a heatmap that cannot be written leaves the
    record's result as it is, its `heatmap` empty and the reason in its `error` cell. The `heatmap`
    cell holds the picture's absolute path, so a later run started elsewhere still finds it.
    """
    spec = screener.classifier.spec
    negative = spec.negative_label or ""
    changed = "heatmap not drawn: the file has changed since it was screened"
    out = [record for _, record in items]
    wanted = []
    for i, (path, record) in enumerate(items):
        if record.status != CLASSIFIED or (flagged_only and not record.flagged(negative)):
            continue
        if path is None:
            out[i] = record.with_problem(changed)
        elif record.label not in spec.labels:
            out[i] = record.with_problem(f"heatmap not drawn: the classifier has no label {record.label}")
        else:
            wanted.append((i, path))
    maps = screener.class_maps([path for _, path in wanted])
    for (i, path), (decoded, cam, probs) in zip(wanted, maps, strict=True):
        record = items[i][1]
        if cam is None or probs is None or decoded.picture is None:
            # the run's limits (out of memory, ulimit -n), not the file: a rerun draws it, as after a full disk
            problem = NOT_WRITTEN if NOT_THE_FILE in (decoded.error or "") else "heatmap not drawn"
            out[i] = record.with_problem(f"{problem}: {decoded.error}")
            continue
        screened = np.array([(record.probabilities or {}).get(label, np.nan) for label in spec.labels])
        if not np.abs(probs - screened).max() <= SAME_FILM:
            out[i] = record.with_problem(changed)
            continue
        heat = class_map(cam, spec.labels.index(record.label or ""))
        caption = f"{record.label} {record.confidence:.2f}" + (" (review)" if record.needs_review else "")
        try:
            target = write_heatmap(folder, path, record, decoded.picture, heat, caption)
            out[i] = replace(record, heatmap=display_path(target.absolute()))
        except ReportError as exc:
            out[i] = record.with_problem(f"{NOT_WRITTEN}: {exc.reason}")
    return out
