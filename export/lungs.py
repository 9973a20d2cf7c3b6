"""The lung field: a small model that finds the box around both lungs, and the crop it gives.

Why: the classifier learnt what each collection's films look like around the lungs (borders,
markers, collimation, how tight the film is cut), and films from elsewhere fail on that. Cropped
to the lung field, films of every collection frame the same anatomy alike.

The box model knows no disease: it is trained on lung outlines only, from two sources listed in
`BOX_SOURCES` (read from local git mirrors, as `cxrbatch data build` reads them):
- JSRT's SCR lung masks (left and right lung, 247 films of one Japanese collection, adult);
- the ieee8023 lung boxes of GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset
  (COCO `annotations/annotations.json`, CC BY 4.0: figures and films of many hospitals).
Each film's target is the smallest box holding both lungs, in coordinates 0..1 of the film.

The model is the frozen ImageNet MobileNetV2 on the classifier's input (grey, 224 px,
equalised), its 7x7 feature map, and a small head (1x1 convolution, dense, 4 sigmoid outputs:
left, top, right, bottom). Training views move the film inside a random window (zoomed in down
to 75 % of a side, out to 140 %, padded black or mirrored) and degrade it as classifier training
does, so that a film framed as no box source frames it still gets a sensible box.

`crop_to_lungs` widens the box by a margin and cuts the decoded film to it; a box too small to be
both lungs leaves the film whole.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from PIL import Image

from cxrbatch.databuild.readers import GitFiles, find_git_dir
from cxrbatch.datasets import labelled_images, refuse_out_inside
from cxrbatch.errors import ImageError, UsageError
from cxrbatch.imaging import decode_bytes
from cxrbatch.modelinput import to_model_input

from .augment import degrade
from .cache import read_film
from .config import DEFAULTS

log = logging.getLogger(__name__)

SPEC = DEFAULTS["classifier"].input_spec()  # the box model sees what the classifier sees
JSRT = ("AnishHota/JSRT-Segmentation", "047d3193a744c4cd62b5dd1b217a6e9e63db8446")
IEEE8023 = (
    "GeneralBlockchain/covid-19-chest-xray-lung-bounding-boxes-dataset",
    "103688cbcdd1bada8900b9a9b17fafa45c7ea368",
)
BOX_SOURCES = {
    "jsrt": {
        "repo": JSRT[0],
        "commit": JSRT[1],
        "terms": "none stated in the repository; JSRT database and SCR lung masks (van Ginneken et al. 2006): "
        "research use",
    },
    "ieee8023": {
        "repo": IEEE8023[0],
        "commit": IEEE8023[1],
        "terms": "the repository and its lung boxes: CC BY 4.0; each image: its licence in metadata.csv "
        "(Apache 2.0, CC BY-NC-SA 4.0 or CC BY 4.0)",
    },
}
MARGIN = 0.10  # of the box's width and height, added on each side before cropping
MIN_BOX = 0.25  # a box narrower or shorter than this share of the film is not both lungs
BOX_MODEL = "cxrbatch_lungs"  # the name `lungs train` gives its model (`train` names its cxrbatch_<role>)


@dataclass(frozen=True)
class BoxFilm:
    """One film with its lung-field box (left, top, right, bottom; 0..1 of the film)."""

    source: str
    path: str
    group: str  # patient or film: films of one group fall in one split
    box: tuple[float, float, float, float]


def split_of(group: str) -> str:
    """train (80 %), val (10 %) or test (10 %), fixed by a hash of the group."""
    bucket = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) % 10
    return "test" if bucket == 9 else "val" if bucket == 8 else "train"


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """The box of a mask's set pixels in 0..1 coordinates; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    h, w = mask.shape
    return (xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h)


def jsrt_films(files: Any) -> list[BoxFilm]:
    """JSRT films whose left and right lung masks both exist, with the box of the two masks."""
    out = []
    for path in files.paths():
        if not (path.startswith("JSRT/jsrt_images/images/") and path.endswith(".IMG.png")):
            continue
        name = path.rsplit("/", 1)[1].removesuffix(".IMG.png")
        masks = [f"JSRT/masks/masks/{side}_lung_png/{name}.png" for side in ("left", "right")]
        try:
            both = np.maximum(*(np.asarray(decode_bytes(files.read(m)).convert("L")) > 127 for m in masks))
        except (KeyError, ImageError, OSError) as exc:
            log.warning("jsrt %s: no usable lung masks (%s)", name, exc)
            continue
        box = mask_box(both)
        if box is not None:
            out.append(BoxFilm("jsrt", path, f"jsrt:{name}", box))
    return out


