"""The pooled backbone features of a classifier graph, and the graph pieces that read them.

The classifier ends in `scores = Softmax(Add(MatMul(features, W), b))`; `features` (N x D, the
pooled output of the backbone) is what the familiarity output (export/familiarity.py), the
bundled referral head (export/referral_head.py) and a site head (cxrbatch.sitehead) are computed
from. Each is added to the graph as an extra output with onnx alone, so the runtime pays a few
small matrix products for them. Only onnx and onnxruntime are needed here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from cxrbatch.datasets import Split, load_split, read_manifest, source_of, without_sources
from cxrbatch.errors import ModelError, UsageError
from cxrbatch.models import CPU, Model, load_model, model_from_bytes, save_model
from cxrbatch.modelspec import ModelSpec
from cxrbatch.pipeline import Screener

log = logging.getLogger(__name__)


def open_source(src: Path, gate: Path, what: str) -> tuple[onnx.ModelProto, Model, Screener]:
    """The exported classifier `src` that a graph tool adds `what` to (its graph, the model) and a
    screener with `gate`, which decodes films as `cxrbatch run` does. A file that is no classifier
    (or no gate), or a float16/int8 copy, is the command's input mistake (UsageError)."""
    try:
        classifier = load_model(src, "classifier", [CPU])
        screener = Screener(load_model(gate, "gate", [CPU]), classifier, batch_size=32)
    except ModelError as exc:
        raise UsageError(str(exc)) from None
    classifier.spec.refuse_reduced_precision(str(src), what)
    return onnx.load(str(src)), classifier, screener


def training_films(
    data_dir: Path, spec: ModelSpec, exclude: tuple[str, ...], what: str
) -> tuple[Split, Split, dict[str, dict[str, str]], tuple[str, ...]]:
    """The train and val splits of the classifier's training data that `what` learns from, the
    manifest, and the sources left out: `exclude` and every source of the manifest the model's own
    training left out (a leave-one-collection-out model must not learn its output from the
    collection it is checked on). Classes the classifier does not know, and an empty split, are refused."""
    manifest = read_manifest(data_dir)
    present = {name for row in manifest.values() for name in (source_of(row), row.get("source", ""))}
    inherited = [s for s in spec.trained_without() if s in present and s not in exclude]
    if inherited:
        log.info("left out as the model's training left them out: %s", ", ".join(inherited))
    unnamed = [s for s in spec.trained_without() if s not in present and s not in exclude]
    if unnamed:  # another tree may hold their films under other names (a repository, not the collection)
        log.warning(
            "the model's training left out %s, which %s does not name: if this is not the tree it was trained on, "
            "their films may be among those learnt from here",
            unnamed,
            data_dir / "MANIFEST.csv",
        )
    excluded = (*exclude, *inherited)
    train = without_sources(load_split(data_dir, "train"), manifest, excluded)
    val = without_sources(load_split(data_dir, "val", train.classes), manifest, excluded)
    foreign = sorted(set(train.classes) - set(spec.labels))
    if foreign:
        raise UsageError(
            f"{data_dir / 'train'} has class(es) {foreign} that the classifier does not know ({list(spec.labels)}): "
            f"{what} learns from the classifier's own training data"
        )
    for name, split in (("train", train), ("val", val)):
        if not len(split.paths):
            left_out = f" once {list(excluded)} are left out" if excluded else ""
            raise UsageError(f"{what} needs films in train/ and val/: {data_dir / name} has none{left_out}")
    return train, val, manifest, excluded


