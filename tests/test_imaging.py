"""Decoding and preprocessing: every mode to 8 bits, orientation, equalisation, clear errors."""

from __future__ import annotations

import io
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxrbatch.errors import ImageError
from cxrbatch.files import display_path
from cxrbatch.imaging import check_size, load_image


def _save(img: Image.Image, path: Path, **kw: object) -> Path:
    img.save(path, **kw)
    return path


def test_sixteen_bit_png_is_windowed_not_truncated(tmp_path: Path) -> None:
    arr = np.linspace(1000, 3000, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = _save(Image.fromarray(arr), tmp_path / "deep.png")
    img = load_image(path)
    out = np.asarray(img)
    assert img.mode == "L"
    assert out.min() == 0 and out.max() == 255  # full range used, not clipped to white
    assert 120 <= out.mean() <= 135


def test_rgba_is_composited_on_black(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., :3] = 200
    arr[:4, :, 3] = 255  # top half opaque, bottom half transparent
    img = load_image(_save(Image.fromarray(arr, mode="RGBA"), tmp_path / "a.png"))
    out = np.asarray(img.convert("L"))
    assert img.mode == "RGB"
    assert out[:4].min() == 200 and out[4:].max() == 0


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P"])
def test_transparency_over_black_a_band_at_a_time_is_the_whole_pictures_composite(
    monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    # Put over black a band of rows at a time (a 169-megapixel RGBA PNG took four film-sized copies
    # at once): every pixel as compositing the whole picture gives, partial alpha and palettes included.
    import cxrbatch.imaging

    rng = np.random.default_rng(1)
    rgba = Image.fromarray(rng.integers(0, 256, size=(37, 23, 4), dtype=np.uint8), mode="RGBA")
    if mode == "P":  # a palette with one transparent entry
        picture = rgba.convert("RGB").quantize(16)
        picture.info["transparency"] = 5
    elif mode == "PA":
        picture = rgba.convert("RGB").quantize(16).convert("PA")
        picture.putalpha(rgba.getchannel("A"))
    else:
        picture = rgba.convert(mode)
    source = picture.convert("RGBA") if mode == "P" else picture
    base = "L" if mode == "LA" else "RGB"
    alpha = source.convert(base + "A").getchannel("A")
    whole = Image.composite(source.convert(base), Image.new(base, picture.size, 0), alpha)
    monkeypatch.setattr(cxrbatch.imaging, "PIXELS_AT_ONCE", 23 * 5)  # bands of five rows, the last of two
    banded = cxrbatch.imaging._to_8bit(picture)
    assert banded.mode == base and np.array_equal(np.asarray(banded), np.asarray(whole))


def test_la_palette_cmyk_float_modes_become_8bit(tmp_path: Path) -> None:
    la = Image.fromarray(np.full((8, 8, 2), 255, dtype=np.uint8), mode="LA")
    assert load_image(_save(la, tmp_path / "la.png")).mode == "L"
    pal = Image.new("P", (8, 8), 3)
    assert load_image(_save(pal, tmp_path / "p.png")).mode == "RGB"
    cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))
    assert load_image(_save(cmyk, tmp_path / "c.jpg")).mode == "RGB"
    flt = Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8), mode="F")
    out = np.asarray(load_image(_save(flt, tmp_path / "f.tiff")))
    assert out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("L", (40, 20), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(img, tmp_path / "o.jpg", exif=exif)
    assert load_image(path).size == (20, 40)


def test_animated_image_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("L", (8, 8), v) for v in (10, 240)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.asarray(load_image(path)).mean() == pytest.approx(10, abs=2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"<html><body>hello</body></html>", "a text or HTML file, not an image"),
        (bytes(range(255, -1, -1)) * 4, "not a readable image"),  # Pillow 10 reads 0, 1, 2, ... as a TGA
    ],
)
def test_unreadable_bytes_raise_image_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=message):
        load_image(path)


def test_truncated_jpeg_raises_image_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="corrupt or truncated"):
        load_image(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="vanished"):
        load_image(tmp_path / "gone.png")
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path / "dir.png")


def test_draft_decodes_large_jpeg_smaller_but_not_below_target(tmp_path: Path) -> None:
    path = _save(Image.new("L", (1024, 1024), 128), tmp_path / "big.jpg")
    img = load_image(path, draft_size=224)
    assert img.size == (256, 256)
    assert load_image(path).size == (1024, 1024)


def test_too_small_image_is_refused() -> None:
    with pytest.raises(ImageError, match="too small"):
        check_size(Image.new("L", (20, 400)))
    check_size(Image.new("L", (32, 32)))


