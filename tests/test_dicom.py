"""DICOM decoding: LUTs in the standard's order, MONOCHROME1, 16 bit, frames, and clear errors."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom", reason="the dicom extra (pydicom) is not installed")

from helpers import PATIENT, PATIENT_ID, make_dicom, ramp  # noqa: E402
from pydicom.uid import JPEG2000Lossless  # noqa: E402

from cxrbatch.discovery import iter_images  # noqa: E402
from cxrbatch.errors import ImageError  # noqa: E402
from cxrbatch.imaging import load_image  # noqa: E402


def test_monochrome2_16bit_is_scaled_to_full_range(tmp_path: Path) -> None:
    img = load_image(make_dicom(tmp_path / "a.dcm", ramp()))
    arr = np.asarray(img)
    assert img.mode == "L" and img.size == (64, 64)
    assert arr[0, 0] == 0 and arr[-1, -1] == 255  # dark stays dark


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    arr = np.asarray(load_image(make_dicom(tmp_path / "m1.dcm", ramp(), photometric="MONOCHROME1")))
    assert arr[0, 0] == 255 and arr[-1, -1] == 0


def test_voi_window_is_applied_before_inversion(tmp_path: Path) -> None:
    # Window 1500..2500 of a 1000..3000 ramp: the first quarter saturates dark, the last quarter light.
    path = make_dicom(tmp_path / "w.dcm", ramp(), WindowCenter=2000, WindowWidth=1000)
    arr = np.asarray(load_image(path)).ravel()
    assert arr[: len(arr) // 5].max() == 0 and arr[-len(arr) // 5 :].min() == 255
    inverted = make_dicom(tmp_path / "w1.dcm", ramp(), photometric="MONOCHROME1", WindowCenter=2000, WindowWidth=1000)
    arr1 = np.asarray(load_image(inverted)).ravel()
    assert arr1[: len(arr1) // 5].min() == 255 and arr1[-len(arr1) // 5 :].max() == 0


def test_rescale_slope_intercept_is_applied(tmp_path: Path) -> None:
    # A negative slope flips the ramp: proof that the modality LUT ran.
    path = make_dicom(tmp_path / "r.dcm", ramp(), RescaleSlope=-1, RescaleIntercept=4000)
    arr = np.asarray(load_image(path))
    assert arr[0, 0] == 255 and arr[-1, -1] == 0


def test_a_presentation_lut_shape_of_inverse_inverts_a_monochrome2_film(tmp_path: Path) -> None:
    # The Presentation LUT is the standard's last grey stage: INVERSE shows the smallest value white,
    # as viewers show it. It was ignored, and such a film reached the models as a negative. On a
    # MONOCHROME1 film (which the DX module requires to say INVERSE) it is the same inversion, not a
    # second one.
    inverse = np.asarray(load_image(make_dicom(tmp_path / "inv.dcm", ramp(), PresentationLUTShape="INVERSE")))
    assert inverse[0, 0] == 255 and inverse[-1, -1] == 0
    dx = np.asarray(load_image(make_dicom(tmp_path / "dx.dcm", ramp(), "MONOCHROME1", PresentationLUTShape="INVERSE")))
    assert dx[0, 0] == 255 and dx[-1, -1] == 0
    identity = np.asarray(load_image(make_dicom(tmp_path / "id.dcm", ramp(), PresentationLUTShape="IDENTITY")))
    assert identity[0, 0] == 0 and identity[-1, -1] == 255


def test_a_window_after_a_negative_rescale_slope_keeps_the_film_the_right_way_round(tmp_path: Path) -> None:
    # Stored 4000 - ramp with slope -1 and intercept 4000 is the ramp once rescaled; windowed, it
    # must still rise. pydicom takes a window's output range from the rescale's ends, which a
    # negative slope turns backwards: the film came out inverted.
    window = {"WindowCenter": 2000, "WindowWidth": 1000}
    negative = make_dicom(tmp_path / "neg.dcm", 4000 - ramp(), RescaleSlope=-1, RescaleIntercept=4000, **window)
    arr = np.asarray(load_image(negative))
    assert np.array_equal(arr, np.asarray(load_image(make_dicom(tmp_path / "plain.dcm", ramp(), **window))))
    assert arr[0, 0] == 0 and arr[-1, -1] == 255


def _framed(film: np.ndarray, value: int, border: int = 8) -> np.ndarray:
    """`film` in a border of `value`: the padding a CR reader or an export puts around a film."""
    framed = np.full((film.shape[0] + 2 * border, film.shape[1] + 2 * border), value, dtype=film.dtype)
    framed[border:-border, border:-border] = film
    return framed


@pytest.mark.parametrize(
    ("photometric", "pad", "window"),
    [
        ("MONOCHROME2", 0, {}),
        ("MONOCHROME1", 4095, {}),
        ("MONOCHROME2", 0, {"WindowCenter": 2000, "WindowWidth": 1000}),
    ],
)
def test_pixel_padding_is_black_and_left_out_of_the_films_scaling(
    tmp_path: Path, photometric: str, pad: int, window: dict[str, int]
) -> None:
    # Pixel Padding Value marks stored values that are no part of the film (the frame around it).
    # They were scaled with the film: a 1000..3000 ramp in a border of 0 reached the models at
    # 85..255 instead of 0..255 (and, in MONOCHROME1 with a border of 4095, the other way round).
    plain = np.asarray(load_image(make_dicom(tmp_path / "plain.dcm", ramp(), photometric, **window)))
    framed = make_dicom(tmp_path / "framed.dcm", _framed(ramp(), pad), photometric, PixelPaddingValue=pad, **window)
    arr = np.asarray(load_image(framed))
    assert np.array_equal(arr[8:-8, 8:-8], plain)
    assert arr[:8].max() == 0 and arr[:, -8:].max() == 0  # padding shows black, as viewers show it


def test_pixel_padding_of_a_film_held_pixel_by_pixel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a film of more levels than are looked up level by level (32-bit values) is blackened pixel by pixel
    import cxrbatch.levels

    plain = np.asarray(load_image(make_dicom(tmp_path / "plain.dcm", ramp(), "MONOCHROME1")))
    framed = make_dicom(tmp_path / "framed.dcm", _framed(ramp(), 0), "MONOCHROME1", PixelPaddingValue=0)
    monkeypatch.setattr(cxrbatch.levels, "LUT_RANGE", 16)
    arr = np.asarray(load_image(framed))
    assert np.array_equal(arr[8:-8, 8:-8], plain) and arr[:8].max() == 0


def test_a_pixel_padding_range_and_a_signed_film(tmp_path: Path) -> None:
    # Stored values from the Pixel Padding Value to the Pixel Padding Range Limit are all padding;
    # in a signed film (Pixel Representation 1) the values are read signed.
    film = (ramp().astype(np.int32) - 2000).astype(np.int16)  # -1000..1000
    framed = np.random.default_rng(0).integers(-3000, -2500, size=(80, 80)).astype(np.int16)
    framed[8:-8, 8:-8] = film  # in a border of values anywhere from -3000 to -2500
    common = {"PixelRepresentation": 1}
    plain = np.asarray(load_image(make_dicom(tmp_path / "plain.dcm", film, **common)))
    padded = make_dicom(tmp_path / "range.dcm", framed, PixelPaddingValue=-3000, PixelPaddingRangeLimit=-2500, **common)
    arr = np.asarray(load_image(padded))
    assert np.array_equal(arr[8:-8, 8:-8], plain) and arr[:8].max() == 0


def test_a_film_of_padding_alone_or_a_padding_value_it_does_not_hold_is_read_as_before(tmp_path: Path) -> None:
    # nothing but padding: no film to scale, and no error; a padding value no pixel holds: no change
    alone = np.asarray(load_image(make_dicom(tmp_path / "alone.dcm", np.full((64, 64), 7), PixelPaddingValue=7)))
    assert alone.shape == (64, 64) and alone.max() == alone.min()
    plain = np.asarray(load_image(make_dicom(tmp_path / "plain.dcm", ramp())))
    unused = np.asarray(load_image(make_dicom(tmp_path / "unused.dcm", ramp(), PixelPaddingValue=0)))
    assert np.array_equal(unused, plain)


@pytest.mark.parametrize(("implicit", "little"), [(True, True), (False, True), (False, False)])
def test_a_data_set_without_its_file_meta_is_read_in_the_encoding_found(
    tmp_path: Path, implicit: bool, little: bool
) -> None:
    # A .dcm file holding the data set alone (no preamble and no file meta, as ACR-NEMA-era
    # devices and some exports write it) names no transfer syntax: pydicom reads its header but
    # will not decode its pixels, and the film was an error row ("cannot be decoded (AttributeError)").
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    plain = make_dicom(tmp_path / "plain.dcm", ramp())
    bare = Dataset()
    bare.update(pydicom.dcmread(plain))
    bare.PixelData = ramp().astype("<u2" if little else ">u2").tobytes()
    fp = DicomBytesIO()
    fp.is_implicit_VR, fp.is_little_endian = implicit, little
    write_dataset(fp, bare)
    (tmp_path / "bare.dcm").write_bytes(fp.getvalue())
    assert np.array_equal(np.asarray(load_image(tmp_path / "bare.dcm")), np.asarray(load_image(plain)))


def test_a_file_that_opens_with_the_magic_its_preamble_left_out_is_read(tmp_path: Path) -> None:
    # Some writers leave out the 128-byte preamble but keep the DICM magic and the file meta: pydicom
    # read the magic as a tag, found nothing, and the film was an error row, "no pixel data".
    plain = make_dicom(tmp_path / "plain.dcm", ramp())
    (tmp_path / "magic.dcm").write_bytes(plain.read_bytes()[128:])
    assert np.array_equal(np.asarray(load_image(tmp_path / "magic.dcm")), np.asarray(load_image(plain)))


def test_multi_frame_gives_first_frame_with_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    frames = np.stack([ramp(), ramp()[::-1]])
    with caplog.at_level(logging.WARNING):
        arr = np.asarray(load_image(make_dicom(tmp_path / "mf.dcm", frames)))
    assert arr[0, 0] == 0
    assert "multi-frame DICOM (2 frames)" in caplog.text


@pytest.mark.parametrize("decoders", ["0", "1"])
def test_the_warning_is_a_line_of_the_runs_log_in_a_decoding_process_too(
    tmp_path: Path, tiny_models: Path, decoders: str
) -> None:
    folder = tmp_path / "incoming"
    folder.mkdir()
    make_dicom(folder / "mf.dcm", np.stack([ramp(), ramp()[::-1]]))
    args = ["run", str(folder), "--models", str(tiny_models), "--out", str(tmp_path / "r.csv"), "--decoders", decoders]
    done = subprocess.run([sys.executable, "-m", "cxrbatch.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    stamped = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4} \[warning\] \S*mf.dcm: multi-frame DICOM \(2 frames\)"
    assert re.search(stamped, done.stderr, re.MULTILINE), done.stderr


def _colour_dicom(path: Path, values: np.ndarray, photometric: str, bits: int) -> Path:
    """A colour (3 samples, interleaved) DICOM holding `values` as stored."""
    path = make_dicom(path, None)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = values.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits <= 8 else 16), bits, bits - 1, 0
    ds.add_new(0x7FE00010, "OB" if bits <= 8 else "OW", values.astype(np.uint8 if bits <= 8 else np.uint16).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def test_ybr_colour_is_converted_to_rgb_once(tmp_path: Path) -> None:
    # pydicom 3 already hands back RGB; converting again turned a red film green.
    from pydicom.pixels import convert_color_space

    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 30, 40)
    path = _colour_dicom(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL", 8)
    got = np.asarray(load_image(path).convert("RGB"))[0, 0].astype(int)
    assert np.abs(got - (200, 30, 40)).max() <= 2


def test_colour_of_more_than_8_bits_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.zeros((16, 16, 3), np.uint16)
    values[:8] = 4095  # 12-bit white
    values[8:] = 2048  # 12-bit middle grey
    arr = np.asarray(load_image(_colour_dicom(tmp_path / "rgb12.dcm", values, "RGB", 12)).convert("RGB"))
    assert arr[0, 0].tolist() == [255, 255, 255] and arr[15, 15].tolist() == [128, 128, 128]


def _palette_dicom(path: Path, indices: np.ndarray, tables: np.ndarray | None, bits: int = 16) -> Path:
    """A PALETTE COLOR DICOM: 8-bit `indices` into red, green and blue `tables` (256 x 3) of `bits`-bit
    entries, stored in 16-bit words either way."""
    path = make_dicom(path, None)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = indices.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.add_new(0x7FE00010, "OB", indices.astype(np.uint8).tobytes())
    if tables is not None:
        for k, table in enumerate(tables.T):  # (0028,1101-1103) descriptors, (0028,1201-1203) tables
            ds.add_new(0x00281101 + k, "US", [256, 0, bits])
            ds.add_new(0x00281201 + k, "OW", table.astype("<u2").tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def test_palette_colour_goes_through_its_colour_tables(tmp_path: Path) -> None:
    # Its stored values are indices: read as grey, a table that reverses them showed the film inverted.
    indices = np.zeros((16, 16), np.uint8)
    indices[:8] = 10
    indices[8:] = 200
    tables = np.zeros((256, 3), np.uint16)
    tables[10] = (65535, 0, 0)  # index 10 is red
    tables[200] = (0, 0, 32896)  # index 200 a middle blue
    arr = np.asarray(load_image(_palette_dicom(tmp_path / "palette.dcm", indices, tables)).convert("RGB"))
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[15, 15].tolist() == [0, 0, 128]
    with pytest.raises(ImageError, match="PALETTE COLOR DICOM without a usable colour palette"):
        load_image(_palette_dicom(tmp_path / "no-tables.dcm", indices, None))
    # 8-bit entries in 16-bit words (pydicom returns them as uint16 holding 0..255): scaled by the
    # descriptor's 8 bits, not the words' 16, or the film came out black
    eight = np.zeros((256, 3), np.uint16)
    eight[10], eight[200] = (255, 0, 0), (0, 0, 128)
    arr = np.asarray(load_image(_palette_dicom(tmp_path / "palette8.dcm", indices, eight, bits=8)).convert("RGB"))
    assert arr[0, 0].tolist() == [255, 0, 0] and arr[15, 15].tolist() == [0, 0, 128]


def test_a_frame_too_large_to_decode_safely_is_refused_before_decoding(tmp_path: Path) -> None:
    from PIL import Image

    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 1
    path = make_dicom(tmp_path / "huge.dcm", ramp(), Rows=side, Columns=side)  # a header that declares it
    with pytest.raises(ImageError, match="image too large to decode safely"):
        load_image(path)


def test_a_32_bit_frame_of_many_levels_is_read_without_extra_float64_copies(tmp_path: Path) -> None:
    # A deflated 32-bit frame of 169 megapixels is a 700 KB file: it peaked at 6.8 GB (its bytes
    # kept after decoding, and float64 copies of the whole frame while scaling it to 8 bits).
    import tracemalloc

    film = np.zeros((2048, 2048), np.uint32)  # 16 MiB, levels too many for a table
    film[::97, ::89] = 2**31
    wide = {"BitsAllocated": 32, "BitsStored": 32, "HighBit": 31, "Rows": 2048, "Columns": 2048}
    path = make_dicom(tmp_path / "wide.dcm", np.zeros((2, 2)), PixelData=film.tobytes(), **wide)
    tracemalloc.start()
    try:
        shown = np.asarray(load_image(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5 * film.nbytes  # the file's bytes, the frame and one float64 copy of it
    assert shown[97, 89] == 255 and shown[0, 1] == 0


def test_an_invalid_window_is_ignored_as_viewers_do(tmp_path: Path) -> None:
    arr = np.asarray(load_image(make_dicom(tmp_path / "ww0.dcm", ramp(), WindowCenter=2000, WindowWidth=0)))
    assert arr.min() == 0 and arr.max() == 255  # the stored ramp, scaled


def test_no_pixel_data_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no pixel data"):
        load_image(make_dicom(tmp_path / "sr.dcm", None))


def test_compressed_without_decoder_names_the_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("cxrbatch.dicom._can_decode", lambda syntax, bits: False)  # no plugin for JPEG 2000
    path = make_dicom(tmp_path / "j2k.dcm", ramp(), syntax=JPEG2000Lossless)
    with pytest.raises(ImageError, match=r"compressed DICOM \(JPEG 2000.*pip install pylibjpeg") as info:
        load_image(path)
    assert PATIENT not in str(info.value) and PATIENT_ID not in str(info.value)


def test_a_12_bit_jpeg_film_that_only_pillow_could_decode_still_names_the_decoders(tmp_path: Path) -> None:
    # pydicom's Pillow plugin counts as available for JPEG Extended but reads 8 bits only: the
    # film needs pylibjpeg or gdcm, not "corrupt" data.
    from pydicom.uid import JPEGExtended12Bit

    path = make_dicom(tmp_path / "cr12.dcm", ramp(), syntax=JPEGExtended12Bit, BitsStored=12, HighBit=11)
    with pytest.raises(ImageError, match=r"compressed DICOM \(JPEG Extended.*needs a decoder: pip install pylibjpeg"):
        load_image(path)


def test_corrupt_compressed_pixel_data_with_a_decoder_there_is_not_blamed_on_a_missing_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "needs a decoder: pip install pylibjpeg ..." for a truncated JPEG Baseline film that pydicom
    # decodes with Pillow: installing the plugins would not have helped.
    monkeypatch.setattr("cxrbatch.dicom._can_decode", lambda syntax, bits: True)
    path = make_dicom(tmp_path / "j2k.dcm", ramp(), syntax=JPEG2000Lossless)  # its data is no JPEG 2000 stream
    with pytest.raises(ImageError, match=r"compressed DICOM \(JPEG 2000.*\) whose pixel data is corrupt or truncated"):
        load_image(path)


TAGS = {"NumberOfFrames": (0x0028, 0x0008), "WindowCenter": (0x0028, 0x1050), "WindowWidth": (0x0028, 0x1051),
        "RescaleSlope": (0x0028, 0x1053)}  # fmt: skip


def _overwrite(path: Path, key: str, value: bytes) -> None:
    """Put `value` (as long as the element's value) in place of one element's value in an
    explicit-VR little-endian file: found by its tag, VR and length, never elsewhere."""
    group, element = TAGS[key]
    data = path.read_bytes()
    vr = b"IS" if key == "NumberOfFrames" else b"DS"
    header = group.to_bytes(2, "little") + element.to_bytes(2, "little") + vr + len(value).to_bytes(2, "little")
    assert data.count(header) == 1, key
    at = data.index(header) + len(header)
    path.write_bytes(data[:at] + value + data[at + len(value) :])


@pytest.mark.parametrize(
    "values",
    [
        {"RescaleSlope": None, "RescaleIntercept": None, "WindowCenter": "1", "WindowWidth": "2"},
        {"RescaleSlope": b"1,5 "},
        {"WindowCenter": b"abc ", "WindowWidth": b"x,y "},
        {"NumberOfFrames": b"AB"},
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pytest shows what the run keeps off stderr
def test_malformed_header_values_are_read_as_absent(tmp_path: Path, values: dict[str, object]) -> None:
    # An empty RescaleSlope, "1,5", a non-numeric window or frame count gave "unexpected decoder
    # failure (TypeError ...)" or a ValueError: the film was not screened. pydicom will not write
    # such values, so each goes in over a valid one of its length, found by its tag.
    attrs = {key: "1" * len(value) if isinstance(value, bytes) else value for key, value in values.items()}
    path = make_dicom(tmp_path / "bad-header.dcm", ramp(), **attrs)
    for key, value in values.items():
        if isinstance(value, bytes):
            _overwrite(path, key, value)
    arr = np.asarray(load_image(path))
    assert arr.min() == 0 and arr.max() == 255  # the stored ramp, scaled over its own range


def test_pydicom_logs_nothing_of_a_file_not_even_with_verbose(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # It logged the traceback of a frame it could not decode as an [error] line beside the row's
    # own error, and its warnings can quote header values, which no log may hold.
    caplog.set_level(logging.DEBUG)
    path = make_dicom(tmp_path / "j2k.dcm", ramp(), syntax=JPEG2000Lossless)
    with pytest.raises(ImageError, match="compressed DICOM"):
        load_image(path)
    assert [r for r in caplog.records if r.name.startswith("pydicom")] == []


def test_dicom_of_any_name_is_found_by_its_preamble(tmp_path: Path) -> None:
    names = ["1.2.840.113619.2.55.3.604688119.868.123", "IM000001", "film.IMA", "study.dicom"]
    for name in names:
        make_dicom(tmp_path / name, ramp())
    (tmp_path / "README").write_text("not dicom", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not dicom either", encoding="utf-8")
    found = list(iter_images([tmp_path]))
    assert [p.name for p in found] == sorted(names)
    assert all(load_image(p).size == (64, 64) for p in found)


def test_reports_never_carry_patient_identifiers(tmp_path: Path, tiny_models: Path) -> None:
    from typer.testing import CliRunner

    from cxrbatch.cli import app

    folder = tmp_path / "in"
    folder.mkdir()
    make_dicom(folder / "ok.dcm", ramp())
    make_dicom(folder / "bad.dcm", ramp(), syntax=JPEG2000Lossless)
    make_dicom(folder / "empty.dcm", None)
    out, doc = tmp_path / "r.csv", tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["run", str(folder), "--models", str(tiny_models), "--out", str(out), "--json", str(doc), "-v"]
    )
    assert result.exit_code == 3
    text = out.read_text(encoding="utf-8") + doc.read_text(encoding="utf-8") + result.stderr
    assert PATIENT not in text and PATIENT_ID not in text and "Doe" not in text
    assert "ok.dcm,classified" in out.read_text(encoding="utf-8")


def test_without_pydicom_the_message_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_dicom(tmp_path / "ct.dcm", ramp())
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the dicom extra were not installed
    with pytest.raises(ImageError) as info:
        load_image(path)
    assert str(info.value) == (
        "DICOM file, but pydicom is not installed: pip install 'cxrbatch[dicom]' "
        "(in a source checkout: pip install '.[dicom]')"
    )


def test_a_picture_or_a_web_page_named_dcm_is_read_as_what_it_is(tmp_path: Path) -> None:
    # A .dcm name forced the DICOM reader: a JPEG got "DICOM file has no pixel data (not an image)".
    from PIL import Image

    Image.fromarray((ramp() // 16).astype(np.uint8)).save(tmp_path / "film.dcm", format="JPEG")
    assert load_image(tmp_path / "film.dcm").size == (64, 64)
    (tmp_path / "page.dcm").write_text("<html><body>404 Not Found</body></html>", encoding="utf-8")
    with pytest.raises(ImageError, match="a text or HTML file, not an image"):
        load_image(tmp_path / "page.dcm")
    huge = Image.new("L", (1, 1))
    huge.save(tmp_path / "huge.dcm", format="PNG")  # a PNG whose header declares too many pixels
    data = bytearray((tmp_path / "huge.dcm").read_bytes())
    data[16:24] = (30000).to_bytes(4, "big") * 2  # IHDR width and height, and the chunk's CRC again
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    (tmp_path / "huge.dcm").write_bytes(bytes(data))
    with pytest.raises(ImageError, match="image too large to decode safely"):  # it said "no pixel data"
        load_image(tmp_path / "huge.dcm")
    preambleless = make_dicom(tmp_path / "old.dcm", ramp())  # a DICOM file without its preamble: still DICOM
    preambleless.write_bytes(preambleless.read_bytes()[132:])
    assert np.asarray(load_image(preambleless)).max() == 255


def test_pydicom_warnings_quoting_header_values_stay_off_stderr(tmp_path: Path) -> None:
    path = make_dicom(tmp_path / "frames.dcm", ramp(), NumberOfFrames="11")
    _overwrite(path, "NumberOfFrames", b"AB")
    code = f"from cxrbatch.imaging import load_image; load_image({str(path)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "AB" not in done.stderr and done.stderr == "", done.stderr


def _per_pixel(path: Path) -> np.ndarray:
    """The film as the LUTs give it pixel by pixel over the whole frame, scaled as `load_image`
    scales (the way it was read before each stored level was computed once)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() + values.min() - values
    lo, hi = values.min(), values.max()  # the films here are finite and not flat
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("photometric", "attrs"),
    [
        ("MONOCHROME2", {"RescaleSlope": 0.5, "RescaleIntercept": -1024, "WindowCenter": 200, "WindowWidth": 900}),
        ("MONOCHROME1", {"WindowCenter": 1800, "WindowWidth": 2500}),
        ("MONOCHROME2", {"PixelRepresentation": 1, "RescaleIntercept": 7}),
    ],
)
def test_each_stored_level_computed_once_gives_the_per_pixel_film(
    tmp_path: Path, photometric: str, attrs: dict[str, object]
) -> None:
    # The LUTs ran over the whole frame in float64 (a 9-megapixel film peaked near 390 MB); now
    # over each stored level once, looked up: the same film, value for value.
    rng = np.random.default_rng(3)
    stored = rng.integers(300, 4000, (96, 80)).astype(np.uint16)
    stored[0, 0], stored[-1, -1] = 0, 4095
    path = make_dicom(tmp_path / "f.dcm", stored, photometric, **attrs)
    assert np.array_equal(np.asarray(load_image(path)), _per_pixel(path))


