"""Screen images: decode in worker threads, gate in batches, classify what the gate accepts.

Decoding of the next batches overlaps inference of the current one; at most `prefetch` batches
are decoded ahead, so memory stays bounded however large the folder is. Results come out in
input order, one per path, whatever happens to the file.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbatch.errors import ImageError, ModelError
from cxrbatch.heatmaps import class_map, display_copy, write_heatmap
from cxrbatch.imaging import check_size, load_image, to_model_input
from cxrbatch.models import Model

log = logging.getLogger(__name__)

CLASSIFIED, REJECTED, ERROR = "classified", "rejected", "error"
NORMAL = "NORMAL"  # the one label that is not a finding; used to pick "flagged" results
STATUSES = (CLASSIFIED, REJECTED, ERROR)


@dataclass
class Result:
    """The outcome for one input file."""

    path: Path
    status: str
    gate_score: float | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    needs_review: bool | None = None
    error: str | None = None
    heatmap: str | None = None

    @property
    def flagged(self) -> bool:
        """Worth a reviewer's look: classified as anything but NORMAL, or unsure."""
        return is_flagged(self.status, self.label, self.needs_review)


def is_flagged(status: str, label: str | None, needs_review: bool | None) -> bool:
    """The one rule for "flagged": a classified result whose label is not NORMAL, or that needs review."""
    return status == CLASSIFIED and (label != NORMAL or bool(needs_review))


@dataclass
class Summary:
    """Counts and speed of one run."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_label: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def files(self) -> int:
        return sum(self.by_status.values())

    @property
    def images_per_second(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else 0.0

    def add(self, result: Result) -> None:
        """Count one result."""
        self.count(result.status, result.label)

    def count(self, status: str, label: str | None) -> None:
        """Count one reported row."""
        self.by_status[status] += 1
        if label:
            self.by_label[label] += 1

    def line(self) -> str:
        """One human line: counts per status and label, and the rate."""
        statuses = ", ".join(f"{self.by_status[s]} {s}" for s in STATUSES)
        labels = ", ".join(f"{n} {label}" for label, n in sorted(self.by_label.items()))
        return (
            f"{self.files} files: {statuses}"
            + (f" ({labels})" if labels else "")
            + f" in {self.seconds:.1f} s, {self.images_per_second:.1f} images/s"
        )

    def as_dict(self) -> dict[str, object]:
        """The summary as plain data for the JSON report."""
        return {
            "files": self.files,
            "by_status": {s: self.by_status[s] for s in STATUSES},
            "by_label": dict(sorted(self.by_label.items())),
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 2),
        }


@dataclass
class Decoded:
    """One file read into both models' inputs, or the reason it could not be."""

    path: Path
    gate_input: np.ndarray | None = None
    classifier_input: np.ndarray | None = None
    error: str | None = None
    picture: Image.Image | None = None  # a small copy, kept only when heatmaps are drawn


