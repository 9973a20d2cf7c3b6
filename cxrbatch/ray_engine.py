"""Screening on a Ray cluster: `cxrbatch run --engine ray`, beside the local engine of `pipeline`.

The driver (the `cxrbatch run` process) finds the files, keeps the ledger and writes the reports,
exactly as for a local run: `RayScreener` is a `Screener` whose `screen` sends the work to a Ray
Data pipeline instead of decoding in threads. Each actor of that pipeline holds one `Screener`
(both onnxruntime sessions, made from the model bytes the driver sends, so the nodes need no
models folder) and screens its files with its own `screen`: the preprocessing exists once. An
item sent to an actor is one inference batch of the local engine (`batch_items`: the same files
together, by absolute path), so both engines give the same results to the last decimal.
Results come back as JSON (`Result.to_wire`) and are passed on as they arrive (a lost block's
files last), through the runner's ledger commits and report writers like the local engine's; the
reports put the rows back in input order. What an actor logs at warning level or above comes back
with its results and is logged again by the driver.

Failures: Ray restarts a dead actor and retries its task (`RETRIES` times). A block that fails
every retry is left out by Ray Data rather than ending the run; its files are sent again one per
block, and a file that fails that too becomes one error row (not stored as a result, so the next
ledger run tries it again). Heatmaps are drawn on the driver, from the shared files.

Nothing here imports ray before a Ray run starts; without the extra it is an `ExtraMissing`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch.crashes import crash_point
from cxrbatch.errors import DeviceError, EngineError, ExtraMissing, UsageError
from cxrbatch.models import CPU, CUDA, Model, model_from_bytes
from cxrbatch.pipeline import Result, Screener
from cxrbatch.records import ERROR, plural

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "cxrbatch[ray]" (in a source checkout: pip install -e ".[ray]")'
AUTH_HINT = "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here"
CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster's head to answer
# What a gRPC server (a cluster's GCS, or Ray Client) answers first to an HTTP/2 client: a
# SETTINGS frame (type 4, the fourth byte of its 9-byte frame header).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_FRAME = 4
# Files per Ray block, in inference batches: one batch per block spent a quarter of a 2,000-film
# run on blocks' round trips (105 images/s on 2 CPUs, against 136 with 4 and 140 with 16); small
# blocks keep the actors evenly busy and a lost block cheap to send again.
BLOCK_BATCHES = 4
RETRIES = 2  # task retries on a restarted actor before Ray Data gives a block up
ACTOR_WORKERS = 2  # worker threads of an actor without --workers (a GPU actor takes a CPU for each)
LOST = "screening failed on the Ray cluster in every attempt (a worker died on this file; see the Ray logs)"


def _import_ray() -> Any:
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise ExtraMissing(f"--engine ray needs the ray extra (ray[data] is not installed): {INSTALL_HINT}")
    try:
        import ray
        import ray.data
    except ImportError as exc:  # a plain `pip install ray`: Ray Data's own dependencies (pandas, pyarrow) missing
        raise ExtraMissing(
            f"--engine ray needs the ray extra ({exc.name or exc} is not installed): {INSTALL_HINT}"
        ) from None
    return ray


@contextmanager
def session(
    gate: Model,
    classifier: Model,
    batch_size: int,
    draft: bool,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float = 0.0,
    workers: int | None = None,
) -> Iterator[RayScreener]:
    """A RayScreener on the cluster at `address` (or RAY_ADDRESS); without either, on a local Ray
    instance sized to this machine, shut down again afterwards. In a process already connected
    to Ray (a test, a notebook), that connection is used and left open. `workers` is each actor's
    worker threads (None: ACTOR_WORKERS), not this machine's."""
    workers = workers or ACTOR_WORKERS
    ray = _import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    host_port = None if address in (None, "auto") else _host_port(address)
    started_here = not ray.is_initialized()
    with _stdout_to_stderr():
        if started_here:
            if host_port is not None:
                _check_reachable(*host_port)  # ray.init waits for an unreachable head for ever
            _connect(ray, address)
        try:
            _configure_data(ray)
            count = actor_count(ray.cluster_resources(), actors, gpus_per_actor, actor_cpus(gpus_per_actor, workers))
            yield RayScreener(gate, classifier, batch_size, draft, count, gpus_per_actor, workers)
        finally:
            if started_here:
                ray.shutdown()


@contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send what Ray prints to stdout (a dead worker's `(raylet) ...` lines, whatever
    `log_to_driver` says) to stderr while the session lasts: stdout may be carrying a report. The
    run writes its stdout report to the stream it found when it started (`runner.Report`)."""
    kept = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = kept


def _connect(ray: Any, address: str | None) -> None:
    where = f"the Ray cluster at {address}" if address else "a local Ray instance"
    ours = signal.getsignal(signal.SIGTERM)  # Ray puts its own in place (exit 15); the command's comes back
    try:
        ray.init(
            address=address or "local",  # never a cluster someone started here with `ray start`, unasked
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=log.isEnabledFor(logging.DEBUG),  # workers' own output only with --verbose
        )
    except Exception as exc:  # ray raises ConnectionError, RuntimeError or its own types
        hint = "" if address is None or os.environ.get("RAY_AUTH_MODE") else AUTH_HINT
        raise EngineError(f"cannot connect to {where}: {type(exc).__name__}: {exc}{hint}") from None
    except SystemExit as stop:  # SIGTERM while Ray starts: its handler exits 15; the command's code is 143
        raise SystemExit(128 + signal.SIGTERM if stop.code == signal.SIGTERM else stop.code) from None
    finally:
        if callable(ours) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, ours)
    log.info("connected to %s (%s)", where, _resources_text(ray.cluster_resources()))


def _host_port(address: str) -> tuple[str, int]:
    """The host and port of a cluster address, `HOST:PORT`. Ray Client (`ray://`) is refused: a
    Ray Data pipeline fails through it (AttributeError inside Ray, ray 2.60)."""
    if address.startswith("ray://"):
        raise UsageError(
            f"--ray-address {address!r}: Ray Client addresses cannot run this engine's Ray Data pipeline; "
            "run cxrbatch on a node of the cluster with the head's address, HOST:6379"
        )
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray-address {address!r}: expected HOST:PORT (the head's GCS port, 6379 by default)")
    return host.strip("[]"), int(port)


def _check_reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail at once, with the reason, when nothing listens at a cluster's address, or something
    that is not a gRPC server does (the dashboard's port, a web server): ray.init retries such an
    address for ever. (With TLS, RAY_USE_TLS, only the connection is checked.)"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
                return
            conn.sendall(HTTP2_PREFACE)
            head = b""
            while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
                head += chunk
    except OSError as exc:
        reason = exc.strerror or exc
        raise EngineError(
            f"cannot reach the Ray cluster at {host}:{port}: {reason} (is `ray start --head` running there?)"
        ) from None
    if len(head) < 9 or head[3] != SETTINGS_FRAME:
        raise EngineError(
            f"{host}:{port} answers, but not as a Ray cluster: give the head's GCS port (6379 by default; "
            "not the dashboard's 8265)"
        )


def _configure_data(ray: Any) -> None:
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's own plan and progress lines only with --verbose
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results arrive nearly in input order
    context.max_errored_blocks = -1  # a block that fails every retry is sent again file by file
    context.enable_progress_bars = False  # the run has its own progress bar and log lines


def _resources_text(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs"


def actor_cpus(gpus_per_actor: float, workers: int) -> int:
    """The CPUs one actor takes: a CPU actor one (its worker threads take turns on it, one decoding
    while another runs the models), a GPU actor one per worker thread (`--workers`), to keep its
    GPU share fed."""
    return workers if gpus_per_actor > 0 else 1


def actor_count(resources: dict[str, float], asked: int | None, gpus_per_actor: float, cpus_per_actor: int) -> int:
    """How many actors to start: what was asked if the cluster has room for it, else as many as
    its CPUs (`cpus_per_actor` each) and, for GPU actors, its GPUs allow."""
    cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    room = cpus // cpus_per_actor
    if gpus_per_actor > 0:
        if gpus < gpus_per_actor:
            raise EngineError(f"--gpus-per-actor {gpus_per_actor:g}: the Ray cluster has {gpus:g} GPUs")
        room = min(room, math.floor(gpus / gpus_per_actor + 1e-9))
    if room < 1:
        raise EngineError(f"the Ray cluster has no room for an actor ({_resources_text(resources)})")
    if asked is None:
        return room
    if asked > room:
        raise UsageError(f"--actors {asked}: the Ray cluster has room for {room} ({_resources_text(resources)})")
    return asked


class RayScreener(Screener):
    """A Screener whose `screen` runs in Ray Data actors; everything else happens on the driver."""

    def __init__(
        self,
        gate: Model,
        classifier: Model,
        batch_size: int,
        draft: bool,
        actors: int,
        gpus_per_actor: float = 0.0,
        workers: int = 1,
    ) -> None:
        super().__init__(gate, classifier, batch_size, workers, draft)
        self.actors, self.gpus_per_actor = actors, gpus_per_actor
        self._models_ref: Any = None
        self.started = 0  # the most actors a pipeline of this run started

    def settings(self) -> dict[str, object]:
        """As the local engine's, with the device the actors run on (the driver's does not matter)."""
        return {**super().settings(), "device": "cuda" if self.gpus_per_actor > 0 else "cpu"}

    def describe(self) -> dict[str, object]:
        return {"name": "ray", "actors": self.started, "gpus_per_actor": self.gpus_per_actor}

    def screen(self, paths: Iterable[Path], on_result: Callable[[Result], None] | None = None) -> Iterator[Result]:
        """Yield one Result per path as the actors deliver them: in input order, except that the
        files of a lost block come after the others (screened again one by one). Nothing waits
        behind a lost block, so a ledger commits every result as it arrives; callers that report
        put rows back in input order."""
        paths = list(paths)
        seen: set[int] = set()

        def passed(index: int, result: Result) -> Iterator[Result]:
            if index not in seen:  # a block delivered twice counts once
                seen.add(index)
                if on_result is not None:
                    on_result(result)
                yield result

        for index, result in self._results(
            paths, batch_items(paths, range(len(paths)), self.batch_size), BLOCK_BATCHES
        ):
            yield from passed(index, result)
        lost = [i for i in range(len(paths)) if i not in seen]
        if lost:
            log.warning("%s lost on the cluster: screening them again one by one", plural(len(lost), "file"))
            for index, result in self._results(paths, batch_items(paths, lost, 1), 1):
                yield from passed(index, result)
        for index in [i for i in range(len(paths)) if i not in seen]:
            log.error("%s: %s", paths[index], LOST)
            yield from passed(index, Result(paths[index], ERROR, error=LOST))

    def _results(self, paths: list[Path], items: list[dict[str, Any]], per_block: int) -> Iterator[tuple[int, Result]]:
        """Screen the `batch_items` on the cluster, `per_block` of them a block; yield (index,
        result) as blocks finish."""
        if not items:
            return
        import ray

        blocks = math.ceil(len(items) / per_block)
        self.started = max(self.started, min(self.actors, blocks))
        with warnings.catch_warnings():  # retries have no named parameter yet (ray 2.60): pinned below 2.64
            warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
            data = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
                _ScreenActor,
                fn_constructor_kwargs=self._actor_setup(ray),
                batch_size=per_block,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(
                    size=min(self.actors, blocks),
                    # file by file, one task at a time: an actor that dies takes only its own file
                    max_tasks_in_flight_per_actor=None if per_block > 1 else 1,
                ),
                num_cpus=actor_cpus(self.gpus_per_actor, self.workers),
                num_gpus=self.gpus_per_actor,
                max_restarts=-1,
                max_task_retries=RETRIES,  # Ray Data's default is to retry for ever
            )
        try:
            for batch in data.iter_batches(batch_size=None, batch_format="numpy"):
                for index, text, logged in zip(batch["index"], batch["result"], batch["logs"], strict=True):
                    for level, message in json.loads(str(logged)):  # what the actor logged (a decoder's warning)
                        log.log(level, "%s", message)
                    yield int(index), Result.from_wire(paths[int(index)], str(text))
        except Exception as exc:  # the pipeline itself failed (an actor that cannot start, say)
            raise EngineError(f"the Ray run failed: {type(exc).__name__}: {exc}") from None

    def _actor_setup(self, ray: Any) -> dict[str, Any]:
        if self._models_ref is None:  # once per run, in the object store; held here while actors may restart
            files = {m.spec.role: (m.path.name, _same_bytes(m)) for m in (self.gate, self.classifier)}
            self._models_ref = ray.put(files)
        cpus = actor_cpus(self.gpus_per_actor, self.workers)
        return {
            "models": [self._models_ref],  # in a list: the actor fetches it, Ray does not inline it in its arguments
            "providers": [CUDA, CPU] if self.gpus_per_actor > 0 else [CPU],
            "threads": cpus,
            "batch_size": self.batch_size,
            "workers": self.workers,  # a CPU actor's threads take turns on its CPU: one decodes, one infers
            "draft": self.draft_size is not None,
        }


def batch_items(paths: list[Path], indices: Sequence[int], batch_size: int) -> list[dict[str, Any]]:
    """The Ray items for paths[i] of `indices`: one per inference batch of the local engine (the
    same files together, so a result is the same to the last decimal, which batch composition
    moves), each its first index and its paths made absolute (an actor's working folder is its
    own) as bytes joined by NUL, which no file name holds. Consecutive indices only share an item."""
    items: list[dict[str, Any]] = []
    for position in range(0, len(indices), batch_size):
        chunk = indices[position : position + batch_size]
        if list(chunk) != list(range(chunk[0], chunk[0] + len(chunk))):
            raise ValueError("batch_items takes consecutive indices per batch")
        # absolute, but `link/..` kept: the kernel follows the link first (os.path.abspath did not)
        names = b"\0".join(os.fsencode(Path(paths[i]).absolute()) for i in chunk)
        items.append({"first": chunk[0], "paths": names})
    return items


def _same_bytes(model: Model) -> bytes:
    """The model file as the driver loaded it: the reports name its hash, so the actors must run it."""
    data = model.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != model.sha256:
        raise EngineError(f"{model.path} changed since this run loaded it; run again")
    return data


class _ScreenActor:
    """One Ray Data actor: a Screener of its own, fed blocks of paths (as bytes, any file name)."""

    def __init__(
        self,
        models: list[Any],
        providers: list[str],
        threads: int,
        batch_size: int,
        workers: int,
        draft: bool,
    ) -> None:
        import ray

        files: dict[str, tuple[str, bytes]] = ray.get(models[0])

        def load(role: str) -> Model:
            name, data = files[role]
            model = model_from_bytes(data, Path(name), role, providers, threads)
            if CUDA in providers and not model.on_gpu:  # onnxruntime falls back to the CPU without a word
                raise DeviceError(f"a GPU actor's onnxruntime has no CUDA on this node ({model.providers})")
            return model

        self.screener = Screener(load("gate"), load("classifier"), batch_size, workers, draft)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Screen the batch's items (each one local batch), their files in one run of the
        Screener, whose batches are then the items again."""
        indices: list[int] = []
        paths: list[Path] = []
        for first, names in zip(batch["first"], batch["paths"], strict=True):
            files = [Path(os.fsdecode(name)) for name in bytes(names).split(b"\0")]
            indices += range(int(first), int(first) + len(files))
            paths += files
        for path in paths:
            crash_point(f"screening {path.name}")  # a worker that dies on one file (crash tests only)
        logged: list[tuple[int, str]] = []
        handler = _Collect(logged)
        root = logging.getLogger("cxrbatch")
        root.addHandler(handler)
        try:
            results = list(self.screener.screen(paths))
        finally:
            root.removeHandler(handler)
        logs = [json.dumps(logged)] + ["[]"] * (len(results) - 1)  # the call's lines, on its first row
        return {"index": np.array(indices), "result": np.array([r.to_wire() for r in results]), "logs": np.array(logs)}


class _Collect(logging.Handler):
    """An actor's log records at WARNING and above, to be logged again by the driver."""

    def __init__(self, into: list[tuple[int, str]]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.levelno, record.getMessage()))
