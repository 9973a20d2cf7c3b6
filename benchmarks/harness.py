"""What every benchmark shares: the bench set, the machine's record, timing, fresh-process runs.

`benchmarks.run` measures with these, and the other benchmarks (start-up, threads, GPU) take
them from here so that their figures are made the same way.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrbatch.discovery import iter_images
from cxrbatch.imaging import load_image
from cxrbatch.modelinput import to_model_input
from cxrbatch.models import Model

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO.parent / "shared" / "data" / "bench"


def bench_paths() -> list[Path]:
    """The files of ../shared/data/bench; the benchmark ends with a clear message without it."""
    if not BENCH.is_dir():
        raise SystemExit(f"{BENCH} is missing: the benchmark needs ../shared/data/bench beside the checkout")
    return list(iter_images([BENCH]))


def machine() -> dict[str, Any]:
    """The machine a whole-run benchmark ran on, for its JSON."""
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()}


def folder_args(doc: str) -> argparse.Namespace:
    """The command line of a benchmark over one folder: FOLDER [--repeats N] [--json PATH]."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not args.folder.is_dir():
        parser.error(f"folder not found: {args.folder}")
    if args.repeats < 1:
        parser.error("--repeats must be 1 or more")
    return args


def folder_record(args: argparse.Namespace) -> dict[str, Any]:
    """The head of such a benchmark's JSON: the machine, the folder and the repeats."""
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "folder": args.folder.name,
        "repeats": args.repeats,
    }


def write_json(path: Path | None, record: dict[str, Any]) -> None:
    """Write a benchmark's record where --json says (nothing without it)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def timed(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of `repeats` calls."""
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def stats(count: int, seconds: list[float]) -> dict[str, Any]:
    """Rate summary: median images/s and the spread over repeats."""
    rates = [count / s for s in seconds]
    return {
        "images": count,
        "median_per_s": round(statistics.median(rates), 1),
        "min_per_s": round(min(rates), 1),
        "max_per_s": round(max(rates), 1),
    }


def synthetic_set(folder: Path, sources: list[Path], n: int, side: int = 1024, workers: int = 1) -> Path:
    """n distinct JPEGs made from real radiographs: a random crop, a brightness shift, `side` px."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    bases = [load_image(p).convert("L").resize((side, side)) for p in sources[:50]]
    jobs = [(i, rng.integers(0, side // 10, 2), int(rng.integers(-20, 20))) for i in range(n)]

    def make(job: tuple[int, np.ndarray, int]) -> None:
        i, box, shift = job
        img = bases[i % len(bases)]
        crop = img.crop((int(box[0]), int(box[1]), side - int(box[1]), side - int(box[0]))).resize((side, side))
        arr = np.clip(np.asarray(crop, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
        Image.fromarray(arr, mode="L").save(folder / f"syn{i:06d}.jpg", quality=85)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(make, jobs))
    return folder


def model_inputs(paths: list[Path], gate: Model, classifier: Model) -> tuple[np.ndarray, np.ndarray]:
    """Decode each file once (JPEG draft as the runtime does) into both models' input batches."""
    imgs = [load_image(p, draft_size=224) for p in paths]
    return (
        np.stack([to_model_input(i, gate.spec.input) for i in imgs]),
        np.stack([to_model_input(i, classifier.spec.input) for i in imgs]),
    )


def compiled(tree: Path) -> Path:
    """`tree`, its package's bytecode written, as an install writes it: where Python may not write
    bytecode (PYTHONDONTWRITEBYTECODE), a fresh process would otherwise compile every module it
    changed since bytecode was last written, at every start."""
    if not compileall.compile_dir(tree / "cxrbatch", quiet=1):
        raise SystemExit(f"cannot compile the package in {tree}")
    return tree


def extract(ref: str, into: Path) -> Path:
    """The tree of git `ref` in a folder of its own."""
    archive = into / "tree.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "-C", str(REPO), "archive", ref], stdout=out, check=True)
    tree = into / "tree"
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12 and later
            tar.extractall(tree, filter="data")
        else:
            tar.extractall(tree)  # our own repository's archive
    archive.unlink()
    return tree


def compared_trees(baseline: str | None, into: Path) -> dict[str, Path]:
    """The checkout, and the tree of git revision `baseline` (extracted into `into`) where one is
    given, each compiled: the sources whose runs a benchmark compares, by name."""
    trees = {"checkout": compiled(REPO)}
    if baseline:
        trees[baseline] = compiled(extract(baseline, into))
    return trees


def in_turns(trees: dict[str, Path], round_: int) -> list[tuple[str, Path]]:
    """`trees` in the order of round `round_`: each goes first in every other round, so that both
    see the same machine load."""
    return list(trees.items())[:: 1 if round_ % 2 == 0 else -1]


def in_tree(tree: Path | None) -> dict[str, Any]:
    """Popen arguments that make `python -m cxrbatch…` import the package of source `tree`: first on
    the path, and the working folder (which `-m` puts before it) the tree itself."""
    if tree is None:
        return {}
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    return {"cwd": tree, "env": {**os.environ, "PYTHONPATH": path}}


def cli_run(args: list[str], ok: tuple[int, ...] = (0, 3), tree: Path | None = None) -> tuple[float, int, float]:
    """Run `cxrbatch` in a fresh process (the package of source `tree` if given, else the one this
    process imports); return wall seconds, its peak RSS in MB and the CPU seconds (user + system)
    it used.

    An exit status outside `ok` ends the benchmark with the command's stderr, which goes to a
    file rather than a pipe: nobody reads a pipe before the child ends, so a full one would block it.
    """
    cmd = [sys.executable, "-m", "cxrbatch.cli", *args]
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, **in_tree(tree))
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) not in ok:
            err.seek(0)
            raise SystemExit(f"cxrbatch {' '.join(args)} failed: {err.read().decode(errors='replace')[-1500:]}")
    return elapsed, int(usage.ru_maxrss / 1024), usage.ru_utime + usage.ru_stime
