"""Model metadata, loading, and the choice of onnxruntime providers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import LABELS, make_classifier, make_gate
from typer.testing import CliRunner

from cxrbatch.cli import app
from cxrbatch.errors import DeviceError, ModelError
from cxrbatch.models import (
    CPU,
    CUDA,
    CUDA_OPTIONS,
    METADATA_KEY,
    choose_providers,
    embed_metadata,
    load_model,
    load_models,
    read_metadata,
)
from cxrbatch.modelspec import ModelSpec


def test_load_models_reads_metadata(tiny_models: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    assert gate.spec.labels == ("NOT_XRAY", "XRAY") and gate.spec.positive_label == "XRAY"
    assert classifier.spec.labels == tuple(LABELS)
    assert classifier.spec.input.channels == 1 and classifier.spec.input.colour == "grey"
    assert gate.spec.input.colour == "rgb"
    assert len(gate.sha256) == 64 and gate.short_hash == gate.sha256[:12]
    assert classifier.providers == [CPU]


def test_model_run_returns_named_outputs(tiny_models: Path) -> None:
    _, classifier = load_models(tiny_models, "cpu")
    batch = np.full((2, 32, 32, 1), 250, dtype=np.float32)
    out = classifier.run(batch, with_cam=True)
    assert out["scores"].shape == (2, 4) and out["cam"].shape == (2, 32, 32, 4)
    assert np.allclose(out["scores"].sum(axis=1), 1.0, atol=1e-5)
    assert int(out["scores"][0].argmax()) == LABELS.index("TUBERCULOSIS")


def test_missing_model_file_names_the_path(tmp_path: Path) -> None:
    make_gate(tmp_path / "gate.onnx")
    with pytest.raises(ModelError, match=r"Classifier model not found: .*classifier\.onnx"):
        load_models(tmp_path, "cpu")
    with pytest.raises(ModelError, match="Models folder not found"):
        load_models(tmp_path / "nothing", "cpu")


def test_role_mismatch_is_refused(tmp_path: Path) -> None:
    make_classifier(tmp_path / "gate.onnx")
    with pytest.raises(ModelError, match="is a classifier model, expected a gate model"):
        load_model(tmp_path / "gate.onnx", "gate", [CPU])


def test_garbage_model_file_is_model_error(tmp_path: Path) -> None:
    (tmp_path / "gate.onnx").write_bytes(b"not onnx at all")
    with pytest.raises(ModelError, match="cannot load gate model"):
        load_model(tmp_path / "gate.onnx", "gate", [CPU])


def test_model_without_metadata_is_refused(tmp_path: Path) -> None:
    path = make_gate(tmp_path / "gate.onnx")
    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="no 'cxrbatch' metadata"):
        load_model(path, "gate", [CPU])


def test_embed_metadata_replaces_the_record_and_keeps_other_keys(tmp_path: Path) -> None:
    path = make_gate(tmp_path / "gate.onnx")
    model = onnx.load(str(path))
    model.metadata_props.add(key="producer_note", value="kept")
    meta = {**read_metadata(path), "precision": "int8"}
    embed_metadata(model, meta)
    onnx.save(model, str(path))
    keys = [p.key for p in model.metadata_props]
    assert sorted(keys) == [METADATA_KEY, "producer_note"]
    assert read_metadata(path) == meta


def test_incomplete_metadata_names_the_missing_key(tmp_path: Path) -> None:
    path = make_gate(tmp_path / "gate.onnx")
    model = onnx.load(str(path))
    meta = json.loads(model.metadata_props[0].value)
    del meta["labels"]
    model.metadata_props[0].value = json.dumps(meta)
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match=r"incomplete model metadata.*labels"):
        load_model(path, "gate", [CPU])


def _record(role: str, **input_fields: object) -> dict[str, Any]:
    """A minimal metadata record; `input_fields` override the input's defaults."""
    colour, channels = ("rgb", 3) if role == "gate" else ("grey", 1)
    inp = {"name": "image", "height": 8, "width": 8, "channels": channels, "colour": colour, "equalize": False}
    return {
        "schema": "cxrbatch.model/1",
        "role": role,
        "name": role[0],
        "version": "1",
        "input": {**inp, **input_fields},
        "labels": ["NO", "YES"],
        "outputs": {"scores": "scores"},
        "threshold": 0.5,
        **({"negative_label": "NO"} if role == "classifier" else {}),
    }


def test_spec_rejects_wrong_schema_and_gate_without_positive_label() -> None:
    with pytest.raises(ModelError, match="schema"):
        ModelSpec.from_metadata({"schema": "other/9"}, "m.onnx")
    with pytest.raises(ModelError, match="positive_label"):
        ModelSpec.from_metadata({**_record("gate"), "positive_label": "MAYBE"}, "m.onnx")
    assert METADATA_KEY == "cxrbatch"


