"""`cxrbatch forget` on a ledger of a year of nights: its time, memory and what it gives back.

    python -m benchmarks.ledger_forget --json benchmarks/results/ledger_forget.json

Makes a folder of N small synthetic PNGs (tonight's films, left in the folder), screens them
once with the shipped models and a ledger, then gives that ledger H earlier films (`--history`,
default 1,000,000) in nights of 20,000, one a day from 2025-01-01, whose films are gone from
their folders (as `benchmarks.ledger_history` does). On copies of it, each in a fresh process:
`cxrbatch forget --before DAY` (DAY: the day of the night that keeps `--keep` of the history, by
default a fifth), then with `--compact`; the ledger's size before and after; and tonight's rerun
over the ledger before and after the forget, in turns (`--repeats`), to show that a night's cost
does not change.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sqlite3
import statistics
import tempfile
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from benchmarks import run_main
from benchmarks.harness import cli_run, machine, write_json
from benchmarks.ledger_history import PER_NIGHT, add_history
from benchmarks.ledger_rerun import make_images

FIRST_NIGHT = date(2025, 1, 1)


def date_nights(ledger: Path) -> int:
    """Give the history's nights (every run but the first, tonight's) one day each from
    FIRST_NIGHT, before tonight's run; return how many nights there are."""
    with contextlib.closing(sqlite3.connect(ledger)) as db, db:
        ids = [run for (run,) in db.execute("SELECT id FROM runs WHERE id > 1 ORDER BY id")]
        db.executemany(
            "UPDATE runs SET started = ?, finished = ? WHERE id = ?",
            [
                (
                    f"{FIRST_NIGHT + timedelta(days=i)}T02:00:00+00:00",
                    f"{FIRST_NIGHT + timedelta(days=i)}T02:10:00+00:00",
                    run,
                )
                for i, run in enumerate(ids)
            ],
        )
    return len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--films", type=int, default=1000, help="tonight's films")
    parser.add_argument("--history", type=int, default=1_000_000, help="earlier films, gone from their folders")
    parser.add_argument("--keep", type=float, default=0.2, help="share of the history's nights the cut keeps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "incoming"
        folder.mkdir()
        make_images(folder, args.films)
        ledger = root / "year.db"
        cli_run(["run", str(folder), "--ledger", str(ledger), "--out", str(root / "first.csv"), "-q"], ok=(0,))
        add_history(ledger, args.history)
        nights = date_nights(ledger)
        day = FIRST_NIGHT + timedelta(days=round(nights * (1 - args.keep)))
        size = ledger.stat().st_size
        forgets: dict[str, Any] = {}
        for name, extra in (("forget", []), ("forget_compact", ["--compact"])):
            copy = root / f"{name}.db"
            shutil.copyfile(ledger, copy)
            wall, rss, cpu = cli_run(["forget", str(copy), "--before", str(day), *extra], ok=(0,))
            forgets[name] = {"s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": rss}
            forgets[name]["ledger_mb_after"] = round(copy.stat().st_size / 1e6, 1)
        after = root / "forget_compact.db"
        with contextlib.closing(sqlite3.connect(after)) as db:
            left = db.execute("SELECT count(DISTINCT path) FROM entries").fetchone()[0]
        reruns: dict[str, list[tuple[float, int]]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for name in ("before", "after") if i % 2 == 0 else ("after", "before"):
                target = ledger if name == "before" else after
                out = root / f"rerun-{name}-{i}.csv"
                wall, rss, _ = cli_run(["run", str(folder), "--ledger", str(target), "--out", str(out), "-q"], (0,))
                reruns[name].append((wall, rss))
    record: dict[str, Any] = {
        "machine": machine(),
        "films": args.films,
        "history": args.history,
        "nights": nights,
        "per_night": PER_NIGHT,
        "before": str(day),
        "ledger_mb": round(size / 1e6, 1),
        "films_left": left,
        **forgets,
        "rerun": {
            name: {
                "s_median": round(statistics.median(w for w, _ in r), 2),
                "peak_rss_mb_median": statistics.median(m for _, m in r),
                "runs": [[round(w, 2), m] for w, m in r],
            }
            for name, r in reruns.items()
        },
    }
    record["rerun_after_over_before_s"] = round(
        record["rerun"]["after"]["s_median"] / record["rerun"]["before"]["s_median"], 3
    )
    print(f"a ledger of {args.films} films tonight and {args.history} earlier ones ({nights} nights)")
    print(f"forget --before {day}: {left} films left")
    print(f"{'':>16} {'s':>8} {'CPU s':>8} {'peak RSS MB':>12} {'ledger MB':>10}")
    print(f"{'before':>16} {'':>8} {'':>8} {'':>12} {record['ledger_mb']:>10}")
    for name in ("forget", "forget_compact"):
        cells = record[name]
        s, cpu, rss, mb = cells["s"], cells["cpu_s"], cells["peak_rss_mb"], cells["ledger_mb_after"]
        print(f"{name:>16} {s:>8.2f} {cpu:>8.2f} {rss:>12} {mb:>10}")
    for name, cells in record["rerun"].items():
        print(f"{'rerun ' + name:>16} {cells['s_median']:>8.2f} {'':>8} {cells['peak_rss_mb_median']:>12}")
    print(f"{'ratio':>16} {record['rerun_after_over_before_s']:>8.3f}")
    write_json(args.json, record)


if __name__ == "__main__":
    run_main(main)
