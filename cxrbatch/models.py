"""The two ONNX models, their metadata, and the onnxruntime sessions that run them.

Each model carries its own description as JSON in the ONNX `metadata_props` under the key
`cxrbatch` (schema `cxrbatch.model/1`, documented in models/README.md). Everything the runtime
needs to feed and read a model comes from there: preprocessing, labels, thresholds.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.cores import usable_cores
from cxrbatch.errors import DeviceError, ModelError, UsageError
from cxrbatch.imaging import InputSpec

log = logging.getLogger(__name__)

METADATA_KEY = "cxrbatch"
SCHEMA = "cxrbatch.model/1"
ROLES = ("gate", "classifier")
# Keys of the record that ModelSpec holds in its own fields (the rest stays in `extra`).
_SPEC_KEYS = frozenset(
    (
        *("schema", "role", "name", "version", "labels", "outputs", "threshold", "positive_label", "negative_label"),
        *("referral_threshold", "familiarity_threshold"),
    )
)
MODEL_FILES = {"gate": "gate.onnx", "classifier": "classifier.onnx"}
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# cuDNN's exhaustive search (onnxruntime's default) benchmarks every convolution again for each new
# batch shape: seconds per shape, every night; its heuristics pick at once. TF32 moved probabilities
# by up to 3.4e-3 from the CPU's; without it by 3.1e-6 (benchmarks/README.md).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}
# The graph outputs a referral score can come from instead of 1 - P(negative_label): a head fitted on
# the training collections at export (export/referral_head.py), or on a site's films (cxrbatch.sitehead).
BUNDLED_REFERRAL = "referral"
SITE_REFERRAL = "site_referral"
REFERRAL_FROM = {BUNDLED_REFERRAL: "bundled head", SITE_REFERRAL: "site head"}


@dataclass(frozen=True)
class ModelSpec:
    """The metadata record of one model, parsed and checked."""

    role: str
    name: str
    version: str
    input_name: str
    input: InputSpec
    labels: tuple[str, ...]
    score_output: str
    threshold: float  # gate: accept at or above; classifier: needs review below
    positive_label: str | None = None  # gate: the label its sigmoid scores (a chest X-ray)
    negative_label: str | None = None  # classifier: the label that is not a finding
    cam_output: str | None = None
    referral_threshold: float | None = None  # classifier: refer at or above this referral score
    referral_output: str | None = None  # classifier: a referral head's score (N x 1); else 1 - P(negative_label)
    familiarity_output: str | None = None  # classifier: distance of a film's features to the training films'
    familiarity_threshold: float | None = None  # classifier: unfamiliar above this distance
    extra: dict[str, Any] = field(default_factory=dict, compare=False)  # every other metadata key, kept as is

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], source: str) -> ModelSpec:
        """Build a spec from the JSON record, naming what is missing."""
        if meta.get("schema") != SCHEMA:
            raise ModelError(f"{source}: metadata schema is {meta.get('schema')!r}, expected {SCHEMA!r}")
        try:
            inp = meta["input"]
            role = meta["role"]
            spec = cls(
                role=role,
                name=meta["name"],
                version=str(meta["version"]),
                input_name=inp["name"],
                input=InputSpec(
                    height=int(inp["height"]),
                    width=int(inp["width"]),
                    channels=int(inp["channels"]),
                    colour=inp["colour"],
                    equalize=bool(inp["equalize"]),
                    resample=inp.get("resample", "bilinear"),
                    clahe=float(inp.get("clahe", 0.0)),
                ),
                labels=tuple(meta["labels"]),
                score_output=meta["outputs"]["scores"],
                cam_output=meta["outputs"].get("cam"),
                referral_threshold=_optional_float(meta.get("referral_threshold")),
                familiarity_output=meta["outputs"].get("familiarity"),
                referral_output=meta["outputs"].get("referral"),
                familiarity_threshold=_optional_float(meta.get("familiarity_threshold")),
                threshold=float(meta["threshold"]),
                positive_label=meta.get("positive_label"),
                negative_label=meta.get("negative_label"),
                extra={k: v for k, v in meta.items() if k not in _SPEC_KEYS},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{source}: incomplete model metadata ({type(exc).__name__}: {exc})") from None
        if role not in ROLES:
            raise ModelError(f"{source}: unknown role {role!r}")
        if role == "gate" and spec.positive_label not in spec.labels:
            raise ModelError(f"{source}: gate metadata needs positive_label among its labels")
        if role == "classifier" and spec.negative_label not in spec.labels:
            raise ModelError(f"{source}: classifier metadata needs negative_label (its no-finding label) in labels")
        if spec.referral_threshold is not None and not 0.0 <= spec.referral_threshold <= 1.0:
            raise ModelError(f"{source}: referral_threshold must be between 0 and 1, not {spec.referral_threshold}")
        if (spec.familiarity_output is None) != (spec.familiarity_threshold is None):
            raise ModelError(f"{source}: a familiarity output needs a familiarity_threshold, and the reverse")
        return spec

    @property
    def referral_from(self) -> str:
        """Where the referral score comes from: "site head", "bundled head" or "1 - p(no finding)"."""
        if not self.referral_output:
            return "1 - p(no finding)"
        return REFERRAL_FROM.get(self.referral_output, f"output {self.referral_output}")

    @property
    def site_headed(self) -> bool:
        """Whether the referral score is a site head's, fitted on a site's labelled films."""
        return self.referral_output == SITE_REFERRAL

    def refuse_referral_head(self, source: str, copy: str) -> None:
        """Refuse (UsageError) to make `copy` (such as "a float16 copy") of a classifier with a referral
        head: its threshold was chosen on float32 scores, so a head stays with float32 models."""
        if self.referral_output:
            raise UsageError(
                f"{source} has a {self.referral_from}: {copy} would move its referral scores, and any "
                "threshold chosen on them"
            )

    def require_cam(self) -> str:
        """The name of the classifier's `cam` output, which heatmaps need; a clear error without one."""
        if not self.cam_output:
            raise ModelError("heatmaps need a classifier with a 'cam' output (export it with `cxrbatch export`)")
        return self.cam_output

    def to_metadata(self) -> dict[str, Any]:
        """The JSON record `from_metadata` reads back: the one writer of the schema."""
        extra_input = self.extra.get("input", {})
        inp = {**extra_input, **asdict(self.input), "name": self.input_name}
        outputs = {"scores": self.score_output}
        named = (("cam", self.cam_output), ("familiarity", self.familiarity_output), ("referral", self.referral_output))
        for key, name in named:
            if name:
                outputs[key] = name
        meta: dict[str, Any] = {
            **{k: v for k, v in self.extra.items() if k != "input"},
            "schema": SCHEMA,
            "role": self.role,
            "name": self.name,
            "version": self.version,
            "input": inp,
            "labels": list(self.labels),
            "outputs": outputs,
            "threshold": self.threshold,
        }
        for key in ("positive_label", "negative_label", "referral_threshold", "familiarity_threshold"):
            if getattr(self, key) is not None:
                meta[key] = getattr(self, key)
        return meta


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


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

    def run(self, batch: np.ndarray, with_cam: bool = False) -> dict[str, np.ndarray]:
        """Run a NHWC float32 batch and return the named outputs."""
        names = [self.spec.score_output]
        for extra in (self.spec.familiarity_output, self.spec.referral_output, self.features_output):
            if extra:
                names.append(extra)
        if with_cam and self.spec.cam_output:
            names.append(self.spec.cam_output)
        outputs = self.session.run(names, {self.spec.input_name: batch})
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


