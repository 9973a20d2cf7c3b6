"""Give a classifier a `familiarity` output: how far a film's features lie from the training films'.

Two statistics of the pooled backbone features (the input of the classifier's dense head), each
computed inside the ONNX graph after the pooling the graph already does, so they cost the runtime
almost nothing:
- `knn` (the default): 1 - the cosine similarity of a film's features to its k-th most similar
  training film's (k = 10). The graph holds every training film's unit-length features (float16)
  and does one matrix product and a top-k. A film of a collection the model never saw is far from
  every training film even where it lies inside the spread of all of them together
  (benchmarks/familiarity_loco.py, models/README.md).
- `mahalanobis`: sqrt((x - mean)' S^-1 (x - mean)) to the training films' mean, with their
  covariance shrunk towards a multiple of the identity by the Ledoit-Wolf rule (1280 features
  from a few thousand films: the raw covariance is nearly singular). It flags what is unlike
  chest films as a whole (photos, drawings), not a new hospital's films.
The threshold above which a film is `unfamiliar` is a percentile (99th by default) of the
validation films' values.

Only onnx and onnxruntime are needed (no TensorFlow): the output is added to an exported model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from cxrbatch.errors import ExportError, UsageError
from cxrbatch.features import (
    features,
    node,
    open_source,
    pooled_features_name,
    save_classifier,
    sum_of_squares,
    training_films,
    unit_length,
    unit_length_nodes,
)
from cxrbatch.files import check_out
from cxrbatch.pipeline import Screener
from cxrbatch.records import DECIMALS

log = logging.getLogger(__name__)

OUTPUT = "familiarity"
PERCENTILE = 99.0
STATISTICS = ("knn", "mahalanobis")
NEIGHBOUR = 10  # knn: the k-th most similar training film
PREFIX = "familiarity_"  # every node output and initializer the familiarity output adds


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
    """Append the Mahalanobis `familiarity` output (N x 1) to the graph: || (features - mean) W ||."""
    proto.graph.initializer.extend(
        [
            numpy_helper.from_array(mean.astype(np.float32)[None, :], PREFIX + "mean"),
            numpy_helper.from_array(white.astype(np.float32), PREFIX + "whitening"),
        ]
    )
    proto.graph.node.extend(
        [
            node("Sub", [features_name, PREFIX + "mean"], [PREFIX + "centred"]),
            node("MatMul", [PREFIX + "centred", PREFIX + "whitening"], [PREFIX + "white"]),
            sum_of_squares(proto, PREFIX + "white", PREFIX + "squared", PREFIX),
            node("Sqrt", [PREFIX + "squared"], [OUTPUT]),
        ]
    )
    proto.graph.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [None, 1]))


def unit_bank(train_feats: np.ndarray) -> np.ndarray:
    """The training films' features scaled to unit length, as float16: what the knn graph holds."""
    return unit_length(train_feats).astype(np.float16)


def knn_distances(feats: np.ndarray, bank: np.ndarray, k: int = NEIGHBOUR) -> np.ndarray:
    """1 - the cosine similarity of each row of `feats` to its k-th most similar row of `bank`."""
    unit = unit_length(feats)
    table = bank.astype(np.float64).T
    return np.concatenate([1 - np.sort(unit[i : i + 256] @ table, axis=1)[:, -k] for i in range(0, len(unit), 256)])


