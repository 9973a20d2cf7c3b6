"""How long does a nightly re-run take when every file is already in the ledger?

Makes N small synthetic PNGs (distinct content), screens them once with the shipped models and
a ledger, then runs the same command again (nothing new) and times it, with the peak RSS of
each. Baseline for the ratio: the first, full run. Prints a table and writes JSON.

    python -m benchmarks.ledger_rerun --files 20000 --json benchmarks/results/ledger_rerun.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import run_main
from benchmarks.harness import cli_run


def make_images(folder: Path, n: int) -> None:
    """Write n distinct 64x64 grey PNGs in folders of 1,000."""
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"
        sub.mkdir(exist_ok=True)
        arr = rng.integers(0, 255, (64, 64), dtype=np.uint8)
        Image.fromarray(arr, mode="L").save(sub / f"{i:06d}.png", compress_level=1)


def timed_run(folder: Path, ledger: Path, out: Path) -> tuple[float, int]:
    """Run `cxrbatch run` in a fresh process (start-up included): its wall time and peak RSS in MB."""
    return cli_run(["run", str(folder), "--ledger", str(ledger), "--out", str(out), "-q"], ok=(0,))[:2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "incoming"
        folder.mkdir()
        make_images(folder, args.files)
        ledger, out = root / "ledger.db", root / "report.csv"
        first, first_rss = timed_run(folder, ledger, out)
        measured = [timed_run(folder, ledger, out) for _ in range(args.repeats)]
        reruns = [seconds for seconds, _ in measured]
        rows_after = out.read_text(encoding="utf-8").count("\n") - 1
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "files": args.files,
        "first_run_s": round(first, 2),
        "rerun_s_median": round(statistics.median(reruns), 2),
        "rerun_s_all": [round(r, 2) for r in reruns],
        "rerun_over_first": round(statistics.median(reruns) / first, 4),
        "rows_in_rerun_report": rows_after,
        "first_run_peak_rss_mb": first_rss,
        "rerun_peak_rss_mb_median": statistics.median(rss for _, rss in measured),
    }
    print(f"{'files':>8} {'first run s':>12} {'re-run s (median)':>18} {'spread':>14} {'ratio':>8} {'RSS MB':>12}")
    spread = f"{min(reruns):.2f}-{max(reruns):.2f}"
    print(
        f"{args.files:>8} {first:>12.2f} {result['rerun_s_median']:>18.2f} {spread:>14} "
        f"{result['rerun_over_first']:>8.3f} {first_rss:>5} / {result['rerun_peak_rss_mb_median']:>4}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    run_main(main)