def test_a_lut_that_turns_back_is_scaled_on_the_levels_the_film_holds(tmp_path: Path) -> None:
    # A VOI LUT table that rises and falls: its extremes lie at levels the film may not hold, and
    # the film is scaled from the smallest value it does hold to the largest.
    import pydicom
    from pydicom.dataset import Dataset

    stored = np.array([[10, 12, 30], [31, 12, 10]], np.uint16).repeat(20, axis=0).repeat(20, axis=1)
    table = Dataset()
    table.LUTDescriptor = [32, 0, 16]
    table.add_new(0x00283006, "US", [int(4000 * np.sin(np.pi * v / 31)) for v in range(32)])  # peak at 15, 16
    path = make_dicom(tmp_path / "lut.dcm", stored)
    ds = pydicom.dcmread(path)
    ds.VOILUTSequence = [table]
    ds.save_as(path)
    out = np.asarray(load_image(path))
    assert np.array_equal(out, _per_pixel(path))
    assert out.min() == 0 and out.max() == 255  # spread over what the film holds, not the table's peak


# What comes before Rows in each deflated file below: nothing; a private element of 2 MB of zeros
# (it pushed the header past a fixed window of inflated bytes); a short private OB of undefined
# length, whose delimiter pydicom looks for 8 KiB ahead and then steps back to (a stream that could
# step back only 4 KiB made the check give up); and a sequence item holding 16 MB of zeros.
BEFORE_ROWS = {
    "nothing": "",
    "padding": "ds.add_new(0x00091010, 'OB', bytes(2_000_000))\n",
    "undefined OB": "ds.add_new(0x00090010, 'LO', 'X'); ds.add_new(0x00091002, 'OB', b'')\n",
    "sequence blob": (
        "from pydicom.dataset import Dataset\nfrom pydicom.sequence import Sequence\n"
        "item = Dataset(); item.add_new(0x00090010, 'LO', 'X'); item.add_new(0x00091002, 'OB', bytes(16 << 20))\n"
        "ds.add_new(0x00090010, 'LO', 'X'); ds.add_new(0x00091001, 'SQ', Sequence([item]))\n"
        "ds[0x00091001].is_undefined_length = True; item.is_undefined_length_sequence_item = True\n"
    ),
}
UNDEFINED_OB = (  # the empty OB made one of undefined length: 280 bytes, then a sequence delimiter
    "import zlib\n"
    "from pydicom.filereader import _read_file_meta_info, read_preamble\n"
    "raw = path.read_bytes()\n"
    "fh = open(path, 'rb'); read_preamble(fh, False); _read_file_meta_info(fh); start = fh.tell(); fh.close()\n"
    "body = zlib.decompress(raw[start:], -zlib.MAX_WBITS)\n"
    "empty = b'\\x09\\x00\\x02\\x10OB\\x00\\x00\\x00\\x00\\x00\\x00'\n"
    "assert body.count(empty) == 1\n"
    "value = b'\\x09\\x00\\x02\\x10OB\\x00\\x00\\xff\\xff\\xff\\xff' + b'private bytes ' * 20\n"
    "value += b'\\xfe\\xff\\xdd\\xe0' + bytes(4)\n"
    "c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)\n"
    "path.write_bytes(raw[:start] + c.compress(body.replace(empty, value)) + c.flush())\n"
)


