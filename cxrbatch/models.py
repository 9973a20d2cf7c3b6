"""The two ONNX models, their metadata, and the onnxruntime sessions that run them.

Each model carries its own description as JSON in the ONNX `metadata_props` under the key
`cxrbatch` (schema `cxrbatch.model/1`, documented in models/README.md). Everything the runtime
needs to feed and read a model comes from there: preprocessing, labels, thresholds (parsed, and
checked against the graph, by cxrbatch.modelspec).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.cores import usable_cores
from cxrbatch.errors import DeviceError, ModelError, OutOfMemory
from cxrbatch.files import atomic_write, write_failed
from cxrbatch.modelspec import ROLES, ModelSpec

log = logging.getLogger(__name__)

METADATA_KEY = "cxrbatch"
MODEL_FILES = {"gate": "gate.onnx", "classifier": "classifier.onnx"}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# cuDNN's exhaustive search (onnxruntime's default) benchmarks every convolution again for each new
# batch shape: seconds per shape, every night; its heuristics pick at once. TF32 moved probabilities
# by up to 3.4e-3 from the CPU's; without it by 3.1e-6 (benchmarks/README.md).
# how onnxruntime says its allocator failed (its arena, a plain allocation, CUDA's): an untyped Fail
_NO_MEMORY = ("Failed to allocate memory", "bad_alloc", "out of memory")
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


class Model:
    """One onnxruntime session with the spec that says how to feed it."""

    def __init__(
        self, path: Path, spec: ModelSpec, session: Any, sha256: str, features_output: str | None = None
    ) -> None:
        """`features_output` names a graph output `run` fetches too, the pooled features a tool
        reads in the same pass as the scores (cxrbatch.features.with_features); never in a run."""
        self.path = path
        self.spec = spec
        self.session = session
        self.sha256 = sha256
        self.features_output = features_output

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def on_gpu(self) -> bool:
        return self.providers[0] == CUDA

    def announce(self) -> None:
        """Log that the model is loaded: which one, and where it runs."""
        spec, providers = self.spec, ", ".join(self.providers)
        log.info("loaded %s %s v%s (%s) on %s", spec.role, spec.name, spec.version, self.short_hash, providers)

    def run(self, batch: np.ndarray, with_cam: bool = False) -> dict[str, np.ndarray]:
        """Run a NHWC float32 batch and return the named outputs."""
        names = [self.spec.score_output]
        for extra in (self.spec.familiarity_output, self.spec.referral_output, self.features_output):
            if extra:
                names.append(extra)
        if with_cam and self.spec.cam_output:
            names.append(self.spec.cam_output)
        try:
            outputs = self.session.run(names, {self.spec.input_name: batch})
        except Exception as exc:  # onnxruntime's own untyped errors; its allocator's failure is the environment's
            if not any(sign in str(exc) for sign in _NO_MEMORY):
                raise
            raise OutOfMemory(f"the {self.spec.role} on a batch of {len(batch)} films: {_allocation(exc)}") from None
        return dict(zip(names, outputs, strict=True))

    def _thresholds(self) -> dict[str, float | None]:
        return {
            "referral_threshold": self.spec.referral_threshold,
            "familiarity_threshold": self.spec.familiarity_threshold,
        }

    def describe(self) -> dict[str, Any]:
        """Summarise the model for reports."""
        return {
            "file": self.path.name,
            "sha256": self.sha256,
            "name": self.spec.name,
            "version": self.spec.version,
            "labels": list(self.spec.labels),
            "threshold": self.spec.threshold,
            **{k: v for k, v in self._thresholds().items() if v is not None},
            **({"referral_from": self.spec.referral_from} if self.spec.referral_output else {}),
            "providers": self.providers,
        }


def _allocation(exc: Exception) -> str:
    """The part of onnxruntime's allocation failure an operator can use: how much it asked for."""
    found = re.search(r"buffer of size (\d+)", str(exc))
    return f"{int(found.group(1)) / 2**20:.1f} MiB more could not be allocated" if found else "an allocation failed"


def default_models_dir() -> Path:
    """Find the bundled models: inside the installed wheel, else the source checkout's models/."""
    bundled = Path(str(resources.files("cxrbatch"))) / "_models"
    if bundled.is_dir():
        return bundled
    return Path(__file__).resolve().parent.parent / "models"


def choose_providers(device: str, available: list[str] | None = None) -> list[str]:
    """Pick onnxruntime providers for `device` (auto, cpu, cuda), always ending with CPU."""
    if available is None:
        import onnxruntime as ort

        available = list(ort.get_available_providers())
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise DeviceError(
                "CUDA was requested but onnxruntime has no CUDAExecutionProvider here "
                f"(available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
            )
        return [CUDA, CPU]
    if device == "auto":
        return [CUDA, CPU] if CUDA in available else [CPU]
    raise DeviceError(f"unknown device {device!r}: use auto, cpu or cuda")


def read_metadata(path: Path) -> dict[str, Any]:
    """Read the cxrbatch metadata record embedded in an ONNX file without running it."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=[CPU])
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelError(f"cannot load model {path}: {exc}") from None
    return _metadata_of(session, path)


def embed_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Write `meta` as the cxrbatch record of an ONNX ModelProto, replacing any record it had."""
    props = proto.metadata_props
    keep = [(p.key, p.value) for p in props if p.key != METADATA_KEY]
    del props[:]
    for key, value in keep:
        props.add(key=key, value=value)
    props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))