def test_classifier_without_its_no_finding_label_is_refused() -> None:
    record = {k: v for k, v in _record("classifier").items() if k != "negative_label"}
    with pytest.raises(ModelError, match="negative_label"):
        ModelSpec.from_metadata(record, "m.onnx")
    with pytest.raises(ModelError, match="negative_label"):
        ModelSpec.from_metadata({**record, "negative_label": "NORMAL"}, "m.onnx")  # not among NO, YES


def test_to_metadata_is_read_back_as_the_same_spec_and_record() -> None:
    record = {**_record("classifier", clahe=2.0), "training": {"seed": 7}}
    spec = ModelSpec.from_metadata(record, "m.onnx")
    written = spec.to_metadata()
    assert ModelSpec.from_metadata(written, "m.onnx") == spec
    assert written["training"] == {"seed": 7} and written["negative_label"] == "NO"
    assert written["input"] == {**record["input"], "resample": "bilinear"}


def test_spec_reads_clahe_and_defaults_it_off() -> None:
    assert ModelSpec.from_metadata(_record("classifier"), "m.onnx").input.clahe == 0.0
    assert ModelSpec.from_metadata(_record("classifier", clahe=2.0), "m.onnx").input.clahe == 2.0
    with pytest.raises(ModelError):  # both contrast normalisations at once
        ModelSpec.from_metadata(_record("classifier", clahe=2.0, equalize=True), "m.onnx")


@pytest.mark.parametrize(
    ("device", "available", "expected"),
    [
        ("cpu", [CUDA, CPU], [CPU]),
        ("auto", [CUDA, CPU], [CUDA, CPU]),
        ("auto", [CPU], [CPU]),
        ("cuda", ["TensorrtExecutionProvider", CUDA, CPU], [CUDA, CPU]),
    ],
)
def test_choose_providers(device: str, available: list[str], expected: list[str]) -> None:
    assert choose_providers(device, available) == expected


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(DeviceError, match=r"CUDA was requested.*onnxruntime-gpu"):
        choose_providers("cuda", [CPU])
    with pytest.raises(DeviceError, match="unknown device"):
        choose_providers("tpu", [CPU])