def test_display_path_escapes_undecodable_bytes() -> None:
    name = b"scan-\xff\xfe.png".decode("utf-8", "surrogateescape")
    assert display_path(name) == "scan-\\xff\\xfe.png"
    assert display_path("plain/ok.png") == "plain/ok.png"


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "WEBP", "PNG", "JPEG"])
def test_other_formats_pillow_reads(tmp_path: Path, fmt: str) -> None:
    arr = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    path = _save(Image.fromarray(arr, mode="L"), tmp_path / f"x.{fmt.lower()}", format=fmt)
    out = np.asarray(load_image(path).convert("L"), dtype=int)
    assert out.shape == (64, 64)
    assert np.abs(out - arr).max() <= (12 if fmt in ("JPEG", "WEBP") else 0)


def test_32bit_integer_mode_is_windowed(tmp_path: Path) -> None:
    arr = np.linspace(-50000, 150000, 32 * 32).reshape(32, 32).astype(np.int32)
    img = load_image(_save(Image.fromarray(arr, mode="I"), tmp_path / "i.tiff"))
    out = np.asarray(img)
    assert img.mode == "L" and out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("mode", ["I;16", "F"])
def test_a_deep_tiff_stored_white_is_zero_is_read_the_right_way_round(tmp_path: Path, mode: str) -> None:
    # Pillow turns an 8-bit "white is zero" TIFF round, not a 16-bit or float one: the film was
    # screened inverted (13 of 24 test films changed label, a TB film was cleared).
    film = np.tile(np.linspace(0, 1, 64), (64, 1))  # dark on the left, bright on the right
    stored = (65535 * (1 - film)).astype(np.uint16 if mode == "I;16" else np.float32)  # white stored as 0
    path = _save(Image.fromarray(stored), tmp_path / "wiz.tif", tiffinfo={262: 0})
    with Image.open(path) as raw:
        assert raw.mode == mode and raw.tag_v2.get(262) == 0
    out = np.asarray(load_image(path)).astype(int)
    assert out[:, 0].max() <= 1 and out[:, -1].min() >= 254  # as a viewer shows it
    normal = np.asarray(load_image(_save(Image.fromarray(stored), tmp_path / "biz.tif"))).astype(int)
    assert np.abs(normal - (255 - out)).max() <= 1  # the same pixels stored "black is zero": the reverse


def test_integer_films_are_scaled_through_a_table_as_the_float_sums_would() -> None:
    from cxrbatch.imaging import _window_to_l

    rng = np.random.default_rng(1)
    for dtype, low, high in ((np.uint16, 0, 65535), (np.uint16, 100, 4095), (np.int32, -3000, 3000), (np.uint16, 7, 7)):
        arr = rng.integers(low, high + 1, size=(60, 40)).astype(dtype)
        assert np.array_equal(np.asarray(_window_to_l(arr)), np.asarray(_window_to_l(arr.astype(np.float64))))
    wide = np.array([[-30000, 30000, 0]], np.int16)  # its range passes the signed maximum: no wrap-around
    assert np.asarray(_window_to_l(wide)).tolist() == [[0, 255, 128]]


def test_a_float_film_is_scaled_without_whole_film_float64_copies() -> None:
    # A deflated float TIFF of 169 megapixels is 1 MB, under Pillow's limit: scaled through
    # float64 copies of the whole film it peaked at 7.4 GB, and a few in one night end the run.
    import tracemalloc

    from cxrbatch.imaging import _window_to_l

    film = np.zeros((4096, 4096), np.float32)  # 64 MiB of float32
    film[::97, ::89], film[1, 1], film[2, 2] = 1.0, np.nan, np.inf
    tracemalloc.start()
    try:
        picture = _window_to_l(film)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < film.nbytes  # a float64 copy alone is twice the film
    shown = np.asarray(picture)
    assert shown[0, 1] == 0 and shown[97, 89] == 255 and shown[1, 1] == 0 and shown[2, 2] == 255
    small = np.array([[np.nan, -np.inf, 1.5], [np.inf, 0.5, 2.5]], np.float32)
    assert np.asarray(_window_to_l(small)).tolist() == [[0, 0, 128], [255, 0, 255]]


