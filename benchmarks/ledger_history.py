"""A night's run over a ledger that holds months of earlier nights, against a baseline revision.

    python -m benchmarks.ledger_history --baseline REF --json benchmarks/results/ledger_history.json

Makes a folder of N small synthetic PNGs (tonight's films), screens them once with the shipped
models and a ledger, then gives copies of that ledger H earlier films each (delivered results of
other paths, as a programme gathers them: a file, a result, an entry and a report row per film;
`--history`, default 0, 200,000 and 1,000,000). Over each copy, the checkout's `cxrbatch run` and
the one at git REF run the same night again in turns (nothing new), each in a fresh process:
wall seconds and peak RSS, their medians and the checkout's ratio to the baseline; then
`cxrbatch ledger` (the operator's view, which counts every film) once with each. Without
--baseline only the checkout is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import run_main
from benchmarks.harness import cli_run, compared_trees, in_turns, machine, write_json
from benchmarks.ledger_rerun import make_images

PER_NIGHT = 20_000


def add_history(ledger: Path, films: int, per_night: int = PER_NIGHT) -> None:
    """Give `ledger` `films` earlier films in nights of `per_night`, all delivered, each with a copy
    of the ledger's first result under its first settings."""
    # closed, not only committed: the last close moves SQLite's write-ahead log into the file,
    # whose size the record gives (left open, a small history stayed in `-wal` beside it)
    with contextlib.closing(sqlite3.connect(ledger)) as db, db:
        (fp,) = db.execute("SELECT fingerprint FROM settings LIMIT 1").fetchone()
        (record,) = db.execute("SELECT record FROM results LIMIT 1").fetchone()
        for night in range(-(-films // per_night)):
            run = db.execute(
                "INSERT INTO runs (started, finished, status) VALUES "
                "('2026-01-01T02:00:00+00:00', '2026-01-01T02:10:00+00:00', 'done')"
            ).lastrowid
            db.execute("INSERT INTO run_targets VALUES (?, ?)", (run, f"/srv/reports/night-{night:04d}.csv"))
            rows = []
            for i in range(min(per_night, films - night * per_night)):
                path = f"/srv/incoming/night-{night:04d}/film-{i:05d}.png"
                text = json.dumps({**json.loads(record), "path": path})
                rows.append((path, hashlib.sha256(path.encode()).hexdigest(), text))
            db.executemany("INSERT INTO files VALUES (?, 1000, 1, ?, 1)", [(p, sha) for p, sha, _ in rows])
            db.executemany("INSERT INTO results VALUES (?, ?, ?, ?, 1)", [(sha, fp, r, run) for _, sha, r in rows])
            db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?)", [(p, sha, fp, run, run) for p, sha, _ in rows])
            db.executemany(
                "INSERT INTO run_rows VALUES (?, ?, ?, ?)", [(run, i, p, r) for i, (p, _, r) in enumerate(rows)]
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REF", help="git revision to compare against")
    parser.add_argument("--films", type=int, default=1000, help="tonight's films")
    parser.add_argument("--history", type=int, nargs="+", default=[0, 200_000, 1_000_000], help="earlier films")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    record: dict[str, Any] = {"machine": machine(), "films": args.films, "history": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        trees = compared_trees(args.baseline, root)
        folder = root / "incoming"
        folder.mkdir()
        make_images(folder, args.films)
        first = root / "first.db"
        cli_run(["run", str(folder), "--ledger", str(first), "--out", str(root / "first.csv"), "-q"], ok=(0,))
        for size in args.history:
            ledger = root / f"ledger-{size}.db"
            shutil.copyfile(first, ledger)
            add_history(ledger, size)
            runs: dict[str, list[tuple[float, int]]] = {name: [] for name in trees}
            for i in range(args.repeats):
                for name, tree in in_turns(trees, i):
                    out = root / f"{size}-{name}-{i}.csv"
                    wall, rss, _ = cli_run(
                        ["run", str(folder), "--ledger", str(ledger), "--out", str(out), "-q"], (0,), tree
                    )
                    runs[name].append((wall, rss))
            view = {name: cli_run(["ledger", str(ledger)], (0,), tree)[:2] for name, tree in trees.items()}
            row: dict[str, Any] = {
                "ledger_mb": round(ledger.stat().st_size / 1e6, 1),
                "ledger_view": {name: {"s": round(w, 2), "peak_rss_mb": m} for name, (w, m) in view.items()},
                **{
                    name: {
                        "rerun_s_median": round(statistics.median(w for w, _ in r), 2),
                        "peak_rss_mb_median": statistics.median(m for _, m in r),
                        "runs": [[round(w, 2), m] for w, m in r],
                    }
                    for name, r in runs.items()
                },
            }
            if args.baseline:
                row["checkout_over_baseline_s"] = round(
                    row["checkout"]["rerun_s_median"] / row[args.baseline]["rerun_s_median"], 3
                )
            record["history"][str(size)] = row
    if args.baseline:
        record["baseline"] = args.baseline
    print(f"a night of {args.films} films run again over a ledger of earlier films ({args.repeats} runs each)")
    print(f"{'earlier films':>14} {'ledger MB':>10} {'tree':>12} {'rerun s':>8} {'peak RSS MB':>12}")
    for size, row in record["history"].items():
        for name in trees:
            cells = row[name]
            seconds, rss = cells["rerun_s_median"], cells["peak_rss_mb_median"]
            print(f"{size:>14} {row['ledger_mb']:>10} {name[:12]:>12} {seconds:>8.2f} {rss:>12}")
        if args.baseline:
            print(f"{'':>14} {'':>10} {'ratio':>12} {row['checkout_over_baseline_s']:>8.3f}")
        for name, cells in row["ledger_view"].items():
            print(f"{'':>14} {'`ledger`':>10} {name[:12]:>12} {cells['s']:>8.2f} {cells['peak_rss_mb']:>12}")
    write_json(args.json, record)


if __name__ == "__main__":
    run_main(main)
