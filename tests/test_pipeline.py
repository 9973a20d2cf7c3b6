"""The screening pipeline: gate first, classifier on what passes, one result per file in order."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from helpers import grey_image

from cxrbatch.models import Model, load_models
from cxrbatch.pipeline import CLASSIFIED, ERROR, REJECTED, Decoded, Result, Screener, screen_all


@pytest.fixture
def screener(tiny_models: Path) -> Screener:
    gate, classifier = load_models(tiny_models, "cpu")
    return Screener(gate, classifier, batch_size=3, workers=2)


def _paths(folder: Path) -> list[Path]:
    from cxrbatch.discovery import iter_images

    return list(iter_images([folder]))


def test_gate_rejects_and_classifier_labels(screener: Screener, incoming: Path) -> None:
    results, summary = screen_all(screener, _paths(incoming))
    by_name = {r.path.name: r for r in results}
    assert [r.path.name for r in results] == [
        "a_dark.png",
        "b_mid.jpg",
        "e_photo.png",
        "f_broken.jpg",
        "c_light.PNG",
        "d_white.jpeg",
    ]
    assert by_name["a_dark.png"].label == "COVID19"
    assert by_name["b_mid.jpg"].label == "NORMAL"
    assert by_name["c_light.PNG"].label == "PNEUMONIA"
    assert by_name["d_white.jpeg"].label == "TUBERCULOSIS"
    photo = by_name["e_photo.png"]
    assert photo.status == REJECTED and photo.label is None and photo.probabilities is None
    assert photo.gate_score is not None and photo.gate_score < 0.01
    broken = by_name["f_broken.jpg"]
    assert broken.status == ERROR and broken.error == "corrupt or truncated image: Truncated File Read"
    assert summary.by_status == {CLASSIFIED: 4, REJECTED: 1, ERROR: 1}
    assert summary.by_label["NORMAL"] == 1


def test_probabilities_and_review_flag(screener: Screener, incoming: Path) -> None:
    results, _ = screen_all(screener, _paths(incoming))
    for r in results:
        if r.status == CLASSIFIED:
            assert r.probabilities is not None
            assert sum(r.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
            assert r.confidence == max(r.probabilities.values())
            assert r.needs_review == (r.confidence < 0.6)
    mid = next(r for r in results if r.path.name == "b_mid.jpg")
    assert mid.needs_review is True  # the tiny model is unsure about mid-grey


@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_results_do_not_depend_on_batch_size(tiny_models: Path, incoming: Path, batch_size: int) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    reference, _ = screen_all(Screener(gate, classifier, batch_size=5, workers=1), _paths(incoming))
    other, _ = screen_all(Screener(gate, classifier, batch_size=batch_size, workers=2), _paths(incoming))
    assert [(r.path, r.status, r.label) for r in other] == [(r.path, r.status, r.label) for r in reference]
    for a, b in zip(reference, other, strict=True):
        assert (a.confidence or 0) == pytest.approx(b.confidence or 0, abs=1e-6)


def test_all_bad_batch_and_many_files_keep_order(screener: Screener, tmp_path: Path) -> None:
    paths = []
    for i in range(10):
        p = tmp_path / f"{i:02d}.png"
        if i % 3 == 0:
            p.write_bytes(b"")
        else:
            grey_image(p, 20 + i * 20)
        paths.append(p)
    results = list(screener.screen(paths))
    assert [r.path for r in results] == paths
    assert [r.status for r in results].count(ERROR) == 4


def test_too_small_image_is_an_error_row(screener: Screener, tmp_path: Path) -> None:
    tiny = grey_image(tmp_path / "tiny.png", 100, size=8)
    (result,) = list(screener.screen([tiny]))
    assert result.status == ERROR and "too small" in (result.error or "")


def test_bad_settings_are_refused(tiny_models: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    with pytest.raises(ValueError):
        Screener(gate, classifier, batch_size=0)


def test_on_a_gpu_every_batch_has_the_full_size(
    tiny_models: Path, incoming: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CUDA session re-tunes for each new shape, so on a GPU short batches are padded and cut back."""
    gate, classifier = load_models(tiny_models, "cpu")
    reference, _ = screen_all(Screener(gate, classifier, batch_size=4, workers=1), _paths(incoming))
    shapes: list[tuple[str, int]] = []
    for model in (gate, classifier):
        real_run = model.run

        def recording_run(batch: np.ndarray, with_cam: bool = False, model: Model = model, real_run=real_run):  # type: ignore[no-untyped-def]
            shapes.append((model.spec.role, len(batch)))
            return real_run(batch, with_cam=with_cam)

        monkeypatch.setattr(model, "run", recording_run)
    monkeypatch.setattr(Model, "on_gpu", property(lambda self: True))
    padded, _ = screen_all(Screener(gate, classifier, batch_size=4, workers=1), _paths(incoming))
    # 6 files: batches of 4 and 2; the gate rejects the photo and 2 files fail to decode.
    assert {n for _, n in shapes} == {4}
    assert sorted({role for role, _ in shapes}) == ["classifier", "gate"]
    assert [(r.path, r.status, r.label, r.error) for r in padded] == [
        (r.path, r.status, r.label, r.error) for r in reference
    ]
    for a, b in zip(reference, padded, strict=True):
        assert a.gate_score == b.gate_score
        assert a.probabilities == b.probabilities


