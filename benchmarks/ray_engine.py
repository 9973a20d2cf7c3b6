"""`cxrbatch run --engine ray` against the local engine, in one run on one machine, as ratios.

    python -m benchmarks.ray_engine --json benchmarks/results/ray_engine.json

1. the bench set (../shared/data/bench) and a synthetic set of 1024-px JPEGs (`--synthetic`,
   2,000 by default): `cxrbatch run` in a fresh process with the local engine, then with
   `--engine ray` on a local Ray instance it starts itself; the ratio of their throughputs;
2. where Ray's extra time goes: starting a local Ray instance (`ray.init` + `ray.shutdown` alone),
   and the screening phase (the report's `seconds`: actors starting, loading both models, the
   blocks' round trips) against the local engine's;
3. scaling on a local multi-node cluster on loopback, over the synthetic set: `ray start --head
   --num-cpus 0` plus 1 or 2 worker nodes, each pinned to a core of its own (CPU affinity: an
   actor would otherwise decode in one thread while it infers in another, on both cores), the
   driver joining it with `--ray-address` and one actor per worker. The driver, the head and the
   raylets share those cores too.

Every ray report is checked to hold the local report's rows, byte for byte. Wall-clock medians on
a shared machine: compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks import run_main
from benchmarks.harness import BENCH, bench_paths, cli_run, machine, synthetic_set, write_json
from cxrbatch.errors import UsageError

PORT = 6391  # the loopback cluster's head
LOOPBACK = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # nothing leaves this machine


def engine_runs(folder: Path, n: int, repeats: int, out: Path, extra: list[str]) -> dict[str, Any]:
    """Fresh-process runs of one engine: wall seconds, the report's screening seconds, rates."""
    walls, screening = [], []
    for _ in range(repeats):
        doc_path = out.with_suffix(".json")
        wall = cli_run(["run", str(folder), "--out", str(out), "--json", str(doc_path), "-q", *extra])[0]
        doc = json.loads(doc_path.read_text(encoding="utf-8"))
        walls.append(wall)
        screening.append(doc["summary"]["seconds"])
    wall, screen = statistics.median(walls), statistics.median(screening)
    return {
        "wall_s": round(wall, 2),
        "per_s": round(n / wall, 1),
        "screening_s": round(screen, 2),
        "screening_per_s": round(n / screen, 1),
        "outside_screening_s": round(wall - screen, 2),
        "all_wall_s": [round(w, 2) for w in walls],
    }


def compare(folder: Path, n: int, repeats: int, root: Path) -> dict[str, Any]:
    """Local against ray over one folder, with the reports' rows checked to be the same."""
    local = engine_runs(folder, n, repeats, root / "local.csv", [])
    ray = engine_runs(folder, n, repeats, root / "ray.csv", ["--engine", "ray"])
    same = (root / "local.csv").read_bytes() == (root / "ray.csv").read_bytes()
    if not same:
        raise SystemExit(f"ray and local reports differ on {folder}")
    return {
        "files": n,
        "local": local,
        "ray": ray,
        "same_rows": same,
        "ray_over_local": round(ray["per_s"] / local["per_s"], 3),
        "ray_over_local_screening": round(ray["screening_per_s"] / local["screening_per_s"], 3),
    }


def ray_start_stop(repeats: int) -> float:
    """Median seconds of starting and stopping a local Ray instance alone, in a fresh process."""
    code = "import ray; ray.init(include_dashboard=False, logging_level='ERROR'); ray.shutdown()"
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 2)


def _ray(*args: str, cpu: int | None = None) -> None:
    """`ray ARGS`; with `cpu`, the node (its raylet and every worker it starts) runs on that core only."""
    pin = None if cpu is None else (lambda: os.sched_setaffinity(0, {cpu}))
    command = [sys.executable, "-m", "ray.scripts.scripts", *args]
    subprocess.run(command, check=True, capture_output=True, env=LOOPBACK, preexec_fn=pin)


def _raylets() -> list[str]:
    """The process ids of the raylets running on this machine (one per Ray node)."""
    found = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text(encoding="utf-8").strip() == "raylet":
                found.append(comm.parent.name)
        except OSError:
            continue
    return found


