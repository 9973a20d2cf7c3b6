"""Train, export and evaluate end to end on a tiny synthetic dataset (needs the export extra).

Small width, 32-px input, one epoch per phase, no pretrained weights: this checks the mechanism
(labels from folders, two phases, ONNX conversion, parity, metadata), not accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")
pytest.importorskip("tf2onnx", reason="the export extra (tf2onnx) is not installed")

from cxrbatch.cli import app
from cxrbatch.models import load_models, read_metadata

pytestmark = pytest.mark.export
runner = CliRunner()
TINY = ["--size", "32", "--alpha", "0.35", "--views", "1", "--epochs1", "1", "--epochs2", "1"]


def _blob_image(path: Path, rng: np.random.Generator, bright: bool, colour: bool) -> None:
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


def _dataset(root: Path, classes: dict[str, tuple[bool, bool]], per_class: int = 12) -> Path:
    rng = np.random.default_rng(7)
    for split in ("train", "val", "test"):
        for name, (bright, colour) in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                _blob_image(folder / f"{name}_{i}.png", rng, bright, colour)
    return root


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("export")
    cxr = _dataset(work / "cxr", {"DARK": (False, False), "LIGHT": (True, False)})
    gate = _dataset(work / "gate", {"NOT_XRAY": (True, True), "XRAY": (False, False)})
    models = work / "models"
    for role, data in (("gate", gate), ("classifier", cxr)):
        ckpt = work / f"{role}.keras"
        result = runner.invoke(app, ["train", role, str(data), "--out", str(ckpt), *TINY])
        assert result.exit_code == 0, result.output
        result = runner.invoke(
            app, ["export", str(ckpt), "--out", str(models / f"{role}.onnx"), "--check-images", str(data / "val")]
        )
        assert result.exit_code == 0, result.output
    return {"models": models, "cxr": cxr, "gate": gate, "work": work}


def test_checkpoint_sidecar_has_sorted_labels_and_config(exported: dict[str, Path]) -> None:
    summary = json.loads((exported["work"] / "classifier.keras.json").read_text(encoding="utf-8"))
    assert summary["labels"] == ["DARK", "LIGHT"]
    assert summary["config"]["alpha"] == 0.35 and summary["input"]["height"] == 32
    from export.training import DEFAULTS

    default = DEFAULTS["classifier"]  # options not given on the command line keep the role's defaults
    assert summary["config"]["cache_layer"] == default.cache_layer and summary["config"]["lr2"] == default.lr2
    assert summary["data"]["train"] == {"DARK": 12, "LIGHT": 12}
    gate = json.loads((exported["work"] / "gate.keras.json").read_text(encoding="utf-8"))
    assert gate["labels"] == ["NOT_XRAY", "XRAY"] and 0 < gate["threshold"] <= 0.5


def test_metadata_round_trip(exported: dict[str, Path]) -> None:
    meta = read_metadata(exported["models"] / "classifier.onnx")
    assert meta["schema"] == "cxrbatch.model/1" and meta["role"] == "classifier"
    assert meta["labels"] == ["DARK", "LIGHT"]
    assert meta["input"]["channels"] == 1 and meta["input"]["equalize"] is True
    assert meta["outputs"] == {"scores": "scores", "cam": "cam"}
    gate, classifier = load_models(exported["models"], "cpu")
    assert gate.spec.positive_label == "XRAY" and gate.spec.input.colour == "rgb"
    assert classifier.spec.cam_output == "cam"


def test_exported_outputs_vary_and_cam_matches_scores(exported: dict[str, Path]) -> None:
    from cxrbatch.imaging import load_image, to_model_input

    _, classifier = load_models(exported["models"], "cpu")
    paths = sorted((exported["cxr"] / "test").rglob("*.png"))
    batch = np.stack([to_model_input(load_image(p), classifier.spec.input) for p in paths])
    out = classifier.run(batch, with_cam=True)
    scores, cam = out["scores"], out["cam"]
    assert scores.std(axis=0).max() > 1e-4  # not the constant output of an untrained network
    # global average of the per-position logits, softmaxed, is the classifier's own output
    logits = cam.mean(axis=(1, 2))
    soft = np.exp(logits - logits.max(axis=1, keepdims=True))
    assert np.allclose(soft / soft.sum(axis=1, keepdims=True), scores, atol=1e-4)


def test_parity_check_fails_loudly(exported: dict[str, Path]) -> None:
    import keras

    from export.onnx_export import ExportError, check_parity, export

    ckpt = exported["work"] / "classifier.keras"
    images = sorted((exported["cxr"] / "val").rglob("*.png"))[:4]
    with pytest.raises(ExportError, match="at least one real image"):
        export(ckpt, exported["work"] / "x.onnx", [])
    import onnx

    proto = onnx.load(str(exported["models"] / "classifier.onnx"))
    model = keras.models.load_model(ckpt, compile=False)
    from cxrbatch.imaging import InputSpec

    spec = InputSpec(32, 32, 1, "grey", True)
    head = model.get_layer("head")
    kernel, bias = head.get_weights()
    head.set_weights([kernel + 0.5, bias])  # a Keras model that no longer matches the ONNX file
    from export.onnx_export import _with_outputs

    graph_model, names = _with_outputs(model, "classifier")
    with pytest.raises(ExportError, match="differs from Keras"):
        check_parity(graph_model, proto, spec, images, names)


def test_evaluate_end_to_end(exported: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    result = runner.invoke(
        app, ["evaluate", str(exported["cxr"]), "--models", str(exported["models"]), "--json", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "classifier evaluation on cxr/test: 24 images" in result.stdout
    report = json.loads(out.read_text(encoding="utf-8"))
    overall = report["overall"]
    assert overall["n"] == 24 and np.array(overall["confusion"]).sum() == 24
    assert 0.0 <= overall["accuracy"] <= 1.0 and len(overall["ci95"]["recall"]) == 2
    gate_run = runner.invoke(app, ["evaluate", str(exported["gate"]), "--models", str(exported["models"])])
    assert gate_run.exit_code == 0, gate_run.output
    assert "gate evaluation on gate/test: 24 images" in gate_run.stdout


def test_sample_weights_balance_classes_within_each_source() -> None:
    from export.training import sample_weights

    # source "tb": 10 NORMAL + 10 TB; source "big": 60 NORMAL + 20 PNEUMONIA (labels 0 NORMAL, 1 PNEU, 2 TB)
    labels = np.array([0] * 10 + [2] * 10 + [0] * 60 + [1] * 20)
    sources = ["tb"] * 20 + ["big"] * 80
    w = sample_weights(labels, sources, 3)
    assert w.mean() == pytest.approx(1.0)
    assert w[:10].sum() == pytest.approx(w[10:20].sum())  # no reward for "looks like the TB source"
    assert w[20:80].sum() == pytest.approx(w[80:].sum())  # classes balanced inside the big source too
    assert w[10] > 2 * w[20]  # the rare class's source counts more per image than a common class elsewhere
    lone = sample_weights(np.array([0] * 50 + [1]), ["s"] * 51, 2, cap=5.0)
    assert lone[-1] / lone[0] == pytest.approx(5.0 / (51 / 100))  # capped, not 25x


def test_augment_brings_every_view_to_the_weakest_source_resolution() -> None:
    from export.data import augment

    rng = np.random.default_rng(3)
    big = Image.fromarray(rng.integers(0, 255, (320, 300), dtype=np.uint8), mode="L")
    colour = Image.fromarray(rng.integers(0, 255, (300, 320, 3), dtype=np.uint8), mode="RGB")
    for _ in range(20):
        out = augment(big, rng)
        assert out.mode == "L" and max(out.size) <= 224
        assert augment(colour, rng).mode == "RGB"
    views = [np.asarray(augment(big, np.random.default_rng(9))) for _ in range(2)]
    assert np.array_equal(views[0], views[1])  # the same seed gives the same view


def test_zoom_out_frame_keeps_the_whole_film_inside_a_wider_frame() -> None:
    from export.data import augment, zoom_out_frame

    rng = np.random.default_rng(5)
    film = rng.integers(1, 255, (60, 50), dtype=np.uint8)
    fills = set()
    for _ in range(60):
        out = np.asarray(zoom_out_frame(Image.fromarray(film, mode="L"), rng))
        assert 60 <= out.shape[0] <= 90 and 50 <= out.shape[1] <= 75
        spots = [(y, x) for y in range(out.shape[0] - 59) for x in range(out.shape[1] - 49)]
        found = [(y, x) for y, x in spots if np.array_equal(out[y : y + 60, x : x + 50], film)]
        assert found  # never cut, never scaled
        y, x = found[0]
        around = np.ones(out.shape, dtype=bool)
        around[y : y + 60, x : x + 50] = False
        if not around.any():
            continue
        if len(np.unique(out[around])) == 1:
            fills.add("black" if out[around][0] == 0 else "grey")
        else:  # mirrored outwards: the row or column next to the film repeats the film's edge
            assert (y > 0 and np.array_equal(out[y - 1, x : x + 50], film[0])) or (
                x > 0 and np.array_equal(out[y : y + 60, x - 1], film[:, 0])
            )
            fills.add("mirror")
    assert fills == {"black", "grey", "mirror"}
    # zoom_out=1: every view framed, nothing cropped, so a flat film keeps its whole area in view
    flat = Image.fromarray(np.full((200, 200), 255, dtype=np.uint8), mode="L")
    views = [np.asarray(augment(flat, np.random.default_rng(s), zoom_out=1.0)) for s in range(10)]
    crops = [np.asarray(augment(flat, np.random.default_rng(s))) for s in range(10)]
    assert min((v > 128).mean() for v in views) < 0.85 and min((c > 128).mean() for c in crops) > 0.85


def test_random_crop_keeps_at_least_the_asked_share_of_the_area() -> None:
    from export.data import _random_crop

    film = Image.new("L", (200, 160))
    for least in (0.3, 0.7):
        rng = np.random.default_rng(1)
        shares = [np.prod(_random_crop(film, rng, least).size) / (200 * 160) for _ in range(300)]
        assert min(shares) >= 0.9 * least  # an edge can clip the aspect a little
        assert min(shares) < least + 0.05  # the whole range is used
    assert min(shares) > 0.6  # with 0.7 nothing as tight as the 0.3 crops


def test_alignment_plan_pairs_each_class_with_its_sources() -> None:
    from export.training import alignment_plan, alignment_targets

    # NORMAL (0) from a, b and a lone image of c; PNEUMONIA (1) from a only; TB (2) from b only
    labels = np.array([0] * 12 + [0] * 10 + [0] + [1] * 15 + [2] * 11)
    sources = ["a"] * 12 + ["b"] * 10 + ["c"] + ["a"] * 15 + ["b"] * 11
    plan = alignment_plan(labels, sources, 3)
    assert plan == [(0, ("a", "b"))]  # c is too small; one-source classes are not aligned
    masks = alignment_targets(plan, labels, sources)
    assert masks.shape == (len(labels), 2)
    assert masks[:12, 0].all() and masks[12:22, 1].all() and masks[:22].sum() == 22
    assert not masks[22:].any()  # the lone NORMAL and the other classes take no part


def test_source_alignment_loss_is_the_spread_of_source_means() -> None:
    from export.training import source_alignment_loss

    loss = source_alignment_loss((2,))
    masks = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=np.float32)
    # source a: mean (1, 0); source b: mean (1, 2); the unmasked last row must not count
    feats = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [100, 100]], dtype=np.float32)
    # between = mean over sources and dims of (mean - centre)^2 = 0.5; variance of members = 1
    np.testing.assert_allclose(np.asarray(loss(masks, feats)), np.full(5, 0.5), rtol=1e-5)
    same_means = np.array([[0, 0], [2, 2], [2, 0], [0, 2], [100, 100]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(loss(masks, same_means)), np.zeros(5), atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss(masks, feats * 0.1)), np.full(5, 0.5), rtol=1e-3)  # scale-free
    import tensorflow as tf

    scale = tf.Variable(1.0)
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(loss(masks, feats * scale))
    assert abs(float(tape.gradient(value, scale))) < 1e-4  # no reward for shrinking the features
    one_source = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(loss(one_source, feats)), np.zeros(5), atol=1e-6)


def test_leave_source_out_training_with_source_alignment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import export.training

    framing: set[tuple[float, float]] = set()
    real_augment = export.training.augment

    def recorded(img: Image.Image, rng: np.random.Generator, zoom_out: float, crop_area: float) -> Image.Image:
        framing.add((zoom_out, crop_area))
        return real_augment(img, rng, zoom_out, crop_area)

    monkeypatch.setattr(export.training, "augment", recorded)
    data = _dataset(tmp_path / "cxr", {"DARK": (False, False), "LIGHT": (True, False)}, per_class=30)
    rows = ["id,source"] + [f"{c}_{i},src{i % 3}" for c in ("DARK", "LIGHT") for i in range(30)]
    (data / "MANIFEST.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ckpt = tmp_path / "clf.keras"
    args = ["train", "classifier", str(data), "--out", str(ckpt), *TINY, "--views", "2", "--zoom-out", "0.8"]
    args += ["--crop-area", "0.5"]
    result = runner.invoke(app, [*args, "--source-alignment", "1.0", "--exclude-source", "src2"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "clf.keras.json").read_text(encoding="utf-8"))
    assert summary["data"]["train"] == {"DARK": 20, "LIGHT": 20} and summary["data"]["val"] == {"DARK": 20, "LIGHT": 20}
    assert summary["config"]["exclude_sources"] == ["src2"] and summary["config"]["source_alignment"] == 1.0
    assert framing == {(0.8, 0.5)}  # the framing options reach every augmented view
    assert summary["source_alignment"] == {"DARK": ["src0", "src1"], "LIGHT": ["src0", "src1"]}
    onnx_path = tmp_path / "classifier.onnx"
    result = runner.invoke(app, ["export", str(ckpt), "--out", str(onnx_path), "--check-images", str(data / "val")])
    assert result.exit_code == 0, result.output
    import onnx

    assert {o.name for o in onnx.load(str(onnx_path)).graph.output} == {"scores", "cam"}  # no alignment output


def test_head_only_training_when_phase_two_has_no_epochs(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "cxr", {"DARK": (False, False), "LIGHT": (True, False)}, per_class=6)
    args = ["train", "classifier", str(data), "--out", str(tmp_path / "c.keras"), *TINY[:-2], "--epochs2", "0"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "c.keras.json").read_text(encoding="utf-8"))
    assert summary["history"]["phase1_epochs"] == 1 and summary["history"]["phase2_epochs"] == 0
    assert 0.0 <= summary["validation"]["val_accuracy"] <= 1.0
