"""What do heatmaps and the review page cost on top of screening?

Runs `cxrbatch run` in fresh processes over a folder three ways, in one session: the review page
alone (the baseline), plus heatmaps of the flagged films, plus heatmaps of every classified film.
The cost per heatmap is the extra wall time over the baseline divided by the heatmaps written.
Prints a table and writes JSON.

    python -m benchmarks.heatmaps ../shared/data/bench --json benchmarks/results/heatmaps.json
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from benchmarks import run_main
from benchmarks.harness import cli_run, folder_args, folder_record, write_json


def timed(folder: Path, root: Path, extra: list[str], repeats: int) -> tuple[float, int]:
    """Median wall seconds of `repeats` runs, and the heatmaps the last one wrote."""
    seconds = []
    maps = root / "maps"
    for i in range(repeats):
        out = root / f"run{i}"
        out.mkdir()
        args = ["run", str(folder), "--out", str(out / "r.csv"), "--html", str(out / "review.html"), "-q"]
        seconds.append(cli_run([*args, *[a.replace("MAPS", str(out / "maps")) for a in extra]])[0])
        maps = out / "maps"
    drawn = [p for p in maps.iterdir() if not p.name.startswith(".")] if maps.is_dir() else []  # not the folder's mark
    return statistics.median(seconds), len(drawn)


def main() -> None:
    args = folder_args(__doc__)
    ways = {
        "review page only": [],
        "heatmaps, flagged": ["--heatmaps", "MAPS", "--heatmaps-for", "flagged"],
        "heatmaps, all": ["--heatmaps", "MAPS"],
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, extra) in enumerate(ways.items()):
            root = Path(tmp) / str(i)
            root.mkdir()
            rows[name] = timed(args.folder, root, extra, args.repeats)
    base = rows["review page only"][0]
    result = {
        **folder_record(args),
        "runs": {
            name: {
                "seconds_median": round(s, 2),
                "heatmaps": n,
                "over_baseline": round(s / base, 3),
                "seconds_per_heatmap": round((s - base) / n, 4) if n else None,
            }
            for name, (s, n) in rows.items()
        },
    }
    print(f"{'run':<20} {'s (median)':>11} {'heatmaps':>9} {'x baseline':>11} {'s per heatmap':>14}")
    for name, r in result["runs"].items():
        per = "" if r["seconds_per_heatmap"] is None else f"{r['seconds_per_heatmap']:.4f}"
        print(f"{name:<20} {r['seconds_median']:>11.2f} {r['heatmaps']:>9} {r['over_baseline']:>11.3f} {per:>14}")
    write_json(args.json, result)


if __name__ == "__main__":
    run_main(main)
