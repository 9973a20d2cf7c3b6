"""Give a classifier a `familiarity` output: how far a film's features lie from the training films'.

The pooled backbone features (the input of the classifier's dense head) of every training film
give a mean and a covariance, shrunk towards a multiple of the identity by the Ledoit-Wolf rule
(1280 features from a few thousand films: the raw covariance is nearly singular). The output is
the Mahalanobis distance sqrt((x - mean)' S^-1 (x - mean)) of a film's features, computed inside
the ONNX graph (a subtraction, one matrix product and a sum of squares after the pooling the
graph already does), so it costs the runtime almost nothing. The threshold above which a film is
`unfamiliar` is a percentile (99th by default) of the validation films' distances.

Only onnx and onnxruntime are needed (no TensorFlow): the output is added to an exported model.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from cxrbatch.datasets import load_split, read_manifest, without_sources
from cxrbatch.errors import ExportError
from cxrbatch.models import CPU, ModelSpec, embed_metadata, load_model
from cxrbatch.pipeline import Screener

log = logging.getLogger(__name__)

OUTPUT = "familiarity"
PERCENTILE = 99.0


def pooled_features_name(proto: onnx.ModelProto, score_output: str) -> str:
    """The tensor that feeds the dense head: scores = Softmax(Add(MatMul(features, W), b))."""
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers.get(score_output)
    for op in ("Softmax", "Add", "MatMul"):
        if node is None or node.op_type != op:
            raise ExportError(f"the classifier graph does not end in MatMul -> Add -> Softmax at {op}")
        if op == "MatMul":
            return str(node.input[0])
        node = producers.get(node.input[0])
    raise ExportError("unreachable")  # pragma: no cover


def features(proto: onnx.ModelProto, spec: ModelSpec, paths: list[Path], screener: Screener) -> np.ndarray:
    """The pooled features (N x D) of `paths`, decoded exactly as `cxrbatch run` decodes them."""
    name = pooled_features_name(proto, spec.score_output)
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=[CPU])
    out = []
    for batch in screener.decoded_batches(paths):
        unreadable = [d.path.name for d in batch if d.error is not None]
        if unreadable:
            raise ExportError(f"cannot read {unreadable} for the familiarity statistics")
        inputs = np.stack([d.classifier_input for d in batch])  # type: ignore[misc]
        out.append(session.run([name], {spec.input_name: inputs})[0])
    return np.concatenate(out).astype(np.float64)


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The Ledoit-Wolf shrunk covariance of the rows of `x` and the shrinkage it chose (0..1)."""
    n, d = x.shape
    centred = x - x.mean(axis=0)
    cov = centred.T @ centred / n
    mu = np.trace(cov) / d
    target = mu * np.eye(d)
    delta = np.sum((cov - target) ** 2) / d
    # sum_k ||x_k x_k' - cov||^2 = sum_k ||x_k||^4 - n ||cov||^2, since cov = sum_k x_k x_k' / n
    beta = (np.sum(np.sum(centred**2, axis=1) ** 2) - n * np.sum(cov**2)) / (n * n * d)
    shrinkage = float(min(1.0, beta / delta)) if delta > 0 else 1.0
    return (1 - shrinkage) * cov + shrinkage * target, shrinkage


def whitening(cov: np.ndarray) -> np.ndarray:
    """W with ||(x - mean) W||^2 the squared Mahalanobis distance: cov^(-1/2), symmetric."""
    values, vectors = np.linalg.eigh(cov)
    return (vectors / np.sqrt(values)) @ vectors.T


def distances(feats: np.ndarray, mean: np.ndarray, white: np.ndarray) -> np.ndarray:
    """The Mahalanobis distance of each row of `feats` (the same sum the graph computes)."""
    return np.sqrt((((feats - mean) @ white) ** 2).sum(axis=1))