def _metadata_of(session: Any, path: Path) -> dict[str, Any]:
    props = session.get_modelmeta().custom_metadata_map
    if METADATA_KEY not in props:
        raise ModelError(f"{path}: no '{METADATA_KEY}' metadata; export it with `cxrbatch export`")
    try:
        meta: dict[str, Any] = json.loads(props[METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path}: model metadata is not valid JSON ({exc})") from None
    return meta


def load_model(path: Path, role: str, providers: list[Any], threads: int | None = None) -> Model:
    """Open one ONNX model for `role` with explicit providers and check its metadata.

    A provider given by name gets cxrbatch's options (CUDA_OPTIONS); a (name, options) pair is
    passed on as it is.
    """
    if not path.is_file():
        raise ModelError(f"{role.capitalize()} model not found: {path}")
    return model_from_bytes(path.read_bytes(), path, role, providers, threads)


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
    try:
        session = ort.InferenceSession(
            data, sess_options=options, providers=[(CUDA, CUDA_OPTIONS) if p == CUDA else p for p in providers]
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        raise ModelError(f"cannot load {role} model {path}: {exc}") from None
    spec = ModelSpec.from_metadata(_metadata_of(session, path), str(path))
    if spec.role != role:
        raise ModelError(f"{path} is a {spec.role} model, expected a {role} model")
    model = Model(path, spec, session, hashlib.sha256(data).hexdigest())
    if announce:
        log.info(
            "loaded %s %s v%s (%s) on %s", role, spec.name, spec.version, model.short_hash, ", ".join(model.providers)
        )
    return model


def load_models(models_dir: Path, device: str = "auto", threads: int | None = 1) -> tuple[Model, Model]:
    """Open the gate and the classifier found in `models_dir`.

    Each session runs on `threads` cores (None: all of them). One is right for a `Screener`,
    which runs batches side by side on its worker threads (`cxrbatch.pipeline`).
    """
    if not models_dir.is_dir():
        raise ModelError(f"Models folder not found: {models_dir}")
    providers = choose_providers(device)

    # Reading, hashing and optimising a model happen outside the GIL: the two load side by side,
    # which takes a one-film run's model loading from about 0.17 s to 0.11 s on 2 cores.
    def load(role: str) -> Model:
        return load_model(models_dir / MODEL_FILES[role], role, providers, threads)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="load") as pool:
        gate, classifier = pool.map(load, ROLES)
    return gate, classifier