class Screener:
    """Runs the gate and the classifier over many files with bounded, overlapped decoding."""

    def __init__(
        self,
        gate: Model,
        classifier: Model,
        batch_size: int = 32,
        workers: int = 2,
        draft: bool = True,
        prefetch: int = 2,
        heatmaps: Path | None = None,
        heatmaps_for: str = "all",
        transform: Callable[[Image.Image], Image.Image] | None = None,
    ) -> None:
        """`transform`, when given, changes every decoded picture before the model inputs are made
        (the stress tests of `cxrbatch evaluate`; never in a screening run)."""
        if batch_size < 1 or workers < 1:
            raise ValueError("batch_size and workers must be at least 1")
        self.gate, self.classifier = gate, classifier
        self.batch_size, self.workers, self.prefetch = batch_size, workers, prefetch
        specs = (gate.spec.input, classifier.spec.input)
        self.draft_size = max(max(s.height, s.width) for s in specs) if draft else None
        if heatmaps_for not in ("all", "flagged"):
            raise ValueError("heatmaps_for must be 'all' or 'flagged'")
        if heatmaps is not None and not classifier.spec.cam_output:
            raise ModelError("heatmaps need a classifier with a 'cam' output (export it with `cxrbatch export`)")
        self.heatmaps, self.heatmaps_for = heatmaps, heatmaps_for
        self.transform = transform

    def screen(self, paths: Iterable[Path], on_result: Callable[[Result], None] | None = None) -> Iterator[Result]:
        """Yield one Result per path, in order."""
        for decoded in self.decoded_batches(paths):
            for result in self.infer(decoded):
                if on_result is not None:
                    on_result(result)
                yield result

    def decoded_batches(self, paths: Iterable[Path]) -> Iterator[list[Decoded]]:
        """Decode paths in worker threads, `prefetch` batches ahead, and yield batches in order."""
        batches = _chunked(iter(paths), self.batch_size)
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode") as pool:
            pending: deque[list[Future[Decoded]]] = deque()
            for batch in islice(batches, self.prefetch):
                pending.append([pool.submit(self.decode, p) for p in batch])
            while pending:
                decoded = [f.result() for f in pending.popleft()]
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append([pool.submit(self.decode, p) for p in nxt])
                yield decoded

    def decode(self, path: Path) -> Decoded:
        """Read one file into both models' inputs, or an error message."""
        try:
            img = load_image(path, draft_size=self.draft_size)
            check_size(img)
            if self.transform is not None:
                img = self.transform(img)
            return Decoded(
                path,
                to_model_input(img, self.gate.spec.input),
                to_model_input(img, self.classifier.spec.input),
                picture=display_copy(img) if self.heatmaps is not None else None,
            )
        except ImageError as exc:
            return Decoded(path, error=str(exc))
        except Exception as exc:  # one odd file must not end the night's run; it becomes an error row
            log.debug("unexpected failure decoding %s", path, exc_info=True)
            return Decoded(path, error=f"unexpected decoder failure ({type(exc).__name__}: {exc})")

    def infer(self, decoded: list[Decoded]) -> list[Result]:
        """Gate a decoded batch, classify what passes, and return results in the same order."""
        results = [Result(d.path, ERROR, error=d.error) for d in decoded]
        ok = [i for i, d in enumerate(decoded) if d.error is None]
        if not ok:
            return results
        gate_scores = self.gate_scores(np.stack([decoded[i].gate_input for i in ok]))  # type: ignore[misc]
        accepted = []
        for i, score in zip(ok, gate_scores, strict=True):
            results[i].gate_score = float(score)
            if score >= self.gate.spec.threshold:
                accepted.append(i)
            else:
                results[i].status = REJECTED
        if accepted:
            clf_in = np.stack([decoded[i].classifier_input for i in accepted])  # type: ignore[misc]
            out = self.classify(clf_in, with_cam=self.heatmaps is not None)
            for k, (i, p) in enumerate(zip(accepted, out[self.classifier.spec.score_output], strict=True)):
                self._fill(results[i], p)
                if self.heatmaps is not None and (self.heatmaps_for == "all" or results[i].flagged):
                    cam = out[self.classifier.spec.cam_output or ""][k]
                    self._draw(results[i], decoded[i], cam)
        return results

    def gate_scores(self, batch: np.ndarray) -> np.ndarray:
        """The gate's score of each picture of a stacked batch of gate inputs, shape (N,)."""
        return self._run(self.gate, batch)[self.gate.spec.score_output][:, 0]

    def classify(self, batch: np.ndarray, with_cam: bool = False) -> dict[str, np.ndarray]:
        """The classifier's named outputs (probabilities, and the `cam` maps if asked) for a stacked batch."""
        return self._run(self.classifier, batch, with_cam=with_cam)

    def _run(self, model: Model, batch: np.ndarray, with_cam: bool = False) -> dict[str, np.ndarray]:
        """Run a model; on a GPU, pad every batch to the full batch size.

        A CUDA session tunes its kernels for each new input shape, and the classifier's batches
        shrink by whatever the gate rejected: one shape keeps that to once per run. Padding rows
        are zeros and are cut off again; on the CPU they would only cost time.
        """
        n = len(batch)
        if not model.on_gpu or n >= self.batch_size:
            return model.run(batch, with_cam=with_cam)
        padded = np.zeros((self.batch_size, *batch.shape[1:]), dtype=batch.dtype)
        padded[:n] = batch
        return {name: out[:n] for name, out in model.run(padded, with_cam=with_cam).items()}

    def _draw(self, result: Result, decoded: Decoded, cam: np.ndarray) -> None:
        assert self.heatmaps is not None and decoded.picture is not None and result.label is not None
        heat = class_map(cam, self.classifier.spec.labels.index(result.label))
        caption = f"{result.label} {result.confidence:.2f}" + (" (review)" if result.needs_review else "")
        result.heatmap = str(write_heatmap(self.heatmaps, result.path, decoded.picture, heat, caption))

    def _fill(self, result: Result, probs: np.ndarray) -> None:
        labels = self.classifier.spec.labels
        top = int(np.argmax(probs))
        result.status = CLASSIFIED
        result.label = labels[top]
        result.confidence = float(probs[top])
        result.probabilities = {label: float(p) for label, p in zip(labels, probs, strict=True)}
        result.needs_review = result.confidence < self.classifier.spec.threshold


def screen_all(
    screener: Screener, paths: list[Path], on_result: Callable[[Result], None] | None = None
) -> tuple[list[Result], Summary]:
    """Screen every path and return the results with a summary."""
    summary = Summary()
    started = time.perf_counter()
    results = []
    for result in screener.screen(paths, on_result):
        summary.add(result)
        results.append(result)
    summary.seconds = time.perf_counter() - started
    return results, summary


def _chunked(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    while chunk := list(islice(items, size)):
        yield chunk
