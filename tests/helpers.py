"""Test helpers: tiny ONNX models with the real interface, and generated images.

The tiny models are made with `onnx.helper` so that the runtime tests need neither TensorFlow
nor the shipped models, and so that their answers are known in advance:

- gate: score = sigmoid(4 - 0.5 * mean|R - B|): grey pictures pass (score 0.982), colourful
  ones are rejected;
- classifier: logits = brightness * [-8, 0, 8, 16] + [4, 2, -2, -8] with brightness = mean/255
  of the grey input, so dark images are COVID19, mid-grey NORMAL, light PNEUMONIA and white
  TUBERCULOSIS; its `cam` output is the brightness map times the same weights.

Their metadata is written by `ModelSpec.to_metadata`, the one writer the exporter uses too.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import struct
import subprocess
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from cxrbatch.errors import ExtraMissing
from cxrbatch.modelinput import InputSpec
from cxrbatch.models import METADATA_KEY
from cxrbatch.modelspec import ModelSpec

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
LABELS = ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
TINY_SIDE = 32
# `cxrbatch train` options for a tiny run (small width, 32-px input, one epoch per phase, no
# pretrained weights): it checks the mechanism, not accuracy.
TINY_TRAINING = ["--size", "32", "--alpha", "0.35", "--views", "1", "--epochs1", "1", "--epochs2", "1"]


# what `half` raises where the export extra is not installed (pytest.raises' arguments)
WITHOUT_HALF = (ExtraMissing, r"the export extra \(onnxconverter_common not installed\)")


def has_module(name: str) -> bool:
    """Whether an optional package (one of an extra's) is installed."""
    return importlib.util.find_spec(name) is not None


def tiny_spec(role: str, threshold: float, **fields: object) -> ModelSpec:
    """The metadata of a tiny model: 32x32 input, RGB for the gate, grey for the classifier, which
    refers a film at 1 - P(NORMAL) >= 0.5 (mid-grey NORMALs are cleared, the rest referred)."""
    gate = role == "gate"
    return ModelSpec(
        role=role,
        name=f"tiny-{role}",
        version="0.0.1",
        input_name="image",
        input=InputSpec(TINY_SIDE, TINY_SIDE, 3 if gate else 1, "rgb" if gate else "grey", equalize=False),
        labels=("NOT_XRAY", "XRAY") if gate else tuple(LABELS),
        score_output="scores",
        cam_output=None if gate else "cam",
        threshold=threshold,
        positive_label="XRAY" if gate else None,
        negative_label=None if gate else "NORMAL",
        referral_threshold=None if gate else 0.5,
        extra={"input": {"layout": "NHWC"}},
        **fields,  # type: ignore[arg-type]
    )


def _save(graph: onnx.GraphProto, path: Path, spec: ModelSpec) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(spec.to_metadata()))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_gate(path: Path, threshold: float = 0.5) -> Path:
    """Write the tiny gate: grey pictures pass, colourful ones are rejected."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 3])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 1])
    inits = [
        numpy_helper.from_array(np.array([0], dtype=np.int64), "i0"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "i1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "i2"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "i3"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "axis3"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes123"),
        numpy_helper.from_array(np.array(-0.5, dtype=np.float32), "slope"),
        numpy_helper.from_array(np.array(4.0, dtype=np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("Slice", ["image", "i0", "i1", "axis3"], ["red"]),
        helper.make_node("Slice", ["image", "i2", "i3", "axis3"], ["blue"]),
        helper.make_node("Sub", ["red", "blue"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["absdiff"]),
        helper.make_node("ReduceMean", ["absdiff", "axes123"], ["colourfulness"], keepdims=0),
        helper.make_node("Mul", ["colourfulness", "slope"], ["scaled"]),
        helper.make_node("Add", ["scaled", "bias"], ["logit"]),
        helper.make_node("Unsqueeze", ["logit", "i1"], ["logit2"]),
        helper.make_node("Sigmoid", ["logit2"], ["scores"]),
    ]
    graph = helper.make_graph(nodes, "tiny_gate", [image], [scores], inits)
    return _save(graph, path, tiny_spec("gate", threshold))


def make_classifier(path: Path, review_threshold: float = 0.6) -> Path:
    """Write the tiny classifier: brightness decides the label."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 1])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 4])
    inits = [
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes123"),
        numpy_helper.from_array(np.array([[-8.0, 0.0, 8.0, 16.0]], dtype=np.float32), "w"),
        numpy_helper.from_array(np.array([4.0, 2.0, -2.0, -8.0], dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([-8.0, 0.0, 8.0, 16.0], dtype=np.float32), "w4"),
    ]
    nodes = [
        helper.make_node("Mul", ["image", "inv255"], ["unit"]),
        helper.make_node("ReduceMean", ["unit", "axes123"], ["brightness"], keepdims=0),
        helper.make_node("Unsqueeze", ["brightness", "one"], ["b2"]),
        helper.make_node("Constant", [], ["one"], value=numpy_helper.from_array(np.array([1], dtype=np.int64))),
        helper.make_node("MatMul", ["b2", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        helper.make_node("Mul", ["unit", "w4"], ["cam"]),
    ]
    nodes.insert(0, nodes.pop(3))  # the Constant first, for a topologically sorted graph
    graph = helper.make_graph(nodes, "tiny_classifier", [image], [scores, cam], inits)
    return _save(graph, path, tiny_spec("classifier", review_threshold))


def make_halves_classifier(path: Path) -> Path:
    """A tiny classifier whose pooled features are two: the brightness of the top and of the bottom
    half of the film (so a film's features have a direction), and whose head is the tiny one's."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 1])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 4])
    half = TINY_SIDE // 2
    inits = [
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes123"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([[-4.0, 0.0, 4.0, 8.0]] * 2, dtype=np.float32), "w"),
        numpy_helper.from_array(np.array([4.0, 2.0, -2.0, -8.0], dtype=np.float32), "b"),
        numpy_helper.from_array(np.array([-8.0, 0.0, 8.0, 16.0], dtype=np.float32), "w4"),
    ]
    nodes = [helper.make_node("Mul", ["image", "inv255"], ["unit"])]
    for i, name in enumerate(("top", "bottom")):
        nodes += [
            helper.make_node("Slice", ["unit", f"{name}_start", f"{name}_end", "axis1"], [f"{name}_rows"]),
            helper.make_node("ReduceMean", [f"{name}_rows", "axes123"], [name], keepdims=1),
        ]
        inits += [
            numpy_helper.from_array(np.array([[0, half][i]], dtype=np.int64), f"{name}_start"),
            numpy_helper.from_array(np.array([[half, TINY_SIDE][i]], dtype=np.int64), f"{name}_end"),
        ]
    nodes += [
        helper.make_node("Concat", ["top", "bottom"], ["halves"], axis=3),
        helper.make_node("Flatten", ["halves"], ["features"], axis=1),
        helper.make_node("MatMul", ["features", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        helper.make_node("Mul", ["unit", "w4"], ["cam"]),
    ]
    graph = helper.make_graph(nodes, "halves_classifier", [image], [scores, cam], inits)
    return _save(graph, path, tiny_spec("classifier", 0.6))


def halves_image(path: Path, top: int, bottom: int, size: int = 64, mark: int | None = None) -> Path:
    """A grey film whose top half is one level and bottom half another; with `mark`, its last
    pixel is set to that value, so that films of one level are still different films."""
    pixels = np.full((size, size), bottom, dtype=np.uint8)
    pixels[: size // 2] = top
    if mark is not None:
        pixels[-1, -1] = mark % 256
    Image.fromarray(pixels, mode="L").save(path)
    return path


def halves_tree(root: Path, flat: int = 30) -> Path:
    """Training data whose films are flat greys (top and bottom alike), of many levels."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for label, (low, high) in (("NORMAL", (90, 120)), ("PNEUMONIA", (140, 170))):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i, level in enumerate(rng.uniform(low, high, flat)):
                halves_image(folder / f"{label}{i}.png", int(level), int(level) + int(rng.integers(-4, 5)))
    return root


def halves_models(root: Path, gate: Path) -> Path:
    """A models folder with `gate` and the halves classifier, given a knn familiarity output from
    `halves_tree` (flat films: a film whose halves differ is unfamiliar). Needs onnx."""
    from cxrbatch.extras import export_module

    models = root / "halves-models"
    models.mkdir()
    (models / "gate.onnx").write_bytes(gate.read_bytes())
    plain = make_halves_classifier(root / "halves-plain.onnx")
    data = halves_tree(root / "halves-data")
    export_module("familiarity").add_familiarity(plain, models / "classifier.onnx", data, gate)
    return models


def halves_site(root: Path, per_side: int = 40) -> Path:
    """A site the halves classifier ranks badly: its score follows a film's mean brightness, and
    here abnormal films (top half darker than the bottom) are as bright on average as normal (flat) ones."""
    rng = np.random.default_rng(11)
    for label in ("NORMAL", "ABNORMAL"):
        (root / label).mkdir(parents=True)
        for i, level in enumerate(rng.uniform(90, 170, per_side)):
            gap = 0 if label == "NORMAL" else int(rng.integers(30, 50))
            top, bottom = int(level) - gap // 2, int(level) + gap // 2
            halves_image(root / label / f"{label.lower()}{i:02d}.png", top, bottom, mark=i)
    return root


def make_region_classifier(path: Path) -> Path:
    """A classifier whose head singles out image regions: class k's map is the picture times a mask.

    COVID19 looks only at the top-left quadrant, NORMAL at the bottom-right, PNEUMONIA and
    TUBERCULOSIS at nothing; scores are the softmax of the masked means.
    """
    masks = np.zeros((TINY_SIDE, TINY_SIDE, 4), dtype=np.float32)
    half = TINY_SIDE // 2
    masks[:half, :half, 0] = 4.0
    masks[half:, half:, 1] = 1.0
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 1])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    cam = helper.make_tensor_value_info("cam", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 4])
    inits = [
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        numpy_helper.from_array(masks, "masks"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "axes12"),
    ]
    nodes = [
        helper.make_node("Mul", ["image", "inv255"], ["unit"]),
        helper.make_node("Mul", ["unit", "masks"], ["cam"]),
        helper.make_node("ReduceMean", ["cam", "axes12"], ["logits"], keepdims=0),
        helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
    ]
    graph = helper.make_graph(nodes, "region_classifier", [image], [scores, cam], inits)
    return _save(graph, path, tiny_spec("classifier", 0.6))


