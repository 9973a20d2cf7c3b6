"""Screen images: decode, gate in batches, classify what the gate accepts.

`screen` gives each batch to one worker thread, which decodes its files and runs both models on
them; `workers` batches run side by side (one per usable core by default) and `prefetch` more wait
queued, so memory stays bounded however large the folder is. The models' sessions run one batch
on one core each (`load_models`): batches side by side did 196.5 images/s of inference on 2 cores
against 185.8 for one batch at a time on two intra-op threads (benchmarks/README.md), and
decoding and inference of different batches interleave with no hand-over between them. With
`decoders`, processes decode instead and each thread waits for its batch's inputs
(`cxrbatch.decoding`). Results come out in input order, one per path, whatever happens to the file.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from cxrbatch import sitecheck
from cxrbatch.cores import usable_cores
from cxrbatch.decoding import Decoded, DecodePool, Decoder
from cxrbatch.imaging import PREPROCESSING_VERSION
from cxrbatch.models import Model
from cxrbatch.records import (
    CLASSIFIED,
    DECIMALS,
    ERROR,
    REJECTED,
    Record,
    Summary,
    accepts,
    is_unfamiliar,
    referral_score,
    refers,
)

_T = TypeVar("_T")
# The gate's scores (N,) and the classifier's named outputs for the N readable files of a batch.
ModelOutputs = tuple[np.ndarray, dict[str, np.ndarray]]


@dataclass
class Result:
    """The outcome for one input file, as the screener finds it (`Screener.record` makes the report row)."""

    path: Path
    status: str
    gate_score: float | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    needs_review: bool | None = None
    error: str | None = None
    referral_score: float | None = None  # 1 - P(no finding) or a referral head's score: how much it asks for a reader
    refer: bool | None = None  # referral_score at or above the classifier's referral threshold
    familiarity: float | None = None  # distance of the film's features to the training films'
    unfamiliar: bool | None = None  # familiarity above the classifier's familiarity threshold
    # The pooled features, where the classifier serves them (`Model.features_output`): a tool's, never a report's.
    features: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_wire(self) -> str:
        """The result without its path as JSON, for another process (a Ray actor sends it to the
        driver); Python's float repr makes every score round-trip exactly."""
        return json.dumps({k: v for k, v in asdict(self).items() if k not in ("path", "features")})

    @classmethod
    def from_wire(cls, path: Path, text: str) -> Result:
        """The result `to_wire` sent, for `path`."""
        return cls(path=path, **json.loads(text))