def save_model(
    proto: Any, meta: dict[str, Any], dst: Path, check: Callable[[Model], None] = lambda model: None
) -> None:
    """Write the ONNX ModelProto `proto` to `dst` with the metadata record `meta` embedded first.

    It must pass onnx's full check, load as the runtime loads it (as `meta`'s role) and pass
    `check` (which raises) before it takes `dst`'s place, through a temporary file in `dst`'s
    folder (made if need be; `cxrbatch.files.atomic_write`): a failure, a kill or a full disk
    leaves `dst` as it was, even where `dst` is the model it was made from, and a file system
    that refuses the write is a ReportError naming the file.
    """
    import onnx

    embed_metadata(proto, meta)
    onnx.checker.check_model(proto, full_check=True)
    data = proto.SerializeToString()

    def write(fh: Any) -> None:
        fh.write(data)
        check(model_from_bytes(data, dst, str(meta["role"]), [CPU], announce=False))

    try:  # made only now: `files.check_out` checked, before the work, that it can be
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_failed("model", dst, exc) from None
    atomic_write(dst, write, binary=True, what="model")


def _shapes(args: list[Any]) -> dict[str, list[Any]]:
    """onnxruntime's NodeArgs by name, as their shapes."""
    return {arg.name: list(arg.shape or []) for arg in args}


def _metadata_of(session: Any, path: Path) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ModelError(f"{path}: no '{METADATA_KEY}' metadata; export it with `cxrbatch export`")
    try:
        meta: dict[str, Any] = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: model metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: model metadata is {type(meta).__name__} JSON, not a record")
    return meta


def load_model(path: Path, role: str, providers: list[Any], threads: int | None = None, announce: bool = True) -> Model:
    """Open one ONNX model for `role` with explicit providers and check its metadata.

    A provider given by name gets cxrbatch's options (CUDA_OPTIONS); a (name, options) pair is
    passed on as it is.
    """
    if not path.is_file():
        raise ModelError(f"{role.capitalize()} model not found: {path}")
    return model_from_bytes(path.read_bytes(), path, role, providers, threads, announce)


def model_from_bytes(
    data: bytes, path: Path, role: str, providers: list[Any], threads: int | None = None, announce: bool = True
) -> Model:
    """`load_model` on a file's bytes (a Ray actor gets them from the driver, not from a shared
    folder); `path` names the file in messages and reports. `announce` logs the load (not for a
    tool's working copy of a model already announced)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Two sessions take turns on the same cores: spinning threads of one starve the other.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Prepacking rearranges weights when the session opens, for the matrix products' kernels; here
    # it cost about 0.03 s of each run's start (mostly the classifier's 1280 x 4329 familiarity
    # matrix) and bought no measurable speed at batch 8 (benchmarks/README.md, *Start-up*).
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.intra_op_num_threads = threads or usable_cores()
    options.log_severity_level = 3

    def session_on(chosen: list[Any]) -> Any:
        # no fallback of onnxruntime's own: it prints to stdout (into a CSV report sent there)
        return ort.InferenceSession(
            data,
            sess_options=options,
            providers=[(CUDA, CUDA_OPTIONS) if p == CUDA else p for p in chosen],
            enable_fallback=0,
        )

    try:
        session = session_on(providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        if CUDA in [p[0] if isinstance(p, tuple) else p for p in providers]:
            try:
                session_on([CPU])
            except Exception:
                pass  # the file itself is bad
            else:
                raise DeviceError(f"CUDA could not start for the {role} model {path}: {exc}") from None
        raise ModelError(f"cannot load {role} model {path}: {exc}") from None
    spec = ModelSpec.from_metadata(_metadata_of(session, path), str(path))
    if spec.role != role:
        raise ModelError(f"{path} is a {spec.role} model, expected a {role} model")
    spec.check_graph(_shapes(session.get_inputs()), _shapes(session.get_outputs()), str(path))
    model = Model(path, spec, session, hashlib.sha256(data).hexdigest())
    if announce:
        model.announce()
    return model


def load_models(
    models_dir: Path, device: str = "auto", threads: int | None = 1, announce: bool = True
) -> tuple[Model, Model]:
    """Open the gate and the classifier found in `models_dir` (`announce`: log each load now).

    Each session runs on `threads` cores (None: all of them). One is right for a `Screener`,
    which runs batches side by side on its worker threads (`cxrbatch.pipeline`).
    """
    if not models_dir.is_dir():
        raise ModelError(f"Models folder not found: {models_dir}")
    providers = choose_providers(device)

    # Reading, hashing and optimising a model happen outside the GIL: the two load side by side,
    # which takes a one-film run's model loading from about 0.17 s to 0.11 s on 2 cores.
    def load(role: str) -> Model:
        try:
            return load_model(models_dir / MODEL_FILES[role], role, providers, threads, announce)
        except DeviceError as exc:
            if device != "auto":
                raise
            log.warning("%s: the models run on the CPU", exc)
            return load_model(models_dir / MODEL_FILES[role], role, [CPU], threads, announce)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="load") as pool:
        gate, classifier = pool.map(load, ROLES)
    if device == "cuda" and not (gate.on_gpu and classifier.on_gpu):  # onnxruntime fell back without a word
        raise DeviceError(
            f"CUDA was requested but the models run on {', '.join(gate.providers)}: onnxruntime-gpu could not "
            "start CUDA here (its log says why); use --device cpu"
        )
    return gate, classifier