def make_constant_classifier(path: Path, probs: list[float], familiarity: float, **fields: object) -> Path:
    """A classifier that gives every film the same float32 probabilities and familiarity distance
    (`fields`: thresholds of its metadata), for scores placed exactly against a threshold."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, TINY_SIDE, TINY_SIDE, 1])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 4])
    distance = helper.make_tensor_value_info("familiarity", TensorProto.FLOAT, [None, 1])
    inits = [
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes123"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
        numpy_helper.from_array(np.array([probs], dtype=np.float32), "probs"),
        numpy_helper.from_array(np.array([[familiarity]], dtype=np.float32), "distance"),
    ]
    nodes = [  # 0 * the film's mean + the constant: the constant exactly, one row per film
        helper.make_node("ReduceMean", ["image", "axes123"], ["mean"], keepdims=0),
        helper.make_node("Unsqueeze", ["mean", "one"], ["mean2"]),
        helper.make_node("Mul", ["mean2", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "probs"], ["scores"]),
        helper.make_node("Add", ["nothing", "distance"], ["familiarity"]),
    ]
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "one"))
    graph = helper.make_graph(nodes, "constant_classifier", [image], [scores, distance], inits)
    spec = replace(tiny_spec("classifier", 0.6), cam_output=None, familiarity_output="familiarity", **fields)
    return _save(graph, path, spec)


def grey_image(path: Path, level: int, size: int = 64) -> Path:
    """Save a flat grey picture of the given level (the tiny classifier labels it by level)."""
    rng = np.random.default_rng(level)
    arr = np.clip(level + rng.integers(-3, 4, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, mode="L").save(path)
    return path


def colour_image(path: Path, size: int = 64) -> Path:
    """Save a vivid red/blue picture that the tiny gate rejects."""
    arr = np.zeros((size, size, 3), dtype=np.uint8)
    arr[..., 0] = 230
    arr[..., 2] = 20
    Image.fromarray(arr, mode="RGB").save(path)
    return path


def blob_image(path: Path, rng: np.random.Generator, bright: bool, colour: bool) -> None:
    """Save a textured blob, dark or bright, grey or colourful: easy classes for a tiny training."""
    side = int(rng.integers(40, 80))
    base = rng.normal(190 if bright else 60, 25, (side, side))
    xx = np.mgrid[:side, :side][1]
    base += 40 * np.sin(xx / rng.uniform(3, 9)) * (1 if bright else -1)
    grey = np.clip(base, 0, 255).astype(np.uint8)
    if colour:
        rgb = np.stack([grey, np.roll(grey, 7, axis=1) // 3, 255 - grey], axis=-1)
        Image.fromarray(rgb.astype(np.uint8), mode="RGB").save(path)
    else:
        Image.fromarray(grey, mode="L").save(path)


def blob_dataset(
    root: Path, classes: dict[str, tuple[bool, bool]], per_class: int = 12, split_ids: bool = False
) -> Path:
    """Write a train/ val/ test/ <CLASS>/ tree of blobs; `classes` maps a name to (bright, colour).

    Films are named `<CLASS>_<i>` alike in every split, or `<split>-<CLASS>_<i>` with `split_ids`
    (a tree with a MANIFEST.csv, whose ids are file stems, needs each stem once)."""
    rng = np.random.default_rng(7)
    for split in ("train", "val", "test"):
        for name, (bright, colour) in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                blob_image(folder / f"{split + '-' if split_ids else ''}{name}_{i}.png", rng, bright, colour)
    return root


def shared_available() -> bool:
    """Tell whether the ../shared data is beside the checkout (CI has it, a user's machine may not)."""
    return (SHARED / "data").is_dir()


needs_shared = pytest.mark.skipif(not shared_available(), reason="../shared/data is not beside this checkout")


NON_UTF8 = os.fsdecode(b"scan-\xff\xfe.png")


def jpeg_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bytes(size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (size, size), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def bomb_png(side: int = 30000) -> bytes:
    """A tiny PNG whose header claims side x side pixels (900 megapixels)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    )


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def make_repo(root: Path, name: str, files: dict[str, bytes]) -> str:
    """A git repository MIRRORS/owner+name/repo with `files` committed; returns the commit."""
    work = root / name.replace("/", "+") / "repo"
    work.mkdir(parents=True)
    for path, data in files.items():
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_bytes(data)
    git = ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "files"], check=True)
    return subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()


def film(seed: int, size: tuple[int, int] = (80, 64)) -> Image.Image:
    """A smooth grey picture, different for every seed (not binarised, distinct dHashes)."""
    coarse = np.random.default_rng(seed).integers(40, 215, size=(6, 5), dtype=np.uint8)
    return Image.fromarray(coarse, "L").resize(size, Image.Resampling.BILINEAR)


def entry(repo: str, commit: str, rules: str, licence: str = "CC BY 4.0") -> str:
    return f'[[source]]\nrepo = "{repo}"\ncommit = "{commit}"\nlicence = "{licence}"\nage_group = "adult"\n{rules}\n'


def rule(glob: str, label: str, collection: str, patient: str = "") -> str:
    line = f'[[source.files]]\nglob = "{glob}"\nlabel = "{label}"\ncollection = "{collection}"\n'
    return line + (f"patient = '{patient}'\n" if patient else "")


def manifest_rows(out: Path) -> list[dict[str, str]]:
    with (out / "MANIFEST.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def skipped_rows(out: Path) -> list[dict[str, str]]:
    with (out / "SKIPPED.csv").open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


# Header values no report or log may ever hold (the DICOM tests look for them).
PATIENT = "Doe^Jane"
PATIENT_ID = "SECRET-12345"


def make_dicom(
    path: Path,
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    syntax: str | None = None,
    **attrs: object,
) -> Path:
    """Write a minimal secondary-capture DICOM file with the given pixels and attributes
    (explicit VR little endian unless `syntax` names another; a compressed one holds no real
    frame). Needs the dicom extra: a test calling it skips without pydicom first."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    syntax = syntax or ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.Modality = "DX"
    if pixels is not None:
        frames = pixels.shape[0] if pixels.ndim == 3 else 1
        rows, cols = pixels.shape[-2:]
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if frames > 1:
            ds.NumberOfFrames = frames
        if syntax == ExplicitVRLittleEndian:
            ds.PixelData = pixels.astype(np.uint16).tobytes()
        else:
            ds.PixelData = encapsulate([b"\x00\x01not-really-jpeg2000" * 4])
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def ramp(rows: int = 64, cols: int = 64, lo: int = 1000, hi: int = 3000) -> np.ndarray:
    """A 16-bit grey ramp from `lo` to `hi`, row by row."""
    return np.linspace(lo, hi, rows * cols).reshape(rows, cols).astype(np.uint16)