@pytest.mark.parametrize(("before", "preamble"), [*((before, True) for before in BEFORE_ROWS), ("nothing", False)])
def test_a_deflated_dicom_declaring_a_huge_frame_is_refused_before_it_is_inflated(
    tmp_path: Path, before: str, preamble: bool
) -> None:
    # A file under 2 MB (Deflated Explicit VR Little Endian) whose frame is 14000 x 14000 at 16
    # bits: its header was checked only after pydicom had inflated the whole data set (and, once
    # a file opening with the DICM magic was read as if its preamble were there, in such a file).
    path = tmp_path / "bomb.dcm"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(__file__).resolve().parents[i]) for i in (1, 0))}
    make = (
        "import sys\n"
        "from pathlib import Path\n"
        "from helpers import make_dicom, ramp\n"
        "from pydicom import dcmread\n"
        "from pydicom.uid import DeflatedExplicitVRLittleEndian\n"
        "path = make_dicom(Path(sys.argv[1]), ramp(8, 8))\n"
        "ds = dcmread(path)\n"
        "ds.Rows = ds.Columns = 14000\n"
        "ds.PixelData = bytes(2 * 14000 * 14000)\n"
        + BEFORE_ROWS[before]
        + "ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian\n"
        "ds.save_as(path)\n"
        + (UNDEFINED_OB if before == "undefined OB" else "")
        + ("" if preamble else "path.write_bytes(path.read_bytes()[128:])\n")  # the DICM magic first
    )
    subprocess.run([sys.executable, "-c", make, str(path)], check=True, timeout=300, env=env)
    assert path.stat().st_size < 2_000_000
    read = (
        "import sys\n"
        "from cxrbatch.errors import ImageError\n"
        "from cxrbatch.imaging import load_image\n"
        "try:\n"
        "    load_image(sys.argv[1])\n"
        "except ImageError as exc:\n"
        "    print(exc)\n"
        "peak = next(line for line in open('/proc/self/status') if line.startswith('VmHWM'))\n"
        "print(int(peak.split()[1]) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", read, str(path)], capture_output=True, text=True, timeout=120, env=env)
    message, peak_mb = done.stdout.splitlines()
    assert message.startswith("image too large to decode safely")
    assert int(peak_mb) < 400, f"peak RSS {peak_mb} MB to refuse a {path.stat().st_size} byte file"


