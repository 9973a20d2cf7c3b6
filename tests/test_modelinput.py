"""Model inputs: resizing, colour, equalisation and CLAHE as each model's `InputSpec` says."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cxrbatch.modelinput import InputSpec, clahe, equalize, in_frame, to_model_input

GREY = InputSpec(16, 16, channels=1, colour="grey", equalize=False)
RGB = InputSpec(16, 16, channels=3, colour="rgb", equalize=False)


def test_equalize_spreads_histogram_and_keeps_flat_images() -> None:
    ramp = np.repeat(np.arange(100, 132, dtype=np.uint8), 8).reshape(16, 16)
    out = equalize(ramp)
    assert out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order preserved
    flat = np.full((4, 4), 77, dtype=np.uint8)
    assert np.array_equal(equalize(flat), flat)


def _plain_equalization(grey: np.ndarray) -> np.ndarray:
    """Histogram equalisation written out directly: level v -> 255 * (pixels <= v) / pixels."""
    below = np.array([(grey <= v).sum() for v in range(256)])
    return np.clip(np.rint(below * np.float32(255 / grey.size)), 0, 255).astype(np.uint8)[grey]


def test_clahe_without_clipping_on_one_region_is_plain_equalization() -> None:
    rng = np.random.default_rng(0)
    grey = rng.normal(110, 12, (48, 48)).clip(0, 255).astype(np.uint8)
    assert np.array_equal(clahe(grey, clip_limit=1000.0, tiles=1), _plain_equalization(grey))


def test_clahe_clipping_limits_the_contrast_gain() -> None:
    ramp = np.repeat(np.arange(100, 132, dtype=np.uint8), 72).reshape(48, 48)  # 32 levels, low contrast
    strong, mild, none = (clahe(ramp, c, tiles=1) for c in (1000.0, 4.0, 1.0))
    spread = [int(x.max()) - int(x.min()) for x in (strong, mild, none)]
    assert spread[0] > spread[1] > spread[2]
    # A bin holds at most clip_limit times the mean count plus its share of the excess, so one grey
    # level can be stretched to at most (clip_limit + 1) levels: 31 input steps -> 62 or 155 at most.
    assert spread[0] > 200 and spread[1] <= 5 * 31 and spread[2] <= 2 * 31
    for out in (strong, mild, none):
        assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # one region: order is preserved


def test_clahe_adapts_to_each_region_and_keeps_shape() -> None:
    left = np.full((64, 32), 40, dtype=np.uint8) + np.arange(32, dtype=np.uint8) % 4
    right = np.full((64, 32), 200, dtype=np.uint8) + np.arange(32, dtype=np.uint8) % 4
    grey = np.hstack([left, right])
    out = clahe(grey, clip_limit=40.0, tiles=2)
    assert out.shape == grey.shape and out.dtype == np.uint8
    # Both halves are stretched on their own, so the dark half is no longer dark at its own centre.
    assert out[16, 8:16].max() > 150 and out[16, 40:48].max() > 150
    flat = np.full((50, 70), 77, dtype=np.uint8)  # sizes that do not divide into the regions
    assert len(np.unique(clahe(flat, 2.0))) == 1 and clahe(flat, 2.0).shape == (50, 70)


def test_to_model_input_applies_clahe_from_the_spec() -> None:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.normal(120, 10, (64, 64)).clip(0, 255).astype(np.uint8), mode="L")
    spec = InputSpec(32, 32, channels=1, colour="grey", equalize=False, clahe=2.0)
    resized = np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR))
    assert np.array_equal(to_model_input(img, spec)[..., 0], clahe(resized, 2.0).astype(np.float32))
    with pytest.raises(ValueError):
        InputSpec(32, 32, channels=1, colour="grey", equalize=True, clahe=2.0)


def test_to_model_input_shapes_and_channels() -> None:
    img = Image.new("RGB", (40, 30), (255, 0, 0))
    grey = to_model_input(img, GREY)
    rgb = to_model_input(img, RGB)
    assert grey.shape == (16, 16, 1) and grey.dtype == np.float32
    assert rgb.shape == (16, 16, 3)
    assert rgb[0, 0].tolist() == [255.0, 0.0, 0.0]
    assert grey[0, 0, 0] == pytest.approx(76, abs=1)  # ITU-R 601 luma of pure red
    replicated = to_model_input(img, InputSpec(16, 16, channels=3, colour="grey", equalize=False))
    assert np.array_equal(replicated[..., 0], replicated[..., 2])


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize("equalize_it", [False, True])
def test_a_grey_picture_for_an_rgb_input_equals_converting_it_first(resample: str, equalize_it: bool) -> None:
    """The RGB input of a grey film is resized before its channel is repeated: the same pixels as
    the convert-first way, on films of many sizes and contents."""
    rng = np.random.default_rng(7)
    for height, width in ((1024, 1024), (333, 517), (97, 64), (112, 112)):
        grey = Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
        spec = InputSpec(112, 112, channels=3, colour="rgb", equalize=equalize_it, resample=resample)
        converted = grey.convert("RGB").resize((112, 112), getattr(Image.Resampling, resample.upper()))
        expected = np.asarray(converted, dtype=np.uint8)
        if equalize_it:
            expected = equalize(expected)
        assert np.array_equal(to_model_input(grey, spec), expected.astype(np.float32))


def test_input_spec_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        InputSpec(16, 16, channels=1, colour="rgb", equalize=False)
    with pytest.raises(ValueError):
        InputSpec(16, 16, channels=2, colour="grey", equalize=False)


def test_in_frame_places_the_film_and_fills_the_rest() -> None:
    film = Image.fromarray(np.full((4, 6), 200, dtype=np.uint8), mode="L")
    centred = np.asarray(in_frame(film, 10, 8))
    assert centred.shape == (8, 10)
    assert (centred[2:6, 2:8] == 200).all() and centred.sum() == 200 * 24  # the rest is black
    placed = np.asarray(in_frame(film, 8, 5, left=0, top=1, grey=90))
    assert (placed[1:5, :6] == 200).all() and (placed[0] == 90).all() and (placed[:, 6:] == 90).all()
    colour = in_frame(Image.new("RGB", (3, 3), (10, 20, 30)), 5, 5, grey=7)
    assert colour.getpixel((0, 0)) == (7, 7, 7) and colour.getpixel((2, 2)) == (10, 20, 30)
    with pytest.raises(ValueError, match="cannot hold"):
        in_frame(film, 5, 8)
    with pytest.raises(ValueError, match="stick out"):
        in_frame(film, 8, 5, left=3, top=0)
    with pytest.raises(ValueError, match="L or RGB"):
        in_frame(Image.new("RGBA", (3, 3)), 5, 5)
