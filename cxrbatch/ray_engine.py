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

Reaching the cluster (the address check, the connection, the actors' number) is `ray_cluster`.
Nothing here imports ray before a Ray run starts; without the extra it is an `ExtraMissing`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from cxrbatch import ray_cluster
from cxrbatch.crashes import crash_point
from cxrbatch.errors import DeviceError, EngineError
from cxrbatch.models import CPU, CUDA, Model, model_from_bytes
from cxrbatch.pipeline import Result, Screener
from cxrbatch.records import ERROR, plural

log = logging.getLogger(__name__)

# Files per Ray block, in inference batches: one batch per block spent a quarter of a 2,000-film
# run on blocks' round trips (105 images/s on 2 CPUs, against 136 with 4 and 140 with 16); small
# blocks keep the actors evenly busy and a lost block cheap to send again.
BLOCK_BATCHES = 4
RETRIES = 2  # task retries on a restarted actor before Ray Data gives a block up
ACTOR_WORKERS = 2  # worker threads of an actor without --workers (a GPU actor takes a CPU for each)
LOST = "screening failed on the Ray cluster in every attempt (a worker died on this file; see the Ray logs)"


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
    ray = ray_cluster.import_ray()
    address = address or os.environ.get("RAY_ADDRESS") or None
    host_port = None if address in (None, "auto") else ray_cluster.parse_address(address)
    started_here = not ray.is_initialized()
    with ray_cluster.stdout_to_stderr():
        if started_here:
            if host_port is not None:
                ray_cluster.check_reachable(*host_port)  # ray.init waits for an unreachable head for ever
            ray_cluster.connect(ray, address)
        try:
            ray_cluster.configure_data(ray)
            count = ray_cluster.actor_count(
                ray.cluster_resources(), actors, gpus_per_actor, ray_cluster.actor_cpus(gpus_per_actor, workers)
            )
            yield RayScreener(gate, classifier, batch_size, draft, count, gpus_per_actor, workers)
        finally:
            if started_here:
                ray.shutdown()


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
                num_cpus=ray_cluster.actor_cpus(self.gpus_per_actor, self.workers),
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
        cpus = ray_cluster.actor_cpus(self.gpus_per_actor, self.workers)
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