@contextlib.contextmanager
def loopback_cluster(workers: int) -> Iterator[str]:
    """A head that runs nothing (0 CPUs) and `workers` nodes pinned to one core each, all on 127.0.0.1."""
    address = f"127.0.0.1:{PORT}"
    if _raylets():  # its clean-up, `ray stop --force`, stops every Ray process of the machine
        raise UsageError("a Ray node already runs on this machine: the loopback cluster's clean-up would stop it")
    _ray("start", "--head", "--port", str(PORT), "--num-cpus", "0", "--node-ip-address", "127.0.0.1",
         "--include-dashboard", "false", "--disable-usage-stats")  # fmt: skip
    try:
        for core in range(workers):
            _ray("start", "--address", address, "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                 "--disable-usage-stats", cpu=core % (os.cpu_count() or 1))  # fmt: skip
        yield address
    finally:
        _ray("stop", "--force")


def scaling(folder: Path, n: int, repeats: int, root: Path, reference: bytes) -> dict[str, Any]:
    """Throughput with 1 and 2 one-CPU worker nodes."""
    out: dict[str, Any] = {}
    os.environ["RAY_AUTH_MODE"] = "disabled"  # the drivers cli_run starts inherit it
    for workers in (1, 2):
        with loopback_cluster(workers) as address:
            csv = root / f"nodes{workers}.csv"
            args = ["--engine", "ray", "--ray-address", address, "--actors", str(workers)]
            out[f"{workers}_workers"] = engine_runs(folder, n, repeats, csv, args)
            if csv.read_bytes() != reference:
                raise SystemExit(f"the {workers}-worker cluster's report differs from the local one")
    out["two_over_one"] = round(out["2_workers"]["per_s"] / out["1_workers"]["per_s"], 3)
    out["two_over_one_screening"] = round(out["2_workers"]["screening_per_s"] / out["1_workers"]["screening_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--synthetic", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bench = bench_paths()
    import ray

    report: dict[str, Any] = {"machine": machine(), "ray": ray.__version__, "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        report["ray_start_stop_s"] = ray_start_stop(args.repeats)
        report["bench"] = compare(BENCH, len(bench), args.repeats, root)
        syn = synthetic_set(root / "synthetic", bench, args.synthetic)
        report["synthetic"] = compare(syn, args.synthetic, 1, root)
        reference = (root / "local.csv").read_bytes()
        # on the larger set: on 294 files the actors' start-up hides how the work itself scales
        report["loopback_cluster_synthetic"] = scaling(syn, args.synthetic, 1, root, reference)
    print_table(report)
    write_json(args.json, report)


def print_table(r: dict[str, Any]) -> None:
    print(f"ray {r['ray']}, {r['machine']['cpus']} CPUs; local Ray start + stop alone: {r['ray_start_stop_s']} s")
    print(f"{'set':<36}{'files':>7}{'wall s':>9}{'img/s':>8}{'screen s':>10}{'screen img/s':>14}{'other s':>9}")
    rows = []
    for name in ("bench", "synthetic"):
        for engine in ("local", "ray"):
            rows.append((f"{name} {engine}", r[name]["files"], r[name][engine]))
    cluster = r["loopback_cluster_synthetic"]
    for workers in ("1_workers", "2_workers"):
        rows.append((f"synthetic, loopback {workers.replace('_', ' ')}", r["synthetic"]["files"], cluster[workers]))
    for label, n, e in rows:
        print(
            f"{label:<36}{n:>7}{e['wall_s']:>9}{e['per_s']:>8}{e['screening_s']:>10}"
            f"{e['screening_per_s']:>14}{e['outside_screening_s']:>9}"
        )
    for name in ("bench", "synthetic"):
        print(
            f"{name}: ray/local {r[name]['ray_over_local']} end to end, "
            f"{r[name]['ray_over_local_screening']} screening phase; rows identical: {r[name]['same_rows']}"
        )
    print(
        f"loopback cluster: 2 workers / 1 worker {cluster['two_over_one']} end to end, "
        f"{cluster['two_over_one_screening']} screening"
    )


if __name__ == "__main__":
    run_main(main)