def with_familiarity(proto: onnx.ModelProto, features_name: str, mean: np.ndarray, white: np.ndarray) -> None:
    """Append the `familiarity` output (N x 1) to the graph: || (features - mean) W ||."""
    graph = proto.graph
    graph.initializer.extend(
        [
            numpy_helper.from_array(mean.astype(np.float32)[None, :], "familiarity_mean"),
            numpy_helper.from_array(white.astype(np.float32), "familiarity_whitening"),
        ]
    )
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # the reduction's axes became an input in opset 18
        graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "familiarity_axes"))
        reduce = helper.make_node("ReduceSumSquare", ["familiarity_white", "familiarity_axes"], ["familiarity_squared"])
    else:
        reduce = helper.make_node("ReduceSumSquare", ["familiarity_white"], ["familiarity_squared"], axes=[1])
    graph.node.extend(
        [
            helper.make_node("Sub", [features_name, "familiarity_mean"], ["familiarity_centred"]),
            helper.make_node("MatMul", ["familiarity_centred", "familiarity_whitening"], ["familiarity_white"]),
            reduce,
            helper.make_node("Sqrt", ["familiarity_squared"], [OUTPUT]),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [None, 1]))


def add_familiarity(
    src: Path,
    dst: Path,
    data_dir: Path,
    gate: Path,
    percentile: float = PERCENTILE,
    exclude_sources: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Write `dst`: the classifier `src` with a familiarity output from `data_dir`'s train split and
    its threshold at `percentile` of the val split's distances; return the record it carries.
    `exclude_sources` leaves manifest sources out of both, as a leave-source-out model's training did."""
    proto = onnx.load(str(src))
    classifier = load_model(src, "classifier", [CPU])
    screener = Screener(load_model(gate, "gate", [CPU]), classifier, batch_size=32)
    spec = classifier.spec
    if spec.familiarity_output:
        raise ExportError(f"{src} already has a familiarity output; add it to the exported model, not to this one")
    manifest = read_manifest(data_dir)
    train = without_sources(load_split(data_dir, "train"), manifest, exclude_sources).paths
    val = without_sources(load_split(data_dir, "val"), manifest, exclude_sources).paths
    log.info("familiarity: features of %d train and %d val films", len(train), len(val))
    train_feats = features(proto, spec, train, screener)
    mean = train_feats.mean(axis=0)
    cov, shrinkage = ledoit_wolf(train_feats)
    white = whitening(cov)
    val_dist = distances(features(proto, spec, val, screener), mean, white)
    threshold = float(np.percentile(val_dist, percentile))
    with_familiarity(proto, pooled_features_name(proto, spec.score_output), mean, white)
    record = {
        "statistic": "Mahalanobis distance of the pooled backbone features to the train split's (Ledoit-Wolf)",
        "train_films": len(train),
        "shrinkage": round(shrinkage, 6),
        "threshold_rule": f"{percentile:g}th percentile of the distances of {len(val)} val films",
        "val_median": round(float(np.median(val_dist)), 4),
        "data": data_dir.name,
        "excluded_sources": list(exclude_sources),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    meta = spec.to_metadata()
    meta["outputs"][OUTPUT] = OUTPUT
    meta["familiarity_threshold"] = round(threshold, 6)
    meta["familiarity"] = record
    embed_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(dst))
    check = load_model(dst, "classifier", [CPU])  # the written model loads, and agrees with the numpy sum
    expected = distances(features(proto, spec, val[:4], screener), mean, white)
    if not np.allclose(_graph_distances(check, val[:4], screener), expected, rtol=1e-3, atol=1e-3):
        raise ExportError("the familiarity output of the graph differs from the statistics it was built from")
    return {**record, "threshold": meta["familiarity_threshold"]}


def _graph_distances(model: Any, paths: list[Path], screener: Screener) -> np.ndarray:
    out = []
    for batch in screener.decoded_batches(paths):
        inputs = np.stack([d.classifier_input for d in batch])  # type: ignore[misc]
        out.append(model.run(inputs)[OUTPUT][:, 0])
    return np.concatenate(out)
