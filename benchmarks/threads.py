"""How far decoding in threads scales (the share of a decode that holds the GIL), and in processes.

Decodes the files of a folder into both models' inputs as `cxrbatch run` does (`Screener.decode`:
JPEG at draft scale, both inputs made) with 1 thread and with one per usable core, per format, best of
`--repeats`. With n threads on n cores, a decode whose share g holds the GIL speeds up by
1 / (g + (1 - g) / n) at most (Amdahl), so g = (n / speed-up - 1) / (n - 1). The table then gives
the rate threads could reach on any number of cores, bounded by the GIL: 1 / (g x CPU seconds
per file); both are None where the speed-up reaches the core count (no share left to measure).
An estimate, not a measurement on a large machine: memory bandwidth and the models' own work
there are not in it.

Processes (`cxrbatch run --decoders N`, `cxrbatch.decoding.DecodePool`): the same files decoded by
one process per core, batches of 8 handed out by one thread per process as the run does. This
process then only receives each batch (unpickling uint8 inputs, casting them to float32): its CPU
seconds per file, all counted as if they held the GIL, bound processes at 1 / that rate on any
number of cores, a floor under the true bound.

    python -m benchmarks.threads ../shared/data/bench --json benchmarks/results/threads.json
"""

from __future__ import annotations

import resource
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import run_main
from benchmarks.harness import folder_args, folder_record, timed, write_json
from cxrbatch.cores import usable_cores
from cxrbatch.decoding import DecodePool
from cxrbatch.discovery import iter_images
from cxrbatch.models import default_models_dir, load_models
from cxrbatch.pipeline import Screener


def rate(screener: Screener, paths: list[Path], threads: int, repeats: int) -> float:
    """Files per second decoded by `threads` threads, best of `repeats` (each thread warmed up on
    one file first)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(screener.decode, paths[:threads]))
        return len(paths) / min(timed(lambda: list(pool.map(screener.decode, paths)), repeats))


def scaling(screener: Screener, paths: list[Path], cores: int, repeats: int) -> dict[str, Any]:
    """One thread against one per core, the GIL share that implies and the rate it bounds."""
    one, many = rate(screener, paths, 1, repeats), rate(screener, paths, cores, repeats)
    speed_up = many / one
    # a speed-up of the full core count (or, by noise, above it) leaves no GIL share to measure
    gil = (cores / speed_up - 1) / (cores - 1) if cores > 1 and speed_up < cores else None
    return {
        "files": len(paths),
        "one_thread_per_s": round(one, 1),
        f"{cores}_threads_per_s": round(many, 1),
        "speed_up": round(speed_up, 2),
        "gil_share": None if gil is None else round(gil, 3),
        "gil_bound_per_s": None if gil is None else round(one / gil),
    }


def in_processes(screener: Screener, paths: list[Path], processes: int, repeats: int) -> dict[str, Any]:
    """Files per second decoded by `processes` processes (best of `repeats`, after one warm-up
    batch per process), and this process's own CPU seconds per file while they did."""
    batches = [paths[i : i + 8] for i in range(0, len(paths), 8)]
    pool = DecodePool(screener.decoder, processes)
    try:
        with ThreadPoolExecutor(max_workers=processes) as threads:
            list(threads.map(pool.decode, batches[:processes]))
            walls, cpus = [], []
            for _ in range(repeats):
                before = resource.getrusage(resource.RUSAGE_SELF)
                walls += timed(lambda: list(threads.map(pool.decode, batches)), 1)
                after = resource.getrusage(resource.RUSAGE_SELF)
                cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    finally:
        pool.close()
    parent = min(cpus) / len(paths)
    return {
        f"{processes}_processes_per_s": round(len(paths) / min(walls), 1),
        "parent_cpu_s_per_file": round(parent, 6),
        "parent_bound_per_s": round(1 / parent) if parent > 0 else None,
    }


def main() -> None:
    args = folder_args(__doc__)
    paths = list(iter_images([args.folder])) * 2  # enough work per timing on a fast machine
    gate, classifier = load_models(default_models_dir(), "cpu")
    screener = Screener(gate, classifier, workers=1)
    cores = usable_cores()
    groups = {
        "jpeg": [p for p in paths if p.suffix.lower() in (".jpg", ".jpeg")],
        "png": [p for p in paths if p.suffix.lower() == ".png"],
        "all": paths,
    }
    result = {
        **folder_record(args),
        "formats": {
            k: {**scaling(screener, v, cores, args.repeats), **in_processes(screener, v, cores, args.repeats)}
            for k, v in groups.items()
            if v
        },
    }
    print(
        f"{'format':<6} {'files':>6} {'1 thread':>9} {f'{cores} threads':>10} {'speed-up':>9}"
        f" {'GIL share':>10} {'GIL-bound rate':>15} {f'{cores} processes':>12} {'parent CPU/file':>16}"
        f" {'parent bound':>13}"
    )
    for name, row in result["formats"].items():
        print(
            f"{name:<6} {row['files']:>6} {row['one_thread_per_s']:>9} {row[f'{cores}_threads_per_s']:>10} "
            f"{row['speed_up']:>9} {row['gil_share']!s:>10} {row['gil_bound_per_s']!s:>15}"
            f" {row[f'{cores}_processes_per_s']:>12} {row['parent_cpu_s_per_file']:>16}"
            f" {row['parent_bound_per_s']!s:>13}"
        )
    write_json(args.json, result)


if __name__ == "__main__":
    run_main(main)
