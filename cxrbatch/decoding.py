"""Decode files into both models' inputs: in the calling thread, or in a pool of processes.

`Decoder` is the run's one decode: the file read once (`imaging.load_image`, JPEGs at draft
scale), each model's input made from it as its `InputSpec` says, and every way a file can fail
turned into an error message. The screening threads call it themselves by default.

`DecodePool` runs it in separate processes instead (`cxrbatch run --decoders N`). Decoding is
mostly C that releases the GIL, but not all of it: in threads about an eighth of a JPEG's decode
holds the GIL (`benchmarks/threads.py`), which caps decoding threads at a few thousand files a
second on any number of cores, and a GPU fed by a many-core machine can take more. A process
sends its batch back as uint8 (a quarter of float32's bytes); this process only unpickles it.

A decoding process can die on a file (a decoder's fault on hostile data, the kernel's OOM
killer). The run goes on: the batch it was decoding, and any other batch in flight on the pool it
took down, is decoded again one file at a time in a private process, so that only the file that
kills a process alone becomes an error row. In threads the same fault would end the whole run.

Processes that cannot start at all (no fork server or spawn here, the process limit reached, a
script without the `if __name__ == "__main__":` guard that multiprocessing needs) are no reason
to lose a night: the pool says so once and the screening threads decode, as without `--decoders`.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbatch.errors import ImageError
from cxrbatch.heatmaps import display_copy
from cxrbatch.imaging import InputSpec, check_size, load_image, model_pixels
from cxrbatch.ledger import crash_point

log = logging.getLogger(__name__)

CRASHED = "the decoding process died on this file (a decoder fault on its data?); it was not screened"


@dataclass
class Decoded:
    """One file read into both models' inputs, or the reason it could not be."""

    path: Path
    gate_input: np.ndarray | None = None  # float32, or uint8 on its way back from a decoding process
    classifier_input: np.ndarray | None = None
    error: str | None = None
    picture: Image.Image | None = None  # a small copy for drawing a heatmap, kept only when asked

    def as_float(self) -> Decoded:
        """The model inputs as the models take them (float32, values 0..255)."""
        if self.gate_input is None or self.classifier_input is None:
            return self
        return replace(
            self,
            gate_input=self.gate_input.astype(np.float32, copy=False),
            classifier_input=self.classifier_input.astype(np.float32, copy=False),
        )


@dataclass(frozen=True)
class Decoder:
    """How one file becomes both models' inputs; picklable, so a process can hold one."""

    gate: InputSpec
    classifier: InputSpec
    draft_size: int | None
    transform: Callable[[Image.Image], Image.Image] | None = None  # evaluation's stress tests only

    def __call__(self, path: Path, picture: bool = False) -> Decoded:
        """Read one file into float32 model inputs (and a small picture when asked), or an error."""
        return self.pixels(path, picture).as_float()

    def pixels(self, path: Path, picture: bool = False) -> Decoded:
        """As calling it, with the inputs left as uint8."""
        try:
            img = load_image(path, draft_size=self.draft_size)
            check_size(img)
            if self.transform is not None:
                img = self.transform(img)
            return Decoded(
                path,
                model_pixels(img, self.gate),
                model_pixels(img, self.classifier),
                picture=display_copy(img) if picture else None,
            )
        except ImageError as exc:
            return Decoded(path, error=str(exc))
        except Exception as exc:  # one odd file must not end the night's run; it becomes an error row
            log.debug("unexpected failure decoding %s", path, exc_info=True)
            return Decoded(path, error=f"unexpected decoder failure ({type(exc).__name__}: {exc})")


class DecodePool:
    """`processes` decoding processes shared by the screening threads; `decode` is thread-safe."""

    def __init__(self, decoder: Decoder, processes: int) -> None:
        if processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.decoder, self.processes = decoder, processes
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # how many pools a dead process has taken down so far
        self.unavailable = False  # processes could not start here: the calling threads decode

    def decode(self, paths: list[Path], picture: bool = False) -> list[Decoded]:
        """Decode a batch in one of the processes; the results in the order of `paths`."""
        try:
            pool, generation = self._current()
        except _CannotStart:
            return [self.decoder(p, picture) for p in paths]
        try:
            decoded = pool.submit(_decode_here, paths, picture).result()
        except BrokenProcessPool:
            self._discard(generation)
            return self._one_by_one(paths, picture)
        return [d.as_float() for d in decoded]

    def close(self) -> None:
        """Stop the processes (queued batches are dropped, running ones finish)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _current(self) -> tuple[ProcessPoolExecutor, int]:
        with self._lock:
            if self.unavailable:
                raise _CannotStart
            if self._pool is None:
                try:
                    self._pool = _started(self.decoder, self.processes)
                except _CannotStart as exc:
                    self.unavailable = True
                    log.warning("decoding processes could not start (%s): the screening threads decode instead", exc)
                    raise
            return self._pool, self._generation

    def _discard(self, generation: int) -> None:
        """Drop the pool a dead process broke; the first thread to see it does, the others find a
        new one already (each retries its own batch)."""
        with self._lock:
            if generation != self._generation:
                return
            self._generation += 1
            broken, self._pool = self._pool, None
        log.warning("a decoding process died: its batches are decoded again one file at a time")
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)

    def _one_by_one(self, paths: list[Path], picture: bool) -> list[Decoded]:
        """Each file in a private process of its own, one after another: a file that kills that
        process is the one to blame, and becomes an error row."""
        out: list[Decoded] = []
        pool: ProcessPoolExecutor | None = None
        try:
            for i, path in enumerate(paths):
                try:
                    pool = pool or _started(self.decoder, 1)
                except _CannotStart:
                    with self._lock:
                        self.unavailable = True
                    log.warning("decoding processes no longer start: the screening threads decode instead")
                    out += [self.decoder(p, picture) for p in paths[i:]]
                    break
                try:
                    out += pool.submit(_decode_here, [path], picture).result()
                except BrokenProcessPool:
                    log.error("%s: %s", path, CRASHED)
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = None
                    out.append(Decoded(path, error=CRASHED))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return [d.as_float() for d in out]


class _CannotStart(Exception):
    """Decoding processes cannot be started here."""


def _started(decoder: Decoder, processes: int) -> ProcessPoolExecutor:
    """`processes` running processes that hold `decoder`, started by a fork server where there is
    one (forking this process, with onnxruntime's threads running, is not safe), by spawning
    elsewhere; all of them answer once before any file is given to them, so that a pool that
    cannot start is not taken for a file that kills its process."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["cxrbatch.decoding"])  # each process starts with these imports done
    try:
        pool = ProcessPoolExecutor(processes, mp_context=context, initializer=_hold, initargs=(decoder,))
    except OSError as exc:
        raise _CannotStart(str(exc)) from None
    try:
        for probe in [pool.submit(_ready) for _ in range(processes)]:
            probe.result()
    except (BrokenProcessPool, OSError) as exc:
        pool.shutdown(wait=False, cancel_futures=True)
        raise _CannotStart(str(exc) or type(exc).__name__) from None
    return pool


def _ready() -> bool:
    return True


_held: Decoder | None = None  # in a decoding process: the decoder its pool gave it


def _hold(decoder: Decoder) -> None:
    global _held
    _held = decoder


def _decode_here(paths: list[Path], picture: bool) -> list[Decoded]:
    """In a decoding process: its decoder on each path, inputs left as uint8 for the trip back."""
    assert _held is not None, "a decoding process starts with its pool's decoder"
    out = []
    for path in paths:
        crash_point(f"decoding {path.name}")  # a process that dies on one file (crash tests only)
        out.append(_held.pixels(path, picture))
    return out
