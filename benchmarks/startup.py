"""Start-up: a one-film `cxrbatch run`, from process start to report written, against a baseline.

    python -m benchmarks.startup --baseline REF --json benchmarks/results/startup.json

Runs the checkout's `cxrbatch` and the one at git REF (extracted with `git archive` into a
temporary folder, models included) in turns, each first in every other round, each in a fresh
process on the same film (the first of ../shared/data/bench, else the bundled sample
radiograph), so both see the same machine load; reports the medians and their ratio. For the
checkout it also times what a run spends before its models: the interpreter alone, and the
interpreter with everything a run imports first. Without --baseline only the checkout is timed.

Both trees' modules are compiled to bytecode first, as an install compiles them: where Python
may not write bytecode (PYTHONDONTWRITEBYTECODE, as on the machine these figures come from), the
extracted tree was otherwise compiled from source at every start, about 0.05 s a run that the
checkout, with bytecode left from earlier, did not pay.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import run_main
from benchmarks.harness import BENCH, REPO, bench_paths, cli_run, compared_trees, in_tree, in_turns, machine, write_json

SAMPLE = REPO / "samples" / "NORMAL2-IM-1437-0001.jpeg"
FIRST_IMPORTS = "import cxrbatch.cli, cxrbatch.runner, onnxruntime"


def film() -> Path:
    """The film every run screens: the first of the bench set (as `benchmarks.run` times it)."""
    return bench_paths()[0] if BENCH.is_dir() else SAMPLE


def python_wall(code: str, runs: int) -> float:
    """Median wall seconds of `python -c code` in fresh processes."""
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, **in_tree(REPO))
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def summary(seconds: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(seconds), 3),
        "quartiles_s": [round(q, 3) for q in statistics.quantiles(seconds, n=4)[::2]],
        "runs": len(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REF", help="git revision to compare against")
    parser.add_argument("--runs", type=int, default=15, help="runs of each, at least 2 (for quartiles)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2")
    image = film()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trees = compared_trees(args.baseline, root)
        seconds: dict[str, list[float]] = {name: [] for name in trees}
        for i in range(args.runs):
            for name, tree in in_turns(trees, i):
                out = root / f"{i}.csv"
                seconds[name].append(cli_run(["run", str(image), "--out", str(out), "-q"], tree=tree)[0])
        record: dict[str, Any] = {
            "machine": machine(),
            "film": image.name,
            "one_film_run": {name: summary(s) for name, s in seconds.items()},
            "checkout_before_its_models_s": {
                "interpreter": round(python_wall("pass", args.runs), 3),
                "interpreter_and_first_imports": round(python_wall(FIRST_IMPORTS, args.runs), 3),
            },
        }
        if args.baseline:
            record["ratio_checkout_over_baseline"] = round(
                record["one_film_run"]["checkout"]["median_s"] / record["one_film_run"][args.baseline]["median_s"], 3
            )
    print(f"one film, process start to report ({image.name}, {args.runs} runs each, in turns)")
    for name, row in record["one_film_run"].items():
        print(f"  {name:<24} median {row['median_s']:.3f} s  quartiles {row['quartiles_s']}")
    if args.baseline:
        print(f"  checkout / baseline      {record['ratio_checkout_over_baseline']}")
    for name, value in record["checkout_before_its_models_s"].items():
        print(f"  {name:<24} {value:.3f} s")
    write_json(args.json, record)


if __name__ == "__main__":
    run_main(main)