def test_cuda_sessions_get_heuristic_algorithm_search(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Named CUDA gets cxrbatch's options; explicit (name, options) pairs pass through unchanged."""
    import onnxruntime as ort

    asked: list[list[object]] = []
    real_session = ort.InferenceSession

    def fake_session(
        data: bytes, sess_options: object = None, providers: list[object] | None = None, **kw: object
    ) -> object:
        asked.append(list(providers or []))
        return real_session(data, sess_options=sess_options, providers=[CPU])

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    load_model(tiny_models / "gate.onnx", "gate", [CUDA, CPU])
    mine = (CUDA, {"cudnn_conv_algo_search": "EXHAUSTIVE"})
    load_model(tiny_models / "gate.onnx", "gate", [mine, CPU])
    load_model(tiny_models / "gate.onnx", "gate", [CPU])
    assert asked == [[(CUDA, CUDA_OPTIONS), CPU], [mine, CPU], [CPU]]
    assert CUDA_OPTIONS == {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"}


def _edited(path: Path, edit: Any) -> Path:
    """The model at `path` with its metadata record changed by `edit` (in place; may return a new record)."""
    model = onnx.load(str(path))
    meta = json.loads(model.metadata_props[0].value)
    changed = edit(meta)
    model.metadata_props[0].value = json.dumps(meta if changed is None else changed)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("role", "edit", "message"),
    [
        ("classifier", lambda m: m["input"].update(name="nope"), r"input 'nope' is not the graph's \(\['image'\]\)"),
        (
            "classifier",
            lambda m: m["input"].update(height=16),
            r"the metadata says N x 16 x 32 x 1",
        ),
        ("classifier", lambda m: m["input"].update(channels=3), r"the metadata says N x 32 x 32 x 3"),
        ("classifier", lambda m: m["input"].update(height=0), r"input must be at least 1 x 1"),
        ("classifier", lambda m: m.update(labels=m["labels"][:3]), r"is .* needs 3 value\(s\) per film"),
        ("classifier", lambda m: m["outputs"].update(scores="nope"), r"names output 'nope', which the graph lacks"),
        ("classifier", lambda m: m["outputs"].update(cam="scores"), r"names one graph output for two things"),
        ("classifier", lambda m: m.update(labels=["NORMAL", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]), "listed twice"),
        ("classifier", lambda m: m.update(labels="NORMAL"), r"labels must be a list of names"),
        ("classifier", lambda m: m.update(threshold=float("nan")), r"threshold must be between 0 and 1, not nan"),
        ("gate", lambda m: m.update(threshold=2.0), r"threshold must be between 0 and 1, not 2.0"),
        ("gate", lambda m: m.update(threshold=-1.0), r"threshold must be between 0 and 1, not -1.0"),
        ("classifier", lambda m: m.update(referral_threshold=1.5), r"referral_threshold must be .* not 1.5"),
        ("classifier", lambda m: [1, 2], r"metadata is list JSON, not a record"),
    ],
)
def test_metadata_that_does_not_describe_its_graph_is_refused_when_the_model_loads(
    tiny_models: Path, role: str, edit: Any, message: str
) -> None:
    # Each of these screened a whole folder and then failed, or wrote wrong rows with exit 0.
    path = _edited(tiny_models / f"{role}.onnx", edit)
    with pytest.raises(ModelError, match=message):
        load_model(path, role, [CPU])


def test_familiarity_and_site_check_records_are_checked_when_the_model_loads(tmp_path: Path) -> None:
    record = {**_record("classifier"), "outputs": {"scores": "scores", "familiarity": "f"}}
    with pytest.raises(ModelError, match=r"familiarity_threshold must be a distance \(0 or more\), not nan"):
        ModelSpec.from_metadata({**record, "familiarity_threshold": float("nan")}, "m.onnx")
    record["familiarity_threshold"] = 0.3
    broken = {"unfamiliar": 3, "familiarity_threshold": 0.3}  # a calibration record without its counts
    with pytest.raises(ModelError, match=r"m.onnx: the classifier's calibration or familiarity record is malformed"):
        ModelSpec.from_metadata({**record, "calibration": broken}, "m.onnx")
    with pytest.raises(ModelError, match=r"record is malformed .*7 unfamiliar of 5 validation films"):
        ModelSpec.from_metadata({**record, "familiarity": {"val_unfamiliar": 7, "val_films": 5}}, "m.onnx")
    good = ModelSpec.from_metadata({**record, "familiarity": {"val_unfamiliar": 2, "val_films": 5}}, "m.onnx")
    assert good.familiarity_threshold == 0.3


def test_a_graph_that_leaves_its_input_rank_open_loads(tiny_models: Path) -> None:
    path = tiny_models / "classifier.onnx"
    model = onnx.load(str(path))
    model.graph.input[0].type.tensor_type.ClearField("shape")
    onnx.save(model, str(path))
    assert load_model(path, "classifier", [CPU]).spec.input.height == 32


def _onnxruntime_gpu_without_a_usable_gpu(monkeypatch: pytest.MonkeyPatch, raises: bool) -> None:
    """What onnxruntime-gpu does on a machine whose CUDA cannot start: `get_available_providers`
    lists CUDA (it is compiled in); the session then falls back to the CPU, either with only a log
    line (CUDA libraries missing) or, where creating the CUDA provider throws (no device, driver too
    old: "CUDA failure 100: no CUDA-capable device is detected"), after printing an "EP Error"
    banner to stdout (onnxruntime_inference_collection.py, InferenceSession.__init__)."""
    real_available = ort.get_available_providers
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, *real_available()])
    if not raises:
        return  # the CPU-only wheel drops the unknown provider with a warning and runs on the CPU
    real_create = ort.InferenceSession._create_inference_session

    def create(self, providers, provider_options, disabled_optimizers=None):  # type: ignore[no-untyped-def]
        names = [p[0] if isinstance(p, tuple) else p for p in providers or []]
        if CUDA in names:
            self._fallback_providers = [CPU]
            raise RuntimeError("CUDA failure 100: no CUDA-capable device is detected")
        return real_create(self, providers, provider_options, disabled_optimizers)

    monkeypatch.setattr(ort.InferenceSession, "_create_inference_session", create)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
@pytest.mark.parametrize("raises", [False, True])
def test_device_cuda_that_ends_up_on_the_cpu_is_an_error(
    tiny_models: Path, monkeypatch: pytest.MonkeyPatch, raises: bool
) -> None:
    _onnxruntime_gpu_without_a_usable_gpu(monkeypatch, raises)
    try:
        gate, classifier = load_models(tiny_models, "cuda")
    except DeviceError:
        return
    pytest.fail(f"--device cuda loaded the models on {gate.providers} and {classifier.providers}, without an error")


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available")
def test_device_cuda_that_ends_up_on_the_cpu_exits_1(
    tiny_models: Path, incoming: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _onnxruntime_gpu_without_a_usable_gpu(monkeypatch, raises=False)
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["run", str(incoming), "--models", str(tiny_models), "--device", "cuda", "--json", str(out), "-q"]
    )
    providers = json.loads(out.read_text())["models"]["gate"]["providers"] if out.exists() else None
    assert result.exit_code == 1, f"exit {result.exit_code}, models ran on {providers}"


def test_a_cuda_provider_that_cannot_start_writes_nothing_into_the_csv_on_stdout(
    tiny_models: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _onnxruntime_gpu_without_a_usable_gpu(monkeypatch, raises=True)
    result = CliRunner().invoke(app, ["run", str(incoming), "--models", str(tiny_models), "-q"])  # --device auto
    assert result.exit_code == 3, result.output  # f_broken.jpg
    assert result.stdout.startswith("path,status,"), result.stdout[:400]
