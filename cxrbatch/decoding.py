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

Processes that cannot start (the process limit reached, a script without the
`if __name__ == "__main__":` guard that multiprocessing needs, a start that takes longer than
`START_TIMEOUT_S`) are no reason to lose a night: the run warns and the screening threads decode,
with the same results. The processes ignore Ctrl-C (this process stops them) and end themselves
when this process ends, however it ends, so a killed run leaves none behind.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
from PIL import Image

from cxrbatch.crashes import crash_point
from cxrbatch.errors import ImageError
from cxrbatch.heatmaps import display_copy
from cxrbatch.imaging import NOT_THE_FILE, check_size, load_image
from cxrbatch.modelinput import InputSpec, model_pixels

log = logging.getLogger(__name__)

CRASHED = "the decoding process died on this file (a decoder fault on its data?); it was not screened"
OUT_OF_MEMORY = f"out of memory while decoding (the process's memory limit: ulimit -v, the container's): {NOT_THE_FILE}"
START_TIMEOUT_S = 60.0  # for every decoding process of a pool to start and answer


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
        except MemoryError:  # `ulimit -v`, a container's limit: this film alone is not screened tonight
            return Decoded(path, error=OUT_OF_MEMORY)
        except Exception as exc:  # one odd file must not end the night's run; it becomes an error row
            log.debug("unexpected failure decoding %s", path, exc_info=True)
            return Decoded(path, error=f"unexpected decoder failure ({type(exc).__name__}: {exc})")


class DecodePool:
    """`processes` decoding processes shared by the screening threads; `decode` is thread-safe."""

    def __init__(self, decoder: Decoder, processes: int) -> None:
        if processes < 1:
            raise ValueError("a decode pool needs at least one process")
        self.decoder, self.processes = decoder, processes
        self._lock = threading.RLock()  # `_give_up` takes it again while `_current` holds it
        self._pool: ProcessPoolExecutor | None = None
        self._generation = 0  # how many pools a dead process has taken down so far
        self.unavailable: str | None = None  # why processes could not start here (the calling threads decode)
        self.ran = False  # whether processes started here and were given files
        self._closed = False

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
            decoded = self._one_by_one(paths, picture)
        return [d.as_float() for d in decoded]

    def close(self) -> None:
        """Stop the processes (queued batches are dropped, running ones finish); for good: a
        later `decode` decodes in the calling thread."""
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _current(self) -> tuple[ProcessPoolExecutor, int]:
        with self._lock:
            if self.unavailable is not None or self._closed:
                raise _CannotStart
            if self._pool is None:
                try:
                    self._pool = _started(self.decoder, self.processes)
                except _CannotStart as exc:
                    self._give_up(exc)
                    raise
                self.ran = True
            return self._pool, self._generation

    def _give_up(self, why: _CannotStart) -> None:
        """From now on the calling threads decode; the first to find out says so."""
        with self._lock:
            first = self.unavailable is None
            if first:
                self.unavailable = str(why)
        if first:
            log.warning("decoding processes could not start (%s): the screening threads decode instead", why)

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
        process is the one to blame, and becomes an error row (inputs left as uint8, as a batch
        comes back from a process)."""
        out: list[Decoded] = []
        pool: ProcessPoolExecutor | None = None
        try:
            for i, path in enumerate(paths):
                try:
                    pool = pool or _started(self.decoder, 1)
                except _CannotStart as exc:
                    self._give_up(exc)
                    out += [self.decoder.pixels(p, picture) for p in paths[i:]]
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
        return out


def _started(decoder: Decoder, processes: int) -> ProcessPoolExecutor:
    """`processes` running processes that hold `decoder`, started by a fork server where there is
    one (forking this process, with onnxruntime's threads running, is not safe), by spawning
    elsewhere. Each of them answers once before any file is given to them (a barrier holds every
    answer until all have started), so that a pool that cannot start is not taken for a file that
    kills its process; one that cannot is stopped, its processes killed, and `_CannotStart` raised."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload(["cxrbatch.decoding"])  # each process starts with these imports done
    pool: ProcessPoolExecutor | None = None
    # The fork server and multiprocessing's resource tracker, started here, keep the signal mask they
    # are started with: a closed terminal's hangup, which reaches the whole process group, killed them
    # (a dead pool, and the tracker's tracebacks) before the run could stop its processes itself.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        everyone = context.Barrier(processes)
        pool = ProcessPoolExecutor(
            processes, mp_context=context, initializer=_hold, initargs=(decoder, everyone, _logging_here())
        )
        for probe in [pool.submit(_ready, START_TIMEOUT_S) for _ in range(processes)]:
            probe.result(timeout=START_TIMEOUT_S)
        return pool
    # BrokenProcessPool: a process died starting; OSError: no fork or pipe; EOFError: the fork server
    # died (it could not fork); a broken barrier or a timeout: a process never came up
    except (BrokenProcessPool, OSError, EOFError, threading.BrokenBarrierError, FutureTimeout) as exc:
        if pool is not None:
            _stop(pool)
        raise _CannotStart(str(exc) or type(exc).__name__) from None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a hangup meanwhile is heard now


def _stop(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's processes and let it go (one that did not start, or is broken)."""
    for process in list(getattr(pool, "_processes", {}).values()):  # not public; no other way to reach them
        try:
            process.kill()
        except (OSError, ValueError):
            pass
    pool.shutdown(wait=False, cancel_futures=True)


class _CannotStart(Exception):
    """Decoding processes cannot be started here."""


_held: Decoder | None = None  # in a decoding process: the decoder its pool gave it


def _logging_here() -> tuple[int, logging.Formatter | None]:
    """This process's log level and format (its root logger's first formatter, if it can travel
    to another process), so that a decoding process logs as the run does: the command line's
    timestamped lines (`cxrbatch.logs`), and its debug lines with -v."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    try:
        pickle.dumps(formatter)
    except Exception:  # a caller's own formatter may hold anything; then the default format
        formatter = None
    return root.level, formatter


def _hold(decoder: Decoder, everyone: threading.Barrier, logs: tuple[int, logging.Formatter | None]) -> None:
    """A decoding process's start: keep the decoder, log as the screening process does, ignore
    Ctrl-C and a hangup (the screening process stops its processes itself), and end when the
    screening process ends, even by kill -9."""
    global _held, _everyone
    _held, _everyone = decoder, everyone
    level, formatter = logs
    if formatter is not None:
        handler = logging.StreamHandler()  # stderr, which the process shares with the run
        handler.setFormatter(formatter)
        logging.getLogger().handlers[:] = [handler]
    logging.getLogger().setLevel(level)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a closed terminal's hangup reaches the whole group
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_end_with, args=(parent.sentinel,), daemon=True).start()


_everyone: threading.Barrier | None = None


def _end_with(sentinel: int) -> None:
    wait([sentinel])
    os._exit(1)


def _ready(timeout: float) -> bool:
    """A probe: answers once every process of the pool has started (each answers one probe)."""
    assert _everyone is not None
    _everyone.wait(timeout)
    return True


def _decode_here(paths: list[Path], picture: bool) -> list[Decoded]:
    """In a decoding process: its decoder on each path, inputs left as uint8 for the trip back."""
    assert _held is not None, "a decoding process starts with its pool's decoder"
    out = []
    for path in paths:
        crash_point(f"decoding {path.name}")  # a process that dies on one file (crash tests only)
        out.append(_held.pixels(path, picture))
    return out