class Screener:
    """Runs the gate and the classifier over many files with bounded, overlapped decoding."""

    def __init__(
        self,
        gate: Model,
        classifier: Model,
        batch_size: int = 32,
        workers: int | None = None,
        draft: bool = True,
        prefetch: int = 2,
        transform: Callable[[Image.Image], Image.Image] | None = None,
        decoders: int = 0,
    ) -> None:
        """`transform`, when given, changes every decoded picture before the model inputs are made
        (the stress tests of `cxrbatch evaluate`; never in a screening run). `workers` threads
        decode and screen batches side by side; None is one per usable core (`cxrbatch.cores`),
        or one per decoding process if there are more of those. With `decoders`, that many
        processes decode instead and the threads only screen (`cxrbatch.decoding`); `close` stops them."""
        if batch_size < 1 or (workers is not None and workers < 1) or decoders < 0:
            raise ValueError("batch_size and workers must be at least 1, decoders at least 0")
        workers = workers or max(usable_cores(), decoders)
        self.gate, self.classifier = gate, classifier
        self.batch_size, self.workers, self.prefetch = batch_size, workers, prefetch
        specs = (gate.spec.input, classifier.spec.input)
        draft_size = max(max(s.height, s.width) for s in specs) if draft else None
        self.decoder = Decoder(gate.spec.input, classifier.spec.input, draft_size, transform)
        self._pool = DecodePool(self.decoder, decoders) if decoders else None

    @property
    def draft_size(self) -> int | None:
        """The least size JPEGs are decoded at (None: full size)."""
        return self.decoder.draft_size

    @property
    def transform(self) -> Callable[[Image.Image], Image.Image] | None:
        """The stress test applied to every decoded picture, if any."""
        return self.decoder.transform

    def close(self) -> None:
        """Stop the decoding processes, if there are any."""
        if self._pool is not None:
            self._pool.close()

    def settings(self) -> dict[str, object]:
        """Every setting that can change a result: the ledger's run fingerprint is made of these.

        Worker threads change nothing (reports are byte-identical across them). Batch size is
        left out too, though how many films a batch holds can move a probability by 1e-6:
        onnxruntime's kernels add up a batch in an order that depends on its size (the gate
        rejecting some films shrinks the classifier's batch the same way). The device changes the
        last decimals (CUDA and CPU agree within about 3e-6). The CPU's own
        kernels are not in it: onnxruntime chooses them by instruction set, and its session
        options choose how they are fed (prepacked weights or not: up to 1e-6 on the bench films),
        so the sixth decimal can move between CPU machines and versions under one fingerprint.
        """
        return {
            "gate": self.gate.sha256,
            "classifier": self.classifier.sha256,
            "draft_size": self.draft_size,
            "preprocessing": PREPROCESSING_VERSION,
            "device": "cuda" if self.gate.on_gpu else "cpu",
            "transform": None if self.transform is None else str(self.transform),
        }

    def describe(self) -> dict[str, object]:
        """The engine that screened, for the JSON report: the decoding processes if they decoded
        (none if they never started), and why they could not start if that happened (the threads
        decoded from then on)."""
        described: dict[str, object] = {"name": "local", "threads": self.workers}
        if self._pool is not None:
            described["decoding_processes"] = self._pool.processes if self._pool.ran else 0
            if self._pool.unavailable is not None:
                described["decoding_processes_unavailable"] = self._pool.unavailable
        return described

    def screen(self, paths: Iterable[Path], on_result: Callable[[Result], None] | None = None) -> Iterator[Result]:
        """Yield one Result per path, in order."""
        for results in self._batchwise(paths, lambda batch: self.infer(self.decode_batch(batch))):
            for result in results:
                if on_result is not None:
                    on_result(result)
                yield result

    def decoded_batches(self, paths: Iterable[Path], pictures: bool = False) -> Iterator[list[Decoded]]:
        """Decode paths in worker threads and yield the batches in order, for a caller that runs
        the models itself; with `pictures`, each keeps a small copy of the picture for drawing on."""
        return self._batchwise(paths, lambda batch: self.decode_batch(batch, pictures))

    def model_outputs(self, paths: Iterable[Path]) -> Iterator[tuple[list[Decoded], ModelOutputs | None]]:
        """Both models on every readable file, whatever the gate says (evaluation scores them all),
        run in the worker threads: per batch in order, its decoded files and, for the readable ones
        in their order, the gate's scores and the classifier's outputs (None if none is readable)."""
        return self._batchwise(paths, self._model_outputs)

    def _model_outputs(self, batch: list[Path]) -> tuple[list[Decoded], ModelOutputs | None]:
        decoded = self.decode_batch(batch)
        good = [d for d in decoded if d.error is None]
        if not good:
            return decoded, None
        gate = self.gate_scores(np.stack([d.gate_input for d in good]))  # type: ignore[misc]
        return decoded, (gate, self.classify(np.stack([d.classifier_input for d in good])))  # type: ignore[misc]

    def class_maps(self, paths: Iterable[Path]) -> Iterator[tuple[Decoded, np.ndarray | None, np.ndarray | None]]:
        """Decode again and yield each file's small picture with the classifier's `cam` maps
        (h x w x labels) and its probabilities now (to tell whether the file is still the one that
        was screened), or None for both for a file that can no longer be decoded (`error` says why)."""
        for mapped in self._batchwise(paths, self._class_maps):
            yield from mapped

    def _class_maps(self, batch: list[Path]) -> list[tuple[Decoded, np.ndarray | None, np.ndarray | None]]:
        name = self.classifier.spec.require_cam()
        decoded = self.decode_batch(batch, picture=True)
        ok = [d for d in decoded if d.error is None]
        if not ok:
            return [(d, None, None) for d in decoded]
        out = self.classify(np.stack([d.classifier_input for d in ok]), with_cam=True)  # type: ignore[misc]
        probs = out[self.classifier.spec.score_output]
        by_path = {d.path: (m, p) for d, m, p in zip(ok, out[name], probs, strict=True)}
        return [(d, *by_path.get(d.path, (None, None))) for d in decoded]

    def _batchwise(self, paths: Iterable[Path], work: Callable[[list[Path]], _T]) -> Iterator[_T]:
        """`work` on each batch of paths in the worker threads, `workers` batches side by side and
        `prefetch` more queued; the outputs in input order. A consumer that stops early (or a
        batch that raises) cancels the queued batches and waits only for the running ones."""
        batches = _chunked(iter(paths), self.batch_size)
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="screen")
        ahead = islice(batches, self.workers + self.prefetch)
        pending: deque[Future[_T]] = deque(pool.submit(work, b) for b in ahead)
        try:
            while pending:
                done = pending.popleft().result()
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append(pool.submit(work, nxt))
                yield done
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def decode(self, path: Path, picture: bool = False) -> Decoded:
        """Read one file into both models' inputs (and a small picture when asked), or an error message."""
        return self.decoder(path, picture)

    def decode_batch(self, paths: list[Path], picture: bool = False) -> list[Decoded]:
        """`decode` on each path, in the decoding processes if there are any, else in this thread."""
        if self._pool is not None:
            return self._pool.decode(paths, picture)
        return [self.decode(p, picture) for p in paths]

    def infer(self, decoded: list[Decoded]) -> list[Result]:
        """Gate a decoded batch, classify what passes, and return results in the same order."""
        results = [Result(d.path, ERROR, error=d.error) for d in decoded]
        ok = [i for i, d in enumerate(decoded) if d.error is None]
        if not ok:
            return results
        gate_scores = self.gate_scores(np.stack([decoded[i].gate_input for i in ok]))  # type: ignore[misc]
        accepted = []
        for i, score in zip(ok, gate_scores, strict=True):
            if not np.isfinite(score):  # NaN compares false with every threshold: it would reject unseen
                results[i].error = _no_number("gate", "its score")
                continue
            results[i].gate_score = float(score)
            if accepts(self.gate.spec, float(score)):
                accepted.append(i)
            else:
                results[i].status = REJECTED
        if accepted:
            clf_in = np.stack([decoded[i].classifier_input for i in accepted])  # type: ignore[misc]
            out = self.classify(clf_in)
            spec = self.classifier.spec
            familiarity, referral = out.get(spec.familiarity_output or ""), out.get(spec.referral_output or "")
            feats = out.get(self.classifier.features_output or "")
            for k, (i, p) in enumerate(zip(accepted, out[spec.score_output], strict=True)):
                if feats is not None:
                    results[i].features = feats[k]
                fam = None if familiarity is None else float(np.ravel(familiarity[k])[0])
                ref = None if referral is None else float(np.ravel(referral[k])[0])
                # NaN is neither referred nor in need of review: the film would be cleared unseen
                named = (("its probabilities", float(p.sum())), ("its familiarity", fam), ("its referral score", ref))
                broken = [what for what, v in named if v is not None and not np.isfinite(v)]
                if broken:
                    results[i].status, results[i].error = ERROR, _no_number("classifier", " and ".join(broken))
                    continue
                self._fill(results[i], p, fam, ref)
        return results

    def record(self, result: Result) -> Record:
        """The report row of a result, with the short hashes of both models."""
        return Record.of(
            result.path,
            result.status,
            self.gate.short_hash,
            self.classifier.short_hash,
            gate_score=result.gate_score,
            label=result.label,
            confidence=result.confidence,
            probabilities=result.probabilities,
            needs_review=result.needs_review,
            error=result.error,
            referral_score=result.referral_score,
            refer=result.refer,
            familiarity=result.familiarity,
            unfamiliar=result.unfamiliar,
        )

    def summary(self, records: list[Record], **run: object) -> Summary:
        """The counts of a run's reported rows (`run`: found, screened, reused, seconds), with
        the site check of those rows against this classifier's reference films."""
        return Summary.of(records, **run, site=sitecheck.of_run(records, self.classifier))

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

    def _fill(self, result: Result, probs: np.ndarray, familiarity: float | None, referral: float | None) -> None:
        spec = self.classifier.spec
        top = int(np.argmax(probs))
        result.status = CLASSIFIED
        result.label = spec.labels[top]
        result.confidence = float(probs[top])
        result.probabilities = {label: float(p) for label, p in zip(spec.labels, probs, strict=True)}
        result.referral_score = referral_score(spec, probs, referral)
        result.refer = refers(spec, result.referral_score)
        if familiarity is not None and spec.familiarity_threshold is not None:
            result.familiarity = familiarity
            result.unfamiliar = is_unfamiliar(spec, familiarity)
        # below the threshold as the report shows the confidence, as refer and unfamiliar are judged
        result.needs_review = round(result.confidence, DECIMALS) < spec.threshold or bool(result.unfamiliar)


def _no_number(model: str, what: str) -> str:
    """An error row's message for a film that a model gave NaN or an infinity for."""
    return f"the {model} gave no number for {what} (NaN or infinite): is the model file damaged?"


def screen_all(
    screener: Screener, paths: list[Path], on_result: Callable[[Result], None] | None = None
) -> tuple[list[Result], Summary]:
    """Screen every path and return the results with a summary."""
    started = time.perf_counter()
    results = list(screener.screen(paths, on_result))
    seconds = time.perf_counter() - started
    return results, screener.summary([screener.record(r) for r in results], screened=len(results), seconds=seconds)


def _chunked(items: Iterator[Path], size: int) -> Iterator[list[Path]]:
    while chunk := list(islice(items, size)):
        yield chunk