def pooled_features_name(proto: onnx.ModelProto, score_output: str) -> str:
    """The tensor that feeds the dense head: scores = Softmax(Add(MatMul(features, W), b))."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(score_output)
    for op in ("Softmax", "Add", "MatMul"):
        if node is None or node.op_type != op:
            raise ModelError(f"the classifier graph does not end in MatMul -> Add -> Softmax at {op}")
        if op == "MatMul":
            return str(node.input[0])
        node = producers.get(node.input[0])
    raise ModelError("unreachable")  # pragma: no cover


def with_features(classifier: Model, proto: onnx.ModelProto) -> Model:
    """`classifier` served from `proto` (its graph) with the pooled features as one more output,
    which `Model.run` fetches beside the scores: one pass gives a film's result and its features.
    It keeps the classifier's path, hash and device, since its scores are the classifier's."""
    name = pooled_features_name(proto, classifier.spec.score_output)
    providers = classifier.providers  # on the device the classifier was opened on (`calibrate --device`)
    served = model_from_bytes(_probe(proto, name), classifier.path, "classifier", providers, threads=1, announce=False)
    return Model(classifier.path, served.spec, served.session, classifier.sha256, features_output=name)


def features(proto: onnx.ModelProto, paths: list[Path], screener: Screener) -> np.ndarray:
    """The pooled features (N x D) of `paths` in the classifier graph `proto` (whose metadata may
    name outputs a graph tool has taken out), decoded exactly as `cxrbatch run` decodes them,
    whatever the gate would say of them."""
    name = pooled_features_name(proto, screener.classifier.spec.score_output)
    session = ort.InferenceSession(_probe(proto, name), providers=[CPU])
    input_name = session.get_inputs()[0].name
    out = []
    for batch in screener.decoded_batches(paths):
        unreadable = [d.path.name for d in batch if d.error is not None]
        if unreadable:
            raise ModelError(f"cannot read {unreadable} to compute their features")
        inputs = np.stack([d.classifier_input for d in batch])  # type: ignore[misc]
        out.append(session.run([name], {input_name: inputs})[0])
    return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 0))


def _probe(proto: onnx.ModelProto, name: str) -> bytes:
    """`proto` with the tensor `name` as one more graph output."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return probe.SerializeToString()


def unit_length(feats: np.ndarray) -> np.ndarray:
    """The rows of `feats` scaled to unit length, as the graph's `unit_length_nodes` do."""
    return feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)


def unit_length_nodes(proto: onnx.ModelProto, features_name: str, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes (and their constants, added to the graph) that scale `features_name` to unit length
    per row; returns the nodes and the name of their output, `<prefix>unit`."""
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1e-12], dtype=np.float32), prefix + "eps"))
    nodes = [
        sum_of_squares(proto, features_name, prefix + "squared", prefix),
        node("Sqrt", [prefix + "squared"], [prefix + "norm"]),
        node("Max", [prefix + "norm", prefix + "eps"], [prefix + "safe_norm"]),
        node("Div", [features_name, prefix + "safe_norm"], [prefix + "unit"]),
    ]
    return nodes, prefix + "unit"


def sum_of_squares(proto: onnx.ModelProto, name: str, out: str, prefix: str) -> onnx.NodeProto:
    """ReduceSumSquare over axis 1, keeping it: (N, d) -> (N, 1), in the graph's opset."""
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # the reduction's axes became an input in opset 18
        axes = prefix + "axes"
        if not any(t.name == axes for t in proto.graph.initializer):
            proto.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
        return node("ReduceSumSquare", [name, axes], [out])
    return node("ReduceSumSquare", [name], [out], axes=[1])


def node(op: str, inputs: list[str], outputs: list[str], **attributes: Any) -> onnx.NodeProto:
    """A node named after its first output (so tools that pick nodes by name, such as the int8
    quantizer's exclusion list, can find an added output's)."""
    return helper.make_node(op, inputs, outputs, name=outputs[0], **attributes)


def save_classifier(
    proto: onnx.ModelProto,
    meta: dict[str, Any],
    dst: Path,
    version: str | None = None,
    check: Callable[[Model], None] = lambda model: None,
) -> None:
    """Write `proto` to `dst` with the metadata record `meta` (and `version`, if given): the
    classifier a graph tool made, through `cxrbatch.models.save_model` (checked and loaded before
    it takes `dst`'s place; a full disk is a ReportError naming the file)."""
    if version:
        meta["version"] = version
    save_model(proto, meta, dst, check)