def coco_films(annotations: dict[str, Any], present: set[str], source: str = "ieee8023") -> list[BoxFilm]:
    """Films of a COCO lung-box file that hold one box per lung and whose image is in `present`
    (as `images/<file_name>`); their target is the box around both."""
    boxes: dict[int, list[list[float]]] = {}
    for ann in annotations.get("annotations", []):
        boxes.setdefault(int(ann["image_id"]), []).append([float(v) for v in ann["bbox"]])
    out = []
    for image in annotations.get("images", []):
        path = f"images/{image['file_name']}"
        found = boxes.get(int(image["id"]), [])
        if path not in present or len(found) != 2:
            continue
        w, h = float(image["width"]), float(image["height"])
        left = min(b[0] for b in found) / w
        top = min(b[1] for b in found) / h
        right = max(b[0] + b[2] for b in found) / w
        bottom = max(b[1] + b[3] for b in found) / h
        box = tuple(float(np.clip(v, 0.0, 1.0)) for v in (left, top, right, bottom))
        if box[2] - box[0] > 0.05 and box[3] - box[1] > 0.05:
            patient = (image.get("metadata") or {}).get("patientid") or image["file_name"]
            out.append(BoxFilm(source, path, f"{source}:{patient}", box))  # type: ignore[arg-type]
    return out


def read_box_films(mirrors: Path, sources: dict[str, dict[str, str]]) -> tuple[list[BoxFilm], dict[str, Any]]:
    """Every box film of `sources` (`BOX_SOURCES`) from local mirrors, and a bytes reader per source."""
    films: list[BoxFilm] = []
    readers: dict[str, Any] = {}
    for source, entry in sources.items():
        git_dir = find_git_dir(mirrors, entry["repo"])
        if git_dir is None:
            raise UsageError(f"no mirror of {entry['repo']} in {mirrors} (the lung-box model needs it)")
        files = GitFiles(git_dir, entry["commit"])
        readers[source] = files
        if source == "jsrt":
            films += jsrt_films(files)
        else:
            annotations = json.loads(files.read("annotations/annotations.json"))
            films += coco_films(annotations, set(files.paths()), source)
    return films, readers