def with_knn_familiarity(proto: onnx.ModelProto, features_name: str, bank: np.ndarray, k: int = NEIGHBOUR) -> None:
    """Append the knn `familiarity` output (N x 1): 1 - the k-th largest of (features / |features|) . bank'."""
    graph = proto.graph
    unit_nodes, unit = unit_length_nodes(proto, features_name, PREFIX)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.ascontiguousarray(bank.T), PREFIX + "bank"),  # d x films, float16
            numpy_helper.from_array(np.array([1.0], dtype=np.float32), PREFIX + "one"),
            numpy_helper.from_array(np.array([k], dtype=np.int64), PREFIX + "k"),
            numpy_helper.from_array(np.array([k - 1], dtype=np.int64), PREFIX + "kth"),
        ]
    )
    graph.node.extend(
        [
            *unit_nodes,
            node("Cast", [PREFIX + "bank"], [PREFIX + "bank32"], to=onnx.TensorProto.FLOAT),
            node("MatMul", [unit, PREFIX + "bank32"], [PREFIX + "similarity"]),
            node("TopK", [PREFIX + "similarity", PREFIX + "k"], [PREFIX + "top", PREFIX + "top_index"], axis=1),
            node("Gather", [PREFIX + "top", PREFIX + "kth"], [PREFIX + "kth_similarity"], axis=1),
            node("Sub", [PREFIX + "one", PREFIX + "kth_similarity"], [OUTPUT]),
        ]
    )
    graph.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [None, 1]))


@dataclass
class Detached:
    """A familiarity output taken out of a graph: its nodes, initializers and graph output."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    output: onnx.ValueInfoProto


def detach_familiarity(proto: onnx.ModelProto) -> Detached:
    """Take the familiarity output out of the graph (its nodes, initializers, graph output, and any
    graph input or value info of its tensors) and return it, so that another can replace it or the
    rest of the graph can be converted without it."""
    graph = proto.graph
    ours = {o for n in graph.node for o in n.output if _is_ours(o)}
    mine = [n for n in graph.node if set(n.output) <= ours]
    nodes = [n for n in graph.node if not set(n.output) <= ours]
    if {i for n in nodes for i in n.input} & ours:
        raise ExportError("the graph uses the familiarity output's tensors elsewhere; it cannot be taken out")
    output = next((o for o in graph.output if o.name == OUTPUT), None)
    if output is None:
        raise ExportError("the graph has no familiarity output")
    initializers = [t for t in graph.initializer if _is_ours(t.name)]
    detached = Detached([_copy(n) for n in mine], [_copy(t) for t in initializers], _copy(output))
    _keep(graph.node, nodes)
    _keep(graph.initializer, [t for t in graph.initializer if not _is_ours(t.name)])
    _keep(graph.output, [o for o in graph.output if o.name != OUTPUT])
    _keep(graph.input, [i for i in graph.input if not _is_ours(i.name)])
    _keep(graph.value_info, [v for v in graph.value_info if v.name not in ours])
    return detached


def attach_familiarity(proto: onnx.ModelProto, detached: Detached, features_name: str, cast: bool = False) -> None:
    """Put a detached familiarity output back, reading `features_name`; with `cast`, through a Cast
    to float32 (the features of a float16 copy), so that the output is computed as before."""
    graph = proto.graph
    nodes = [_copy(n) for n in detached.nodes]
    if cast:
        features32 = PREFIX + "features32"
        for n in nodes:
            n.input[:] = [features32 if name == features_name else name for name in n.input]
        nodes.insert(0, node("Cast", [features_name], [features32], to=onnx.TensorProto.FLOAT))
    graph.node.extend(nodes)
    graph.initializer.extend(detached.initializers)
    graph.output.append(detached.output)


def remove_familiarity(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Take the familiarity output out of the graph and out of its metadata record (its output,
    threshold and record, as `add_familiarity` writes them)."""
    detach_familiarity(proto)
    del meta["outputs"][OUTPUT]
    for key in ("familiarity_threshold", "familiarity"):
        meta.pop(key, None)


def _is_ours(name: str) -> bool:
    """Whether a tensor is the familiarity output or one of the tensors it adds."""
    return name == OUTPUT or name.startswith(PREFIX)


def _copy(message: Any) -> Any:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _keep(field: Any, items: list[Any]) -> None:
    kept = [_copy(item) for item in items]
    del field[:]
    field.extend(kept)


