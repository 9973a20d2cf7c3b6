"""A grey film held as its stored levels and a table of what each level stands for.

An integer film (a 16-bit PNG or TIFF, a DICOM frame) has at most a few thousand distinct
stored values. Whatever is computed per pixel before the film becomes 8-bit (a DICOM's rescale
and window, the scaling from its minimum to its maximum) can be computed once per level and
looked up: the same float64 sums, so the same output, with no float64 copy of the film (a
9-megapixel DICOM with a rescale and a window peaked at about 390 MB that way).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

LUT_RANGE = 1 << 20  # integer films with at most this many levels from lowest to highest are held this way


@dataclass(frozen=True)
class Levels:
    """A grey film as `values[index]`: `index` has the film's shape (unsigned, its stored value
    less the lowest), `values` one entry per level from the lowest stored value to the highest."""

    index: np.ndarray
    values: np.ndarray

    @classmethod
    def of(cls, arr: np.ndarray) -> Levels | None:
        """An integer film as its levels (`values` in the film's own dtype), or None where it is
        not integer, empty, or spans more than `LUT_RANGE` levels."""
        if arr.dtype.kind not in "iu" or not arr.size:
            return None
        low, high = int(arr.min()), int(arr.max())
        if high - low >= LUT_RANGE:
            return None
        index = arr - np.asarray(low, dtype=arr.dtype) if low else arr  # wraps past a signed maximum:
        if index.dtype.kind == "i":  # read as unsigned, it is exact, since high - low < 2 ** bits
            index = index.view(index.dtype.str.replace("i", "u"))
        return cls(index, np.arange(low, high + 1, dtype=arr.dtype))

    def map(self, how: Callable[[np.ndarray], np.ndarray]) -> Levels:
        """The film with `how` applied to each level (an elementwise function of the values)."""
        return Levels(self.index, np.asarray(how(self.values)))

    def present(self) -> np.ndarray:
        """Which levels occur in the film (the lowest and the highest always do)."""
        seen = np.zeros(len(self.values), dtype=bool)
        seen[self.index] = True
        return seen

    def extremes(self, finite: bool = False) -> tuple[float, float] | None:
        """The film's smallest and largest value (NaN if one is NaN), or of its finite values
        only with `finite`; None where it has none. Only the two end levels are looked at where
        the table is finite and runs one way (a window, a rescale)."""
        values = self.values
        steps = np.diff(values)
        if np.isfinite(values).all() and ((steps >= 0).all() or (steps <= 0).all()):
            ends = (float(values[0]), float(values[-1]))
            return min(ends), max(ends)
        chosen = values[self.present() & (np.isfinite(values) if finite else True)]
        if chosen.size == 0:
            return None
        return float(chosen.min()), float(chosen.max())

    def to_l(self) -> Image.Image:
        """The film scaled linearly from its smallest finite value to its largest onto 0..255
        (NaN black, infinities at the ends), as an 8-bit grey picture."""
        span = self.extremes(finite=True)
        h, w = self.index.shape
        if span is None:
            return Image.new("L", (w, h), 0)
        table = to_8bit(self.values.astype(np.float64, copy=False), *span)
        return Image.fromarray(table[self.index], mode="L")


def to_8bit(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """`values` scaled linearly from `lo` to `hi` onto 0..255 (uint8; NaN 0, infinities at the ends)."""
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    out = np.nan_to_num((values - lo) * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