def framed_view(
    img: Image.Image, box: tuple[float, float, float, float], rng: np.random.Generator
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The film inside a random window (each side 0.75-1.4 of the film's, anywhere that keeps
    most of the lungs in view), padded black or mirrored, flipped at random; and the box in the
    window's coordinates, clipped to it."""
    w, h = img.size
    fw, fh = (float(rng.uniform(0.75, 1.4)) for _ in range(2))
    # The window's left edge (in film widths): the lungs' centre stays in the window's middle 60 %.
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    x0 = float(rng.uniform(cx - 0.8 * fw, cx - 0.2 * fw))
    y0 = float(rng.uniform(cy - 0.8 * fh, cy - 0.2 * fh))
    px0, py0 = round(x0 * w), round(y0 * h)
    pw, ph = max(8, round(fw * w)), max(8, round(fh * h))
    arr = np.asarray(img)
    pad = [(max(0, -py0), max(0, py0 + ph - h)), (max(0, -px0), max(0, px0 + pw - w))] + [(0, 0)] * (arr.ndim - 2)
    padded = np.pad(arr, pad, mode="symmetric") if rng.random() < 0.3 else np.pad(arr, pad)
    top, left = py0 + pad[0][0], px0 + pad[1][0]
    window = Image.fromarray(padded[top : top + ph, left : left + pw], mode=img.mode)
    new = [(box[0] - x0) / fw, (box[1] - y0) / fh, (box[2] - x0) / fw, (box[3] - y0) / fh]
    if rng.random() < 0.5:
        window = window.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        new = [1 - new[2], new[1], 1 - new[0], new[3]]
    clipped = tuple(float(np.clip(v, 0.0, 1.0)) for v in new)
    return degrade(window, rng), clipped  # type: ignore[return-value]


def build_box_model(base_weights: Path | None) -> tuple[keras.Model, keras.Model, keras.Model]:
    """The box model (pixels, 0..255 grey 224x224, in; the lung box left/top/right/bottom out) and
    its two parts sharing its layers: the frozen features (pixels to the 7x7 map) and the head."""
    inputs = keras.Input((SPEC.height, SPEC.width, 1), name="image")
    x = keras.layers.Concatenate(name="grey_to_rgb")([inputs, inputs, inputs])
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(x)
    base = keras.applications.MobileNetV2(input_shape=(SPEC.height, SPEC.width, 3), include_top=False, weights=None)
    if base_weights is not None:
        base.load_weights(str(base_weights))
    base.trainable = False
    maps = base(x)
    head = box_head()
    return keras.Model(inputs, head(maps), name=BOX_MODEL), keras.Model(inputs, maps), head


def box_head() -> keras.Model:
    """The trained part: the 7x7 feature map to the box."""
    maps = keras.Input((7, 7, 1280), name="features")
    x = keras.layers.Conv2D(32, 1, activation="relu", name="squeeze")(maps)
    x = keras.layers.Flatten(name="flat")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    x = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    return keras.Model(maps, keras.layers.Dense(4, activation="sigmoid", name="box")(x), name="box_head")


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of two arrays of boxes (N x 4, left/top/right/bottom)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.asarray(inter / np.maximum(area, 1e-9))


def train_box_model(
    mirrors: Path,
    base_weights: Path | None,
    views: int = 8,
    epochs: int = 80,
    seed: int = 1234,
    sources: dict[str, dict[str, str]] = BOX_SOURCES,
) -> tuple[keras.Model, dict[str, Any]]:
    """Fit the box head on cached feature maps of `views` views per training film (the film as
    it is, then framed ones); early stopping on val; the record holds test IoU per source."""
    keras.utils.set_random_seed(seed)
    films, readers = read_box_films(mirrors, sources)
    model, features, head = build_box_model(base_weights)
    rng = np.random.default_rng(seed)
    data: dict[str, tuple[np.ndarray, np.ndarray, list[BoxFilm]]] = {}
    skipped: list[str] = []
    for split in ("train", "val", "test"):
        chosen = [f for f in films if split_of(f.group) == split]
        n_views = views if split == "train" else 1
        x, y, kept = [], [], []
        for k, film in enumerate(chosen):
            try:
                img = decode_bytes(readers[film.source].read(film.path))
            except (OSError, ImageError) as exc:  # a snapshot leaves out its largest files
                log.warning("%s %s: skipped (%s)", film.source, film.path, exc)
                skipped.append(film.path)
                continue
            kept.append(film)
            film_views = [(img, film.box)] + [framed_view(img, film.box, rng) for _ in range(n_views - 1)]
            batch = np.stack([to_model_input(v, SPEC) for v, _ in film_views])
            x.append(np.asarray(features.predict_on_batch(batch)).astype(np.float16))
            y.append(np.asarray([b for _, b in film_views], dtype=np.float32))
            if k % 100 == 0:
                log.info("%s: features of %d/%d films", split, k, len(chosen))
        data[split] = (np.concatenate(x), np.concatenate(y), kept)
    for files in readers.values():
        files.close()
    head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mae")
    stop = keras.callbacks.EarlyStopping(patience=10, restore_best_weights=True)
    slow = keras.callbacks.ReduceLROnPlateau(factor=0.3, patience=4)
    x_train, y_train, _ = data["train"]
    history = head.fit(
        x_train.astype(np.float32), y_train, validation_data=data["val"][:2], epochs=epochs, batch_size=64,
        callbacks=[stop, slow], verbose=0,
    )  # fmt: skip
    record: dict[str, Any] = {
        "sources": sources, "views": views, "seed": seed, "epochs_run": len(history.history["loss"]),
        "films": {s: len(d[2]) for s, d in data.items()}, "skipped": skipped,
    }  # fmt: skip
    for split in ("val", "test"):
        feats, boxes, chosen = data[split]
        found = np.asarray(head.predict(feats.astype(np.float32), verbose=0))
        scores = iou(found, boxes)
        per_source = {}
        for source in sources:
            pick = np.asarray([f.source == source for f in chosen])
            if pick.any():
                per_source[source] = {
                    "films": int(pick.sum()), "mean_iou": round(float(scores[pick].mean()), 4),
                    "iou_below_0.7": int((scores[pick] < 0.7).sum()),
                }  # fmt: skip
        record[split] = {"mean_iou": round(float(scores.mean()), 4), "per_source": per_source}
    return model, record


def lung_box(model: keras.Model, images: list[Image.Image]) -> np.ndarray:
    """The box model's boxes (N x 4, 0..1) for decoded films."""
    batch = np.stack([to_model_input(img, SPEC) for img in images])
    return np.asarray(model.predict_on_batch(batch), dtype=np.float64)


def crop_box(size: tuple[int, int], box: np.ndarray, margin: float = MARGIN) -> tuple[int, int, int, int] | None:
    """The pixel rectangle to cut from a film of `size` (width, height): the box widened by
    `margin` of its size on each side, within the film; None when the box is too small or
    malformed to be both lungs (the film is then kept whole)."""
    left, top, right, bottom = (float(v) for v in box)
    bw, bh = right - left, bottom - top
    if not all(math.isfinite(v) for v in (left, top, right, bottom)) or bw < MIN_BOX or bh < MIN_BOX:
        return None
    w, h = size
    x0 = max(0, round((left - margin * bw) * w))
    y0 = max(0, round((top - margin * bh) * h))
    x1 = min(w, round((right + margin * bw) * w))
    y1 = min(h, round((bottom + margin * bh) * h))
    return (x0, y0, x1, y1)


def crop_to_lungs(img: Image.Image, box: np.ndarray, margin: float = MARGIN) -> Image.Image:
    """The film cut to its lung field (see `crop_box`), or the film itself."""
    rect = crop_box(img.size, box, margin)
    return img if rect is None else img.crop(rect)


def load_box_model(path: Path) -> keras.Model:
    """The box model `lungs train` saved; another file is the command's input mistake."""
    if not path.is_file():
        raise UsageError(f"box model not found: {path}")
    try:
        model = keras.models.load_model(path)
    except Exception as exc:  # Keras raises ValueError, OSError, zip errors for another kind of file
        raise UsageError(
            f"{path} is not a Keras model it can read ({type(exc).__name__}): give `lungs train`'s .keras"
        ) from None
    if model.name != BOX_MODEL:  # a classifier checkpoint has its input and four outputs: probabilities as boxes
        raise UsageError(
            f"{path} is the model {model.name}, not the box model {BOX_MODEL}: give `lungs train`'s .keras"
        )
    return model


def crop_tree(data_dir: Path, model: keras.Model, out: Path, longest: int = 512, batch: int = 16) -> dict[str, Any]:
    """A copy of a training tree (split/CLASS/files and MANIFEST.csv) with every film cut to its
    lung field and saved as PNG (at most `longest` px on its longer side; the classifier reads
    224), under the same ids (file stems, which MANIFEST.csv keys). `lung-boxes.csv` lists each
    film's box and whether it was cut."""
    if out.exists():
        raise UsageError(f"{out} exists: choose a new folder")
    refuse_out_inside(data_dir, out)
    if not (data_dir / "MANIFEST.csv").is_file():
        raise UsageError(f"{data_dir} has no MANIFEST.csv: the cut tree keeps each film's id and source")
    if tuple(model.output_shape)[-1:] != (4,):
        raise UsageError(f"the --model gives {model.output_shape[-1]} values per film, not a lung box's 4")
    paths = labelled_images(data_dir, "all").paths  # every split's image files, by the evaluation's rule
    targets = Counter((out / p.relative_to(data_dir)).with_suffix(".png") for p in paths)
    twice = sorted(str(t.relative_to(out)) for t, n in targets.items() if n > 1)
    if twice:
        raise UsageError(f"films of one name in one folder would be cut to one PNG: {', '.join(twice[:5])}")
    partial = out.with_name(f".{out.name}.partial")  # the folder takes its name only once it is whole
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        summary = _cut_all(data_dir, paths, model, partial, longest, batch)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(out)
    return summary


def _cut_all(
    data_dir: Path, paths: list[Path], model: keras.Model, out: Path, longest: int, batch: int
) -> dict[str, Any]:
    """`crop_tree`'s work, into the folder `out`."""
    shutil.copy2(data_dir / "MANIFEST.csv", out / "MANIFEST.csv")
    rows, kept_whole = [], 0
    for i in range(0, len(paths), batch):
        chunk = paths[i : i + batch]
        images = [read_film(p) for p in chunk]
        for path, img, box in zip(chunk, images, lung_box(model, images), strict=True):
            rect = crop_box(img.size, box)
            kept_whole += rect is None
            cut = img if rect is None else img.crop(rect)
            scale = longest / max(cut.size)
            if scale < 1:
                cut = cut.resize(
                    (max(1, round(cut.width * scale)), max(1, round(cut.height * scale))), Image.Resampling.BILINEAR
                )
            target = (out / path.relative_to(data_dir)).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            cut.save(target, format="PNG")
            rows.append([str(path.relative_to(data_dir)), *(f"{v:.4f}" for v in box), "no" if rect is None else "yes"])
        if i % (batch * 50) == 0:
            log.info("cut %d/%d films", i + len(chunk), len(paths))
    with open(out / "lung-boxes.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "left", "top", "right", "bottom", "cut"])
        writer.writerows(rows)
    return {"films": len(paths), "kept_whole": kept_whole}