def add_familiarity(
    src: Path,
    dst: Path,
    data_dir: Path,
    gate: Path,
    percentile: float = PERCENTILE,
    exclude_sources: tuple[str, ...] = (),
    statistic: str = "knn",
    replace: bool = False,
    version: str | None = None,
) -> dict[str, Any]:
    """Write `dst`: the classifier `src` with a familiarity output (`statistic`, one of STATISTICS)
    from `data_dir`'s train split and its threshold at `percentile` of the val split's values;
    return the record it carries. `exclude_sources` leaves manifest sources out of both, as a
    leave-source-out model's training did. `replace` swaps an existing familiarity output for the
    new one (the rest of the graph and its metadata unchanged); `version` sets the model's version."""
    if statistic not in STATISTICS:
        raise UsageError(f"unknown familiarity statistic {statistic!r} (choose from {', '.join(STATISTICS)})")
    check_out(dst, ".onnx", "DST")
    proto, classifier, screener = open_source(src, gate, "a familiarity output")
    spec = classifier.spec
    if spec.familiarity_output:
        if not replace:
            raise UsageError(f"{src} already has a familiarity output: add it to the exported model, or give --replace")
        detach_familiarity(proto)
    train_split, val_split, _, exclude_sources = training_films(data_dir, spec, exclude_sources, "a familiarity output")
    train, val = train_split.paths, val_split.paths
    if statistic == "knn" and len(train) < NEIGHBOUR:
        raise UsageError(f"the knn statistic needs at least {NEIGHBOUR} train films, found {len(train)}")
    log.info("familiarity: features of %d train and %d val films", len(train), len(val))
    train_feats = features(proto, train, screener)
    features_name = pooled_features_name(proto, spec.score_output)
    record: dict[str, Any]
    if statistic == "knn":
        bank = unit_bank(train_feats)
        measure = lambda feats: knn_distances(feats, bank)  # noqa: E731
        with_knn_familiarity(proto, features_name, bank)
        record = {
            "statistic": f"1 - cosine similarity of the pooled backbone features to the {NEIGHBOUR}th most "
            "similar train film's (the graph holds every train film's unit features as float16)",
            "neighbour": NEIGHBOUR,
        }
    else:
        mean = train_feats.mean(axis=0)
        cov, shrinkage = ledoit_wolf(train_feats)
        white = whitening(cov)
        measure = lambda feats: distances(feats, mean, white)  # noqa: E731
        with_familiarity(proto, features_name, mean, white)
        record = {
            "statistic": "Mahalanobis distance of the pooled backbone features to the train split's (Ledoit-Wolf)",
            "shrinkage": round(shrinkage, 6),
        }
    val_dist = measure(features(proto, val, screener))
    threshold = round(float(np.percentile(val_dist, percentile)), DECIMALS)
    record |= {
        "train_films": len(train),
        "threshold_rule": f"{percentile:g}th percentile of the values of {len(val)} val films",
        "percentile": percentile,
        "val_films": len(val),
        # the site check's reference: counted as `run` decides (records.is_unfamiliar)
        "val_unfamiliar": sum(round(float(v), DECIMALS) > threshold for v in val_dist),
        "val_median": round(float(np.median(val_dist)), 6),
        "data": data_dir.name,
        "excluded_sources": list(exclude_sources),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
    }
    meta = spec.to_metadata()
    meta["outputs"][OUTPUT] = OUTPUT
    meta["familiarity_threshold"] = threshold
    meta["familiarity"] = record
    expected = measure(features(proto, val[:4], screener))

    def agrees(written: Any) -> None:  # the written model loads, and agrees with numpy
        if not np.allclose(_graph_distances(written, val[:4], screener), expected, rtol=1e-3, atol=1e-3):
            raise ExportError("the familiarity output of the graph differs from the statistics it was built from")

    save_classifier(proto, meta, dst, version, agrees)
    return {**record, "threshold": meta["familiarity_threshold"]}


def _graph_distances(model: Any, paths: list[Path], screener: Screener) -> np.ndarray:
    out = []
    for batch in screener.decoded_batches(paths):
        inputs = np.stack([d.classifier_input for d in batch])  # type: ignore[misc]
        out.append(model.run(inputs)[OUTPUT][:, 0])
    return np.concatenate(out)
