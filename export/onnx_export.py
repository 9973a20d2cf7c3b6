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
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import keras
import numpy as np
import onnx
import tensorflow as tf
import tf2onnx

from cxrbatch.discovery import iter_images
from cxrbatch.errors import ExportError, UsageError
from cxrbatch.files import check_out
from cxrbatch.modelinput import InputSpec, to_model_input
from cxrbatch.models import embed_metadata, save_model
from cxrbatch.modelspec import ModelSpec

from .cache import read_film
from .config import sidecar_path
from .network import backbone_features

log = logging.getLogger(__name__)

PARITY_TOLERANCE = 1e-4
OPSET = 17
REVIEW_THRESHOLD = 0.6  # classifier: a top probability below this marks the result for review


def export(ckpt: Path, out: Path, check_images: list[Path], version: str = "1.0.0") -> dict[str, Any]:
    """Convert `ckpt` to ONNX at `out`, embed its metadata, and verify it against Keras."""
    summary = _read_sidecar(ckpt)
    check_out(out, ".onnx")
    try:
        model = keras.models.load_model(ckpt, compile=False)
    except Exception as exc:  # Keras raises ValueError, OSError and zip errors for a damaged file
        raise ExportError(f"{ckpt} is not a Keras checkpoint it can read ({type(exc).__name__})") from None
    spec = InputSpec(**summary["input"])
    shape = tuple(model.input.shape[1:])
    if shape != (spec.height, spec.width, spec.channels):
        raise ExportError(
            f"the sidecar {sidecar_path(ckpt).name} describes a {spec.height}x{spec.width}x{spec.channels} input, "
            f"the checkpoint takes {'x'.join(map(str, shape))}: export the sidecar `cxrbatch train` wrote with it"
        )
    scores = 1 if summary["role"] == "gate" else len(summary["labels"])  # the gate's sigmoid gives one
    if model.output.shape[-1] != scores:
        raise ExportError(
            f"the sidecar {sidecar_path(ckpt).name} describes a {summary['role']} of {scores} score(s) "
            f"({', '.join(summary['labels'])}), the checkpoint gives {model.output.shape[-1]}: export the sidecar "
            "`cxrbatch train` wrote with it"
        )
    batch = check_inputs(check_images, spec)  # a bad check image is named before the conversion, not after
    graph_model, output_names = _with_outputs(model, summary["role"])
    signature = (tf.TensorSpec((None, spec.height, spec.width, spec.channels), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(graph_model, input_signature=signature, opset=OPSET)
    _rename_outputs(proto, output_names)
    meta = model_spec(summary, version, output_names).to_metadata()
    ModelSpec.from_metadata(meta, str(out))  # the runtime must accept what is written
    embed_metadata(proto, meta)
    proto.doc_string = f"cxrbatch {summary['role']} {version}"
    onnx.checker.check_model(proto, full_check=True)
    parity = check_parity(graph_model, proto, batch, output_names)
    save_model(proto, meta, out)  # loaded as the runtime loads it before it takes out's place
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


def _read_sidecar(ckpt: Path) -> dict[str, Any]:
    if not ckpt.is_file():
        raise UsageError(f"Checkpoint not found: {ckpt}")
    sidecar = sidecar_path(ckpt)
    if not sidecar.is_file():
        raise ExportError(f"{ckpt} has no sidecar {sidecar.name}: export checkpoints made by `cxrbatch train`")
    try:
        summary = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read the sidecar {sidecar} ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("role", "input", "labels") if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ExportError(
            f"the sidecar {sidecar} lacks {', '.join(missing)}: export checkpoints made by `cxrbatch train`"
        )
    return dict(summary)


def model_spec(summary: dict[str, Any], version: str, outputs: list[str]) -> ModelSpec:
    """The metadata record of the exported model, from the checkpoint sidecar."""
    role, labels = summary["role"], tuple(summary["labels"])
    if role == "classifier" and summary.get("negative_label") not in labels:
        raise ExportError(
            f"the sidecar names no negative label among {list(labels)}: retrain with `cxrbatch train`, "
            'or add "negative_label" (the no-finding class) to the .keras.json file'
        )
    gate = role == "gate"
    positive = summary.get("positive_label") or labels[1]  # sidecars before the gate's label was named: index 1
    imagenet = bool(summary.get("base_weights"))
    init = "ImageNet" if imagenet else "random"
    in_graph = "grey replicated to 3 channels where channels=1; x/127.5 - 1"
    extra: dict[str, Any] = {
        "input": {"layout": "NHWC", "dtype": "float32", "value_range": [0, 255], "in_graph": in_graph},
        "architecture": f"MobileNetV2 ({init} init) + global average pooling + dropout + dense",
        "training": {
            **{k: summary[k] for k in ("config", "data", "history", "train_seconds", "base_weights")},
            "sources": summary.get("sources", []),  # [{"source", "label", "train"}]; older sidecars lack it
            **({"made_with": summary["made_with"]} if "made_with" in summary else {}),  # older sidecars lack it
        },
        "validation": summary.get("validation", {}),
        "exported": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "licence": (
            "trained by the cxrbatch project; the training images carry mixed terms (CC BY, CC BY-NC-SA, "
            "'research purposes only', none stated): research and screening-support use only"
            + ("; ImageNet init MIT/Apache-2.0" if imagenet else "")
            + ". See models/README.md"
        ),
        "score_meaning": f"sigmoid probability of {positive}; accepted at or above threshold"
        if gate
        else "softmax probabilities in label order; needs_review when the top one is below threshold",
    }
    return ModelSpec(
        role=role,
        name=f"cxrbatch-{role}-mobilenetv2-a{summary['config']['alpha']}-{summary['input']['height']}",
        version=version,
        input_name="image",
        input=InputSpec(**summary["input"]),
        labels=labels,
        score_output="scores",
        cam_output="cam" if "cam" in outputs else None,
        threshold=summary.get("threshold", 0.5) if gate else REVIEW_THRESHOLD,
        positive_label=positive if gate else None,
        negative_label=None if gate else summary["negative_label"],
        extra=extra,
    )


def check_inputs(images: list[Path], spec: InputSpec) -> np.ndarray:
    """The check images as the model's input; a file that cannot be read is named."""
    if not images:
        raise UsageError("the parity check needs at least one real image: give a folder of images the model will see")
    return np.stack([to_model_input(read_film(path, "check image"), spec) for path in images])


def check_parity(
    graph_model: keras.Model, proto: onnx.ModelProto, batch: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """Compare Keras and onnxruntime on real images (`check_inputs`); raise ExportError beyond the tolerance."""
    import onnxruntime as ort

    expected = graph_model.predict(batch, verbose=0)
    expected = expected if isinstance(expected, list) else [expected]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(names, {"image": batch})
    diffs = {n: float(np.max(np.abs(np.asarray(e) - g))) for n, e, g in zip(names, expected, got, strict=True)}
    # Probabilities are compared absolutely; the cam logit maps (magnitudes in the tens, summed
    # over 1280 channels in float32) relative to their largest value.
    scale = {n: 1.0 if n == "scores" else max(1.0, float(np.max(np.abs(g)))) for n, g in zip(names, got, strict=True)}
    spread = float(np.std(got[0], axis=0).max())
    if spread == 0.0 and len(batch) > 1:
        raise ExportError(
            "export check failed: the model gives the same output for every check image, parity would prove nothing"
        )
    worst = max(diffs[n] / scale[n] for n in names)
    if not worst <= PARITY_TOLERANCE:
        raise ExportError(
            f"export check failed: ONNX output differs from Keras by {worst:.2e} (> {PARITY_TOLERANCE:.0e}): {diffs}"
        )
    return {
        "images": len(batch),
        "max_abs_diff": diffs["scores"],
        "relative_diff": worst,
        "per_output": diffs,
        "score_spread": spread,
    }


def pick_check_images(folder: Path, limit: int = 32) -> list[Path]:
    """Take up to `limit` images spread evenly over a folder tree."""
    if not folder.is_dir():
        raise UsageError(f"Check images folder not found: {folder}")
    found = list(iter_images([folder]))
    if len(found) <= limit:
        return found
    step = len(found) / limit
    return [found[int(i * step)] for i in range(limit)]