def test_referral_score_refer_and_the_review_flag(tiny_models: Path, incoming: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    results = {r.path.name: r for r in Screener(gate, classifier).screen(_paths(incoming))}
    for name, refer in (("a_dark.png", True), ("b_mid.jpg", False), ("c_light.PNG", True), ("d_white.jpeg", True)):
        r = results[name]
        assert r.probabilities is not None and r.referral_score == pytest.approx(1 - r.probabilities["NORMAL"])
        assert r.refer is refer  # the tiny classifier refers at 1 - P(NORMAL) >= 0.5
        assert r.familiarity is None and r.unfamiliar is None  # the tiny classifier has no familiarity output
    assert results["e_photo.png"].refer is None and results["e_photo.png"].referral_score is None
    assert results["f_broken.jpg"].refer is None


def _numbered(folder: Path, n: int) -> list[Path]:
    return [grey_image(folder / f"{i:03d}.png", 40 + i % 150) for i in range(n)]


def test_batches_are_screened_side_by_side(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two workers hold two batches at once: each batch's first file waits for the other's."""
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier, batch_size=2, workers=2)
    paths = _numbered(tmp_path, 4)
    both = threading.Barrier(2, timeout=20)
    decode = screener.decode

    def meeting_decode(path: Path, picture: bool = False) -> Decoded:
        if path in (paths[0], paths[2]):
            both.wait()  # breaks (and the run fails) if the batches ran one after the other
        return decode(path, picture)

    monkeypatch.setattr(screener, "decode", meeting_decode)
    results = list(screener.screen(paths))
    assert [r.path for r in results] == paths and {r.status for r in results} <= {CLASSIFIED, REJECTED}
    assert not both.broken


def test_a_consumer_that_stops_early_stops_the_queued_batches(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier, batch_size=1, workers=1, prefetch=2)
    decoded: list[Path] = []
    decode = screener.decode
    monkeypatch.setattr(screener, "decode", lambda p, picture=False: decoded.append(p) or decode(p, picture))
    results = screener.screen(_numbered(tmp_path, 30))
    first = next(results)
    results.close()  # as a crashed report writer or a Ctrl-C would
    assert first.path.name == "000.png"
    assert 1 <= len(decoded) <= 4  # the running batch, the queued ones at most, never the other 26


def test_one_worker_per_usable_core_by_default(tiny_models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    monkeypatch.setattr("cxrbatch.pipeline.usable_cores", lambda: 3)
    assert Screener(gate, classifier).workers == 3
    assert Screener(gate, classifier).describe() == {"name": "local", "threads": 3}
    assert Screener(gate, classifier, workers=5).workers == 5


def test_model_outputs_score_every_readable_file_as_screening_does(tiny_models: Path, incoming: Path) -> None:
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier, batch_size=2, workers=2)
    paths = _paths(incoming)
    screened = {r.path: r for r in screener.screen(paths)}
    seen: list[Path] = []
    for decoded, outputs in screener.model_outputs(paths):
        seen += [d.path for d in decoded]
        good = [d for d in decoded if d.error is None]
        if outputs is None:
            assert not good
            continue
        scores, out = outputs
        probs = out[classifier.spec.score_output]
        assert len(scores) == len(good) == len(probs)
        for d, score, p in zip(good, scores, probs, strict=True):
            result = screened[d.path]
            assert result.gate_score == float(score)  # the rejected photo is scored too
            if result.probabilities is not None:
                assert list(result.probabilities.values()) == [float(x) for x in p]
    assert seen == paths


def test_needs_review_judges_the_confidence_as_the_report_shows_it(tiny_models: Path) -> None:
    # A confidence of 0.5999996 is printed 0.600000: below a 0.6 threshold only unrounded, and the
    # row would contradict its own rule ("needs review below the threshold"), as refer once did.
    gate, classifier = load_models(tiny_models, "cpu")
    screener = Screener(gate, classifier)
    assert classifier.spec.threshold == 0.6
    for top, expected in ((0.6 - 4e-7, False), (0.6 - 6e-7, True)):
        result = Result(Path("film.png"), "error")
        rest = (1.0 - top) / 3
        screener._fill(result, np.array([top, rest, rest, rest]), None, None)
        shown = screener.record(result).confidence  # as the report prints it
        assert result.needs_review is expected and (shown < 0.6) is expected


def test_the_gate_decides_on_its_score_as_the_report_prints_it(tiny_models: Path, tmp_path: Path) -> None:
    # 0.4999996 is printed 0.500000: rejected at a 0.5 threshold, the row contradicted itself.
    gate, classifier = load_models(tiny_models, "cpu")

    class Scoring(Screener):
        below = 0.0

        def gate_scores(self, batch: np.ndarray) -> np.ndarray:
            return np.full(len(batch), gate.spec.threshold - self.below)

    screener = Scoring(gate, classifier)
    film = screener.decode(grey_image(tmp_path / "film.png", 110))
    for below, status in ((4e-7, CLASSIFIED), (6e-7, REJECTED)):
        screener.below = below
        [result] = screener.infer([film])
        shown = screener.record(result).gate_score
        assert result.status == status and shown is not None
        assert (shown >= gate.spec.threshold) is (status == CLASSIFIED)


def _with_nan(path: Path, initializer: str, index: int | None = None) -> None:
    """Make a tiny model give NaN: one of its initializers' values (or all of them) becomes NaN."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    for init in model.graph.initializer:
        if init.name == initializer:
            values = numpy_helper.to_array(init).copy()
            values.flat[slice(None) if index is None else index] = np.nan
            init.CopyFrom(numpy_helper.from_array(values, initializer))
    onnx.save(model, path)


@pytest.mark.parametrize(("model", "initializer", "index"), [("classifier", "b", 0), ("gate", "bias", None)])
def test_a_model_that_gives_nan_makes_error_rows_not_cleared_films(
    tiny_models: Path, incoming: Path, model: str, initializer: str, index: int | None
) -> None:
    # NaN compares false with every threshold: a damaged classifier's films were labelled COVID19,
    # not referred and not in need of review (cleared unseen), and a damaged gate's films rejected.
    _with_nan(tiny_models / f"{model}.onnx", initializer, index)
    gate, classifier = load_models(tiny_models, "cpu")
    results, summary = screen_all(Screener(gate, classifier, batch_size=3), _paths(incoming))
    readable = [r for r in results if r.path.name != "f_broken.jpg"]
    if model == "gate":
        assert all(r.status == ERROR and r.gate_score is None for r in readable)
    else:  # the photo is still rejected by the gate, which gives numbers
        assert [r.path.name for r in readable if r.status == REJECTED] == ["e_photo.png"]
        readable = [r for r in readable if r.status != REJECTED]
    message = f"the {model} gave no number for its {'probabilities' if model == 'classifier' else 'score'} (NaN"
    assert len(readable) >= 4 and all(r.error and r.error.startswith(message) and r.refer is None for r in readable)
    assert summary.by_status[ERROR] == len(readable) + 1 and summary.by_status[CLASSIFIED] == 0