def test_a_deflated_dicom_with_a_long_header_decodes_as_its_plain_twin(tmp_path: Path) -> None:
    # the size check reads a deflated header as it inflates, stepping back where pydicom peeks
    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    plain = make_dicom(tmp_path / "plain.dcm", ramp(96, 80))
    ds = dcmread(plain)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    for i in range(300):  # a header well past the stream's first inflated chunks
        ds.add_new(0x00091010 + i, "LT", f"value {i}" * 40)
    ds.save_as(tmp_path / "deflated.dcm")
    assert np.array_equal(np.asarray(load_image(tmp_path / "deflated.dcm")), np.asarray(load_image(plain)))


def _deflated_with_undefined_obs(path: Path, n: int, size: int, stray: bytes = b"") -> Path:
    """A deflated DICOM declaring a 14000 x 14000 frame, with `n` private OB elements of undefined
    length (encapsulated form: one item of `size` zero bytes, then a sequence delimiter) before Rows."""
    from pydicom import dcmread
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    path = make_dicom(path, ramp(8, 8))
    ds = dcmread(path)
    ds.Rows = ds.Columns = 14000
    ds.PixelData = bytes(2 * 14000 * 14000)
    ds.add_new(0x00090010, "LO", "X")
    for i in range(n):
        ds.add_new(0x00091000 + i, "OB", b"")
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path)
    raw = path.read_bytes()
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        start = fh.tell()
    body = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
    tag = lambda i: (0x0009).to_bytes(2, "little") + (0x1000 + i).to_bytes(2, "little")  # noqa: E731
    at = body.index(tag(0) + b"OB" + bytes(6))
    parts = [body[:at]]
    for i in range(n):
        assert body[at : at + 12] == tag(i) + b"OB" + bytes(6)
        at += 12
        item = b"\xfe\xff\x00\xe0" + size.to_bytes(4, "little") + bytes(size)
        parts.append(tag(i) + b"OB\x00\x00\xff\xff\xff\xff" + item + stray + b"\xfe\xff\xdd\xe0" + bytes(4))
    parts.append(body[at:])
    c = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    path.write_bytes(raw[:start] + c.compress(b"".join(parts)) + c.flush())
    return path