@pytest.mark.skipif(shutil.which("cjpeg") is None, reason="cjpeg (libjpeg-turbo-progs) makes the arithmetic-coded JPEG")
def test_an_arithmetic_coded_jpeg_larger_than_pillows_read_block_decodes(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    ppm = _save(Image.fromarray(rng.integers(0, 256, (600, 800), dtype=np.uint8)), tmp_path / "noise.pgm")
    jpeg = tmp_path / "arith.jpg"
    subprocess.run(["cjpeg", "-arithmetic", "-quality", "95", "-outfile", str(jpeg), str(ppm)], check=True)
    assert jpeg.stat().st_size > 65536  # beyond the block Pillow reads at a time
    assert load_image(jpeg).size == (800, 600)


def test_a_large_image_below_the_refusal_limit_decodes_without_a_stray_warning(tmp_path: Path) -> None:
    # Pillow's DecompressionBombWarning reached stderr outside the log format, naming no file.
    path = _save(Image.new("L", (40, 40), 90), tmp_path / "big.png")
    code = (
        "from PIL import Image; Image.MAX_IMAGE_PIXELS = 1000\n"  # 1,600 pixels: over the limit, under twice it
        f"from cxrbatch.imaging import load_image; print(load_image({str(path)!r}).size)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "(40, 40)" and done.stderr == "", done.stderr


def _jpeg_with_corrupt_exif(path: Path) -> Path:
    """A readable JPEG whose EXIF block points a text value past its end (Pillow: "Truncated File Read")."""
    exif = Image.Exif()
    exif[0x010E] = "x" * 40  # ImageDescription, stored outside its IFD entry
    buf = io.BytesIO()
    Image.new("L", (64, 64), 90).save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    order = "big" if b"MM\x00*" in data else "little"  # the TIFF header's byte order
    entry = data.find((0x010E).to_bytes(2, order) + (2).to_bytes(2, order))  # the tag's IFD entry (ASCII)
    data[entry + 8 : entry + 12] = (5000).to_bytes(4, order)  # its value's offset, past the block
    path.write_bytes(bytes(data))
    return path


def test_a_decoders_warning_is_a_log_line_naming_each_file_it_came_from(tmp_path: Path) -> None:
    # Pillow's "Truncated File Read" went to stderr outside the log, naming no file, and only for
    # the first such file of a run; a warning raised elsewhere is still shown as Python shows it.
    first, second = (_jpeg_with_corrupt_exif(tmp_path / name) for name in ("a.jpg", "b.jpg"))
    code = (
        "import logging, warnings; logging.basicConfig(format='%(levelname)s %(message)s')\n"
        "from cxrbatch.imaging import decode_bytes, load_image\n"
        f"print(load_image({str(first)!r}).size, load_image({str(second)!r}).size)\n"
        f"decode_bytes(open({str(first)!r}, 'rb').read(), name='a source: a.jpg')\n"  # as data build reads one
        "warnings.warn('elsewhere')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "(64, 64) (64, 64)", done.stderr
    lines = done.stderr.splitlines()
    named = [f"WARNING {path}: UserWarning from the decoder: Truncated File Read" for path in (first, second)]
    assert lines[:3] == [*named, "WARNING a source: a.jpg: UserWarning from the decoder: Truncated File Read"]
    assert lines[3] == "<string>:5: UserWarning: elsewhere", done.stderr
    # As Python shows it without cxrbatch: from 3.13 with the line of `-c` source under it.
    plain = subprocess.run(
        [sys.executable, "-c", "import warnings\n\n\n\nwarnings.warn('elsewhere')"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert lines[3:] == plain.stderr.splitlines(), done.stderr


def _rgb16_png(values: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of `values` (h x w x 3), which Pillow cannot write."""
    import struct
    import zlib

    h, w, _ = values.shape
    rows = b"".join(b"\0" + values[r].astype(">u2").tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_a_16_bit_colour_png_holding_12_bit_values_is_an_error_not_a_black_film(tmp_path: Path) -> None:
    # Pillow keeps each channel's high byte: 12-bit values came out 0..15, and the gate rejected
    # the film as "not a chest X-ray" (23 of 24 test films).
    film = np.repeat(np.linspace(0, 4095, 64 * 64).reshape(64, 64, 1), 3, axis=2)
    (tmp_path / "low.png").write_bytes(_rgb16_png(film))
    with pytest.raises(ImageError, match="16-bit colour image whose values use only the low bits"):
        load_image(tmp_path / "low.png")
    (tmp_path / "full.png").write_bytes(_rgb16_png(film * 16))  # the full 16-bit range reads well
    assert np.asarray(load_image(tmp_path / "full.png")).max() == 255


def test_colour_films_decode_where_pillow_lists_tiles_as_plain_tuples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pillow 10, which pyproject.toml accepts, lists an image's tiles as plain 4-tuples (11 made
    # them named tuples with `.args`): every colour PNG and JPEG was an error row there.
    real_open = Image.open

    def pillow_10_open(*args: object, **kwargs: object) -> Image.Image:
        img = real_open(*args, **kwargs)  # type: ignore[arg-type]
        img.tile = [tuple(tile) for tile in img.tile]
        return img

    monkeypatch.setattr(Image, "open", pillow_10_open)
    photo = np.zeros((64, 64, 3), dtype=np.uint8)
    photo[..., 0] = 200
    for name in ("photo.png", "photo.jpg"):
        assert load_image(_save(Image.fromarray(photo, mode="RGB"), tmp_path / name)).mode == "RGB"
    (tmp_path / "low.png").write_bytes(_rgb16_png(np.full((64, 64, 3), 4000)))  # the 16-bit check still holds
    with pytest.raises(ImageError, match="16-bit colour image whose values use only the low bits"):
        load_image(tmp_path / "low.png")


def _tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian TIFF header and one IFD (tag, type, count, value bytes), as an EXIF block holds."""
    n = len(entries)
    data_at = 8 + 2 + 12 * n + 4
    ifd, extra = struct.pack("<H", n), b""
    for tag, typ, count, value in entries:
        if len(value) <= 4:
            ifd += struct.pack("<HHI", tag, typ, count) + value.ljust(4, b"\0")
        else:
            ifd += struct.pack("<HHI", tag, typ, count) + struct.pack("<I", data_at + len(extra))
            extra += value
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + extra


def test_a_rotated_jpeg_whose_exif_pillow_cannot_write_back_is_still_screened(tmp_path: Path) -> None:
    # Orientation 6 (shown rotated) and an XResolution stored as the signed rational -1/0: Pillow
    # reads it (as NaN), and its exif_transpose, which writes the EXIF block back after turning
    # the picture, fails on it (struct.error). The film's pixels are fine; a viewer shows it.
    film = np.tile(np.linspace(0, 255, 400), (300, 1)).astype(np.uint8)  # dark left, bright right
    exif = _tiff_ifd([(0x0112, 3, 1, struct.pack("<H", 6)), (0x011A, 10, 1, struct.pack("<ii", -1, 0))])
    path = tmp_path / "rotated.jpg"
    Image.fromarray(film).save(path, "JPEG", exif=b"Exif\x00\x00" + exif)
    img = load_image(path, draft_size=224)  # ImageError: corrupt image (error: argument out of range)
    assert img.size == (300, 400)  # turned upright, as a viewer shows it
    assert np.asarray(img)[:5].mean() < 10  # the dark left side is now on top


def _uint32_tiff(path: Path, values: np.ndarray) -> Path:
    """An uncompressed one-strip grey TIFF of unsigned 32-bit samples (SampleFormat 1)."""
    h, w = values.shape
    data = values.astype("<u4").tobytes()
    tags = [(256, 4, w), (257, 4, h), (258, 3, 32), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1),
            (278, 4, h), (279, 4, len(data)), (339, 3, 1)]  # fmt: skip
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, typ, value in tags:
        value = data_at if tag == 273 else value
        packed = struct.pack("<I", value) if typ == 4 else struct.pack("<HH", value, 0)
        ifd += struct.pack("<HHI", tag, typ, 1) + packed
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8) + ifd + b"\0\0\0\0" + data)
    return path


def test_an_unsigned_32_bit_tiff_keeps_the_order_of_its_values(tmp_path: Path) -> None:
    # Pillow reads unsigned 32-bit samples into its signed "I" mode: values from 2**31 up wrap to
    # negative, and the min-max scaling then makes the brightest parts of the film the darkest.
    ramp = (np.tile(np.linspace(0, 1, 64), (64, 1)) * 4_000_000_000).astype(np.uint32)
    out = np.asarray(load_image(_uint32_tiff(tmp_path / "u32.tif", ramp))).astype(int)
    assert (np.diff(out[0]) >= 0).all(), out[0, ::8]  # was [129 159 190 221 251 23 54 84]
    assert out[0, 0] == 0 and out[0, -1] == 255


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (OSError(24, "Too many open files"), "Too many open files.*ulimit -n"),  # Pillow importing a plugin
        (OSError(5, "Input/output error"), "Input/output error"),  # a failing disk or mount under the decoder
    ],
)
def test_a_system_error_while_decoding_is_not_called_a_corrupt_film(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: OSError, message: str
) -> None:
    path = _save(Image.new("L", (64, 64), 90), tmp_path / "fine.png")

    def failing(*args: object, **kwargs: object) -> Image.Image:
        raise fault

    monkeypatch.setattr(Image, "open", failing)
    with pytest.raises(ImageError, match=message) as caught:
        load_image(path)
    assert "corrupt" not in str(caught.value)
