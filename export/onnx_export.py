"""Turn a trained checkpoint into the ONNX model the runtime runs, and check that it is the same model.

The exported graph takes float32 NHWC pixels in 0..255 (grey replicated and scaled inside), so
the runtime cannot get the scaling wrong. The classifier gets a second output, `cam`: the head's
weights applied at every position of the last feature map (per-class logit maps, NxhxwxK), from
which class-activation heatmaps follow without TensorFlow. Metadata goes into the ONNX
`metadata_props` under `cxrbatch`.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from cxrbatch.discovery import iter_images
from cxrbatch.imaging import InputSpec, load_image, to_model_input
from cxrbatch.models import SCHEMA, embed_metadata
from export.training import backbone_features, sidecar_path

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
OPSET = 17
REVIEW_THRESHOLD = 0.6  # classifier: a top probability below this marks the result for review


class ExportError(Exception):
    """The export failed one of its own checks."""


def export(ckpt: Path, out: Path, check_images: list[Path], version: str = "1.0.0") -> dict[str, Any]:
    """Convert `ckpt` to ONNX at `out`, embed its metadata, and verify it against Keras."""
    summary = json.loads(sidecar_path(ckpt).read_text(encoding="utf-8"))
    model = keras.models.load_model(ckpt, compile=False)
    spec = InputSpec(**summary["input"])
    graph_model, output_names = _with_outputs(model, summary["role"])
    signature = (tf.TensorSpec((None, spec.height, spec.width, spec.channels), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(graph_model, input_signature=signature, opset=OPSET)
    _rename_outputs(proto, output_names)
    meta = _metadata(summary, version, output_names)
    embed_metadata(proto, meta)
    proto.doc_string = f"cxrbatch {summary['role']} {version}"
    onnx.checker.check_model(proto, full_check=True)
    parity = check_parity(graph_model, proto, spec, check_images, output_names)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(out))
    log.info("exported %s: max |keras - onnx| = %.2e over %d images", out, parity["max_abs_diff"], parity["images"])
    return {"out": str(out), "metadata": meta, "parity": parity}


def _with_outputs(model: keras.Model, role: str) -> tuple[keras.Model, list[str]]:
    """Rebuild the inference graph from the trained layers; the classifier also outputs `cam`."""
    inputs = keras.Input(model.input.shape[1:], name="image")
    features = backbone_features(model, inputs)
    head = model.get_layer("head")
    scores = head(model.get_layer("dropout")(model.get_layer("pool")(features)))
    if role == "gate":
        return keras.Model(inputs, scores, name=model.name), ["scores"]
    kernel, bias = head.get_weights()
    cam_layer = keras.layers.Dense(kernel.shape[1], activation=None, name="cam")
    cam = cam_layer(features)
    cam_layer.set_weights([kernel, bias])
    return keras.Model(inputs, [scores, cam], name=model.name), ["scores", "cam"]


def _rename_outputs(proto: onnx.ModelProto, names: list[str]) -> None:
    graph = proto.graph
    for output, name in zip(graph.output, names, strict=True):
        old = output.name
        for node in graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name


def _metadata(summary: dict[str, Any], version: str, outputs: list[str]) -> dict[str, Any]:
    role = summary["role"]
    inp = dict(summary["input"], name="image", layout="NHWC", dtype="float32", value_range=[0, 255])
    inp["in_graph"] = "grey replicated to 3 channels where channels=1; x/127.5 - 1"
    meta: dict[str, Any] = {
        "schema": SCHEMA,
        "role": role,
        "name": f"cxrbatch-{role}-mobilenetv2-a{summary['config']['alpha']}-{summary['input']['height']}",
        "version": version,
        "input": inp,
        "labels": summary["labels"],
        "outputs": {"scores": "scores", **({"cam": "cam"} if "cam" in outputs else {})},
        "architecture": "MobileNetV2 (ImageNet init) + global average pooling + dropout + dense",
        "training": {k: summary[k] for k in ("config", "data", "history", "train_seconds", "base_weights")},
        "validation": summary.get("validation", {}),
        "exported": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "licence": (
            "trained by the cxrbatch project; the training images carry mixed terms (CC BY, CC BY-NC-SA, "
            "'research purposes only', none stated): research and screening-support use only; "
            "ImageNet init MIT/Apache-2.0. See models/README.md"
        ),
    }
    if role == "gate":
        meta["positive_label"] = summary["labels"][1]  # the sigmoid scores label index 1
        meta["threshold"] = summary.get("threshold", 0.5)
        meta["score_meaning"] = f"sigmoid probability of {meta['positive_label']}; accepted at or above threshold"
    else:
        meta["threshold"] = REVIEW_THRESHOLD
        meta["score_meaning"] = "softmax probabilities in label order; needs_review when the top one is below threshold"
    return meta


def check_parity(
    graph_model: keras.Model, proto: onnx.ModelProto, spec: InputSpec, images: list[Path], names: list[str]
) -> dict[str, Any]:
    """Compare Keras and onnxruntime on real images; raise ExportError beyond the tolerance."""
    import onnxruntime as ort

    if not images:
        raise ExportError("parity check needs at least one real image (--check-images)")
    batch = np.stack([to_model_input(load_image(p), spec) for p in images])
    expected = graph_model.predict(batch, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(names, {"image": batch})
    diffs = {n: float(np.max(np.abs(np.asarray(e) - g))) for n, e, g in zip(names, expected, got, strict=True)}
    # Probabilities are compared absolutely; the cam logit maps (magnitudes in the tens, summed
    # over 1280 channels in float32) relative to their largest value.
    scale = {n: 1.0 if n == "scores" else max(1.0, float(np.max(np.abs(g)))) for n, g in zip(names, got, strict=True)}
    spread = float(np.std(got[0], axis=0).max())
    if spread == 0.0 and len(images) > 1:
        raise ExportError("the model gives the same output for every check image: parity would prove nothing")
    worst = max(diffs[n] / scale[n] for n in names)
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(f"ONNX output differs from Keras by {worst:.2e} (> {PARITY_TOLERANCE:.0e}): {diffs}")
    return {
        "images": len(images),
        "max_abs_diff": diffs["scores"],
        "relative_diff": worst,
        "per_output": diffs,
        "score_spread": spread,
    }


def pick_check_images(folder: Path, limit: int = 32) -> list[Path]:
    """Take up to `limit` images spread evenly over a folder tree."""
    found = list(iter_images([folder]))
    if len(found) <= limit:
        return found
    step = len(found) / limit
    return [found[int(i * step)] for i in range(limit)]
