"""Pixel ids and difference hashes (dHash) of 8-bit grey images.

A dHash of size w x h resizes the grey image to (w + 1) x h with Lanczos and sets a bit where a
pixel is brighter than its right-hand neighbour, row by row, most significant bit first. Copies
of one film (re-encoded, resized, contrast-changed) keep nearly all bits; different films differ
in many. `dhash256` (16 x 16) is the one recorded in manifests, so anyone can check a manifest
for overlap with another collection without its images.
"""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

# Bits set in each byte value: popcount without numpy 2's bitwise_count.
POPCOUNT = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1).astype(np.int64)


def pixel_id(grey: Image.Image) -> str:
    """The first 12 hex digits of sha1(b"WxH:" + pixels) of an 8-bit grey image."""
    if grey.mode != "L":
        raise ValueError(f"pixel_id takes an L image, not {grey.mode}")
    return hashlib.sha1(b"%dx%d:" % grey.size + grey.tobytes()).hexdigest()[:12]


def dhash_bits(grey: Image.Image, width: int, height: int) -> np.ndarray:
    """The width x height dHash as a flat bool array (row by row)."""
    small = np.asarray(grey.convert("L").resize((width + 1, height), Image.Resampling.LANCZOS), dtype=np.int16)
    return (small[:, :-1] > small[:, 1:]).ravel()


def dhash256(grey: Image.Image) -> str:
    """The 256-bit dHash (16 x 16) as 64 hex digits, most significant bit first."""
    return np.packbits(dhash_bits(grey, 16, 16)).tobytes().hex()


def dhash64(grey: Image.Image) -> int:
    """The 64-bit dHash (8 x 8), the cheap candidate test for near duplicates."""
    return int.from_bytes(np.packbits(dhash_bits(grey, 8, 8)).tobytes(), "big")


def dhash4096(grey: Image.Image) -> np.ndarray:
    """The 4096-bit dHash (64 x 64), packed into 512 bytes: the test that confirms a candidate."""
    return np.packbits(dhash_bits(grey, 64, 64))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Differing bits between packed uint8 hashes (along the last axis)."""
    return POPCOUNT[np.bitwise_xor(a, b)].sum(axis=-1)
