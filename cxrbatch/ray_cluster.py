"""Reaching a Ray cluster for `cxrbatch run --engine ray` (`ray_engine` screens on it).

Importing Ray only when asked (without the extra, an `ExtraMissing` naming the install), checking
an address before `ray.init` (which waits for ever for a head that is not there, or is the
dashboard's port), connecting with the command's own SIGTERM handler kept, keeping what Ray prints
off a stdout that may carry a report, and sizing the actor pool to the cluster's CPUs and GPUs.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cxrbatch.errors import EngineError, ExtraMissing, UsageError

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install "cxrbatch[ray]" (in a source checkout: pip install -e ".[ray]")'
AUTH_HINT = "; a cluster with token authentication needs RAY_AUTH_MODE=token and its token here"
CONNECT_TIMEOUT = 10.0  # seconds to wait for a cluster's head to answer
# What a gRPC server (a cluster's GCS, or Ray Client) answers first to an HTTP/2 client: a
# SETTINGS frame (type 4, the fourth byte of its 9-byte frame header).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
SETTINGS_FRAME = 4


def import_ray() -> Any:
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
def stdout_to_stderr() -> Iterator[None]:
    """Send what Ray prints to stdout (a dead worker's `(raylet) ...` lines, whatever
    `log_to_driver` says) to stderr while the session lasts: stdout may be carrying a report. The
    run writes its stdout report to the stream it found when it started (`runner.Report`)."""
    kept = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        sys.stdout = kept


def connect(ray: Any, address: str | None) -> None:
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
    log.info("connected to %s (%s)", where, resources_text(ray.cluster_resources()))


def parse_address(address: str) -> tuple[str, int]:
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


def check_reachable(host: str, port: int, timeout: float = CONNECT_TIMEOUT) -> None:
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


def configure_data(ray: Any) -> None:
    if not log.isEnabledFor(logging.DEBUG):  # Ray Data's own plan and progress lines only with --verbose
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # results arrive nearly in input order
    context.max_errored_blocks = -1  # a block that fails every retry is sent again file by file
    context.enable_progress_bars = False  # the run has its own progress bar and log lines


def resources_text(resources: dict[str, float]) -> str:
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
        raise EngineError(f"the Ray cluster has no room for an actor ({resources_text(resources)})")
    if asked is None:
        return room
    if asked > room:
        raise UsageError(f"--actors {asked}: the Ray cluster has room for {room} ({resources_text(resources)})")
    return asked
