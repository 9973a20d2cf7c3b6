"""float16 copy of an exported model, meant for the CUDA provider.

Weights and activations become float16; the graph's inputs and outputs stay float32, so the runtime
feeds and reads the same arrays as for the float32 model. The cxrbatch metadata is copied over with
`"precision": "float16"`, less a referral threshold and its calibration record, which were chosen
on the float32 scores (`cxrbatch.modelspec.copy_metadata`). A classifier's familiarity output is
taken out before the conversion and put back after it, reading the float16 features through a
cast, so it is computed in float32 as the threshold in the metadata assumes. Whether a float16
model may replace the float32 one is decided by `cxrbatch evaluate` on both, per class and per
source (benchmarks/README.md has the comparison; `cxrbatch half` makes the copy). The copy takes
DST's place only whole and loading (`cxrbatch.models.save_model`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
from onnxconverter_common import float16

from cxrbatch.errors import UsageError
from cxrbatch.features import pooled_features_name
from cxrbatch.files import check_out
from cxrbatch.models import read_metadata, save_model
from cxrbatch.modelspec import ModelSpec, copy_metadata

from .familiarity import attach_familiarity, detach_familiarity


def halve(src: Path, dst: Path, force: bool = False) -> None:
    """Write a float16 copy of `src` with float32 inputs and outputs; an existing `dst` only with `force`."""
    if not src.is_file():
        raise UsageError(f"Model not found: {src}")
    meta = read_metadata(src)
    spec = ModelSpec.from_metadata(meta, str(src))
    spec.refuse_referral_head(str(src), "a float16 copy")
    spec.refuse_reduced_precision(str(src), "a float16 copy")
    if dst.resolve() == src.resolve():
        raise UsageError(f"DST {dst} is SRC: write the copy beside the float32 model, not over it")
    check_out(dst, ".onnx", "DST", force)
    proto = onnx.load(str(src))
    detached = features = None
    if spec.familiarity_output:  # converted apart: it stays float32 (its threshold was set in float32)
        features = pooled_features_name(proto, spec.score_output)
        detached = detach_familiarity(proto)
    with warnings.catch_warnings():
        # Tiny weights (|w| < 1e-7) are clamped to float16's smallest normal; the converter warns per weight.
        warnings.simplefilter("ignore", UserWarning)
        model = float16.convert_float_to_float16(_one_reader_per_input(proto), keep_io_types=True)
    if detached is not None and features is not None:
        attach_familiarity(model, detached, features, cast=True)
    save_model(model, copy_metadata(meta, "float16", str(src)), dst)


def _one_reader_per_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """Route each graph input read by several nodes through one Identity node.

    With keep_io_types the converter puts a Cast after each input, once per reading node and always
    under the same name, which breaks single assignment when an input has several readers.
    """
    graph = model.graph
    for graph_input in graph.input:
        readers = [node for node in graph.node if graph_input.name in node.input]
        if len(readers) < 2:
            continue
        routed = f"{graph_input.name}_routed"
        for node in readers:
            node.input[:] = [routed if name == graph_input.name else name for name in node.input]
        graph.node.insert(0, onnx.helper.make_node("Identity", [graph_input.name], [routed]))
    return model