@pytest.mark.parametrize(
    ("n", "size", "stray", "refused"),
    [(160, 200_000, b"", True), (40, 2_000_000, b"\x01\x02\x03\x04", False)],
)
def test_a_deflated_header_that_makes_pydicom_step_back_is_not_inflated_again_and_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, size: int, stray: bytes, refused: bool
) -> None:
    # Each undefined-length OB makes pydicom read ahead, then seek back to the value's start: the
    # stream inflated the data set again from its start every time (160 of them: 6.4 s). Values
    # under pydicom's defer_size now stay in what the stream keeps; values it cannot keep (2 MB
    # read back whole) make it give up after a few passes and leave the check to pydicom.
    from cxrbatch import dicom, dicom_streams

    path = _deflated_with_undefined_obs(tmp_path / "obs.dcm", n, size, stray)
    passes, start = [], dicom_streams.Inflating._restart
    monkeypatch.setattr(dicom_streams.Inflating, "_restart", lambda self: (passes.append(1), start(self))[1])
    if refused:
        with pytest.raises(ImageError, match="too large"):
            dicom._refuse_deflated_too_large(path)
        assert len(passes) == 1  # inflated once
    else:
        dicom._refuse_deflated_too_large(path)  # gave up: dcmread decides
        assert 1 < len(passes) <= 20


@pytest.mark.parametrize(
    ("where", "fault", "message"),
    [
        ("pydicom.dcmread", OSError(24, "Too many open files"), "Too many open files.*ulimit -n"),
        ("pydicom.dataset.Dataset.pixel_array", OSError(5, "Input/output error"), "Input/output error"),
    ],
)
def test_a_system_error_while_reading_a_dicom_film_is_not_called_an_unreadable_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str, fault: OSError, message: str
) -> None:
    # as for any other film (`ulimit -n`: pydicom opening the file or importing a pixel handler; a
    # failing disk): the row said "unreadable DICOM file (OSError)", a good film called damaged
    film = make_dicom(tmp_path / "fine.dcm", ramp())

    def failing(*args: object, **kwargs: object) -> None:
        raise fault

    monkeypatch.setattr(where, property(failing) if where.endswith("pixel_array") else failing)
    with pytest.raises(ImageError, match=message) as caught:
        load_image(film)
    assert "unreadable" not in str(caught.value) and "cannot be decoded" not in str(caught.value)
