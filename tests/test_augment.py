"""The training-time augmentation: resolution, framing and crops (numpy and PIL only, no TensorFlow)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from cxrbatch.extras import export_module

augment_module = export_module("augment")
augment, zoom_out_frame, _random_crop = (
    augment_module.augment,
    augment_module.zoom_out_frame,
    augment_module._random_crop,
)


def test_augment_brings_every_view_to_the_weakest_source_resolution() -> None:
    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 255, (320, 300), dtype=np.uint8), mode="L")
    colour = Image.fromarray(rng.integers(0, 255, (300, 320, 3), dtype=np.uint8), mode="RGB")
    for _ in range(20):
        out = augment(big, rng)
        assert out.mode == "L" and max(out.size) <= 224
        assert augment(colour, rng).mode == "RGB"
    views = [np.asarray(augment(big, np.random.default_rng(9))) for _ in range(2)]
    assert np.array_equal(views[0], views[1])  # the same seed gives the same view


def test_zoom_out_frame_keeps_the_whole_film_inside_a_wider_frame() -> None:
    rng = np.random.default_rng(5)
    film = rng.integers(1, 255, (60, 50), dtype=np.uint8)
    fills = set()
    for _ in range(60):
        out = np.asarray(zoom_out_frame(Image.fromarray(film, mode="L"), rng))
        assert 60 <= out.shape[0] <= 90 and 50 <= out.shape[1] <= 75
        spots = [(y, x) for y in range(out.shape[0] - 59) for x in range(out.shape[1] - 49)]
        found = [(y, x) for y, x in spots if np.array_equal(out[y : y + 60, x : x + 50], film)]
        assert found  # never cut, never scaled
        y, x = found[0]
        around = np.ones(out.shape, dtype=bool)
        around[y : y + 60, x : x + 50] = False
        if not around.any():
            continue
        if len(np.unique(out[around])) == 1:
            fills.add("black" if out[around][0] == 0 else "grey")
        else:  # mirrored outwards: the row or column next to the film repeats the film's edge
            assert (y > 0 and np.array_equal(out[y - 1, x : x + 50], film[0])) or (
                x > 0 and np.array_equal(out[y : y + 60, x - 1], film[:, 0])
            )
            fills.add("mirror")
    assert fills == {"black", "grey", "mirror"}
    # zoom_out=1: every view framed, nothing cropped, so a flat film keeps its whole area in view
    flat = Image.fromarray(np.full((200, 200), 255, dtype=np.uint8), mode="L")
    views = [np.asarray(augment(flat, np.random.default_rng(s), zoom_out=1.0)) for s in range(10)]
    crops = [np.asarray(augment(flat, np.random.default_rng(s))) for s in range(10)]
    assert min((v > 128).mean() for v in views) < 0.85 and min((c > 128).mean() for c in crops) > 0.85


def test_random_crop_keeps_at_least_the_asked_share_of_the_area() -> None:
    film = Image.new("L", (200, 160))
    for least in (0.3, 0.7):
        rng = np.random.default_rng(1)
        shares = [np.prod(_random_crop(film, rng, least).size) / (200 * 160) for _ in range(300)]
        assert min(shares) >= 0.9 * least  # an edge can clip the aspect a little
        assert min(shares) < least + 0.05  # the whole range is used
    assert min(shares) > 0.6  # with 0.7 nothing as tight as the 0.3 crops
