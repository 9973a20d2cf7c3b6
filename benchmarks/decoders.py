"""Which decoder is cheapest for the bench films, and does it give the same pixels?

Decodes every PNG and JPEG of a folder from bytes in memory (no disk in the timing), one thread,
with Pillow through cxrbatch's own readers (`cxrbatch.imaging`, JPEG at draft scale for a
224-px input) and with the other decoders that are importable: pyspng (libspng) for PNG, OpenCV
(`cv2.imdecode`, reduced-size decoding for JPEG). Every decoder's picture is brought to the
classifier's input (grey, 224 x 224, bilinear) and compared with Pillow's: PNG is lossless, so a
decoder is a candidate only at difference 0; reduced JPEG decoding differs by its scaled IDCT,
and the table shows by how much. Rates are images per second, best of `--repeats`, compared as
ratios to Pillow within the run. Decoders that are not installed are listed as missing.

    pip install pyspng opencv-python-headless   # optional: only what is installed is measured
    python -m benchmarks.decoders ../shared/data/bench --json benchmarks/results/decoders.json
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import numpy as np
from PIL import Image

from benchmarks import run_main
from benchmarks.harness import folder_args, folder_record, write_json
from cxrbatch.imaging import decode_bytes

SIDE = 224
Decoder = Callable[[bytes], np.ndarray]


def _grey(picture: np.ndarray) -> np.ndarray:
    """A decoded array (H x W, H x W x 3 or 4, 8 or 16 bit) as the 224-px grey input Pillow makes."""
    if picture.dtype != np.uint8:
        picture = (picture >> 8).astype(np.uint8)
    image = Image.fromarray(picture)
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    return np.asarray(image.convert("L").resize((SIDE, SIDE), Image.Resampling.BILINEAR))


def pillow_png(data: bytes) -> np.ndarray:
    return _grey(np.asarray(decode_bytes(data)))


def pillow_jpeg(data: bytes) -> np.ndarray:
    return _grey(np.asarray(decode_bytes(data, draft_size=SIDE)))


def decoders() -> tuple[dict[str, Decoder], dict[str, Decoder], list[str]]:
    png: dict[str, Decoder] = {"pillow": pillow_png}
    jpeg: dict[str, Decoder] = {"pillow (draft)": pillow_jpeg}
    missing = []
    try:
        import pyspng

        png["pyspng"] = lambda data: _grey(pyspng.load(data))
    except ImportError:
        missing.append("pyspng")
    try:
        import cv2

        cv2.setNumThreads(1)

        def cv_png(data: bytes) -> np.ndarray:
            picture = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if picture.ndim == 3:  # OpenCV orders channels BGR(A)
                picture = cv2.cvtColor(picture, cv2.COLOR_BGR2RGB if picture.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
            return _grey(picture)

        def cv_jpeg(data: bytes) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as header:  # reads the size only
                factor = max(1, min(header.size) // SIDE)
            flags = ((8, cv2.IMREAD_REDUCED_GRAYSCALE_8), (4, cv2.IMREAD_REDUCED_GRAYSCALE_4),
                     (2, cv2.IMREAD_REDUCED_GRAYSCALE_2), (1, cv2.IMREAD_GRAYSCALE))  # fmt: skip
            flag = next(f for k, f in flags if factor >= k)
            return _grey(cv2.imdecode(np.frombuffer(data, np.uint8), flag))

        png["opencv"] = cv_png
        jpeg["opencv (reduced)"] = cv_jpeg
    except ImportError:
        missing.append("opencv-python-headless")
    return png, jpeg, missing


def measure(files: list[bytes], named: dict[str, Decoder], repeats: int) -> dict[str, dict[str, float]]:
    """Rate and pixel difference of each decoder; the first one (Pillow) is the reference."""
    reference: list[np.ndarray] = []
    out: dict[str, dict[str, float]] = {}
    if not files:
        return out
    for name, decode in named.items():
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            pictures = [decode(data) for data in files]
            best = min(best, time.perf_counter() - start)
        reference = reference or pictures
        diffs = [np.abs(p.astype(int) - r.astype(int)) for p, r in zip(pictures, reference, strict=True)]
        out[name] = {
            "per_s": round(len(files) / best, 1),
            "max_abs_diff": int(max(int(d.max()) for d in diffs)) if diffs else 0,
            "mean_abs_diff": round(float(np.mean([d.mean() for d in diffs])), 3) if diffs else 0.0,
        }
    first = next(iter(out.values()))["per_s"]
    for row in out.values():
        row["ratio_to_pillow"] = round(row["per_s"] / first, 2)
    return out


def main() -> None:
    args = folder_args(__doc__)
    paths = sorted(p for p in args.folder.iterdir() if p.is_file())
    pngs = [p.read_bytes() for p in paths if p.suffix.lower() == ".png"]
    jpegs = [p.read_bytes() for p in paths if p.suffix.lower() in (".jpg", ".jpeg")]
    png, jpeg, missing = decoders()
    result = {
        **folder_record(args),
        "missing": missing,
        "png": {"images": len(pngs), "decoders": measure(pngs, png, args.repeats)},
        "jpeg": {"images": len(jpegs), "decoders": measure(jpegs, jpeg, args.repeats)},
    }
    print(f"{'format':<6} {'decoder':<18} {'images/s':>9} {'vs Pillow':>9} {'max |Δ|':>8} {'mean |Δ|':>9}")
    for kind in ("png", "jpeg"):
        for name, row in result[kind]["decoders"].items():
            print(
                f"{kind:<6} {name:<18} {row['per_s']:>9.1f} {row['ratio_to_pillow']:>9.2f} "
                f"{row['max_abs_diff']:>8} {row['mean_abs_diff']:>9.3f}"
            )
    if missing:
        print("not installed, not measured:", ", ".join(missing))
    write_json(args.json, result)


if __name__ == "__main__":
    run_main(main)
