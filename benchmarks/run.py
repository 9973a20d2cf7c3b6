"""Speed and memory of cxrbatch, measured in one run on one machine, as ratios against baselines.

    python -m benchmarks.run --json benchmarks/results/run.json

1. inference-only: the shipped gate + classifier on pre-decoded tensors, run as `cxrbatch run`
   runs them (batches side by side on single-threaded sessions, one per core) and one batch at a
   time on sessions with a thread per core; the faster is the ceiling. Each model alone too (the
   gate's share of inference time);
2. `cxrbatch run` end to end (decode + gate + classifier + reports) in a fresh process, first
   (cold) and repeated (warm), on ../shared/data/bench and on a synthetic set; on the bench set
   also with a decoding process per core (`--decoders`), as a ratio to the default threads;
3. the seed-style baseline: the same Keras MobileNetV2 classifier, `model.predict` one image at a
   time (needs the export extra; skipped with a note otherwise);
4. decode-only rate per format (with and without JPEG draft mode);
5. peak RSS of `cxrbatch run` over 1,000 and 20,000 synthetic files;
6. time to first result: process start to report written, one image;
7. pipeline efficiency: the CPU cost per image of decoding (one thread) and of inference (the
   ceiling's way), the rate two cores could reach if nothing else ran (cores / cost per image),
   and the end-to-end rate as a share of it, with where the rest went (start-up, the run's other
   CPU work, idle cores).

Medians over `--repeats` with min-max spread. Timings are wall-clock on a shared machine: compare
the ratios within one run, not numbers across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import run_main
from benchmarks.harness import (
    BENCH,
    REPO,
    bench_paths,
    cli_run,
    compiled,
    machine,
    model_inputs,
    stats,
    synthetic_set,
    timed,
    write_json,
)
from cxrbatch.cores import usable_cores
from cxrbatch.imaging import load_image
from cxrbatch.modelinput import to_model_input
from cxrbatch.models import Model, default_models_dir, load_models
from cxrbatch.pipeline import Screener


def inference_only(paths: list[Path], repeats: int, batch: int) -> dict[str, Any]:
    """Both models (and each alone) on tensors decoded beforehand, in both ways of running them;
    `ceiling` names the faster, and `cpu_s_per_image` is what its inference of both costs."""
    cores = usable_cores()
    out: dict[str, Any] = {}
    for mode, threads, side_by_side in (("side_by_side", 1, cores), ("one_at_a_time", None, 1)):
        gate, classifier = load_models(default_models_dir(), "cpu", threads=threads)
        g, c = model_inputs(paths, gate, classifier)
        with ThreadPoolExecutor(max_workers=side_by_side) as pool:

            def run(jobs: list[tuple[Model, np.ndarray]], pool: ThreadPoolExecutor = pool) -> Callable[[], Any]:
                batches = [(m, x[i : i + batch]) for m, x in jobs for i in range(0, len(x), batch)]
                return lambda: list(pool.map(lambda job: job[0].run(job[1]), batches))

            gate_s = timed(run([(gate, g)]), repeats)
            clf_s = timed(run([(classifier, c)]), repeats)
            cpu_before = time.process_time()
            both_s = timed(run([(gate, g), (classifier, c)]), repeats)
            cpu = (time.process_time() - cpu_before) / repeats
        n = len(paths)
        out[mode] = {
            "session_threads": threads or cores,
            "batches_side_by_side": side_by_side,
            "both": stats(n, both_s),
            "gate": stats(n, gate_s),
            "classifier": stats(n, clf_s),
            "gate_share_of_inference": round(statistics.median(gate_s) / statistics.median(both_s), 3),
            "cpu_s_per_image": round(cpu / n, 5),
        }
    out["ceiling"] = max(("side_by_side", "one_at_a_time"), key=lambda m: out[m]["both"]["median_per_s"])
    return out


def decode_cost(paths: list[Path]) -> dict[str, Any]:
    """CPU seconds per image of decoding a file into both models' inputs, as the runtime does it
    (JPEG draft included), in one thread: the thread's own CPU clock, so waits do not count."""
    gate, classifier = load_models(default_models_dir(), "cpu")
    screener = Screener(gate, classifier, workers=1)
    started = time.thread_time()
    for p in paths:
        screener.decode(p)
    return {"images": len(paths), "cpu_s_per_image": round((time.thread_time() - started) / len(paths), 5)}


def end_to_end(folder: Path, n: int, repeats: int, out: Path, options: tuple[str, ...] = ()) -> dict[str, Any]:
    """Cold (first) and warm (repeated) fresh-process runs over a folder, with `options` for
    `cxrbatch run`; the JSON report of each says how long its screening phase took (from the
    first file to the last result)."""
    doc = out.with_suffix(".json")
    runs, screening = [], []
    for _ in range(repeats + 1):
        runs.append(cli_run(["run", str(folder), "--out", str(out), "--json", str(doc), "-q", *options]))
        screening.append(json.loads(doc.read_text(encoding="utf-8"))["summary"]["seconds"])
    cold, warm = runs[0], runs[1:]
    return {
        "cold": {"seconds": round(cold[0], 2), "per_s": round(n / cold[0], 1), "peak_rss_mb": cold[1]},
        "warm": {
            **stats(n, [w[0] for w in warm]),
            "peak_rss_mb": max(w[1] for w in warm),
            "median_seconds": round(statistics.median(w[0] for w in warm), 3),
            "median_cpu_s": round(statistics.median(w[2] for w in warm), 3),
            "median_screening_s": round(statistics.median(screening[1:]), 3),
        },
    }


def efficiency(report: dict[str, Any], cores: int) -> dict[str, Any]:
    """End to end on the bench set against what its decoding and inference CPU cost allow on
    `cores` cores, and where the rest of the run's core-seconds went."""
    n = report["bench_files"]
    inf = report["inference_only_bench"]
    decode_s = report["decode_cost_bench"]["cpu_s_per_image"]
    infer_s = inf[inf["ceiling"]]["cpu_s_per_image"]
    limit = cores / (decode_s + infer_s)
    warm = report["end_to_end_bench"]["warm"]
    wall, cpu = warm["median_seconds"], warm["median_cpu_s"]
    startup = report["single_image_latency_s"]["median"]
    return {
        "decode_cpu_s_per_image": decode_s,
        "inference_cpu_s_per_image": infer_s,
        "limit_per_s": round(limit, 1),
        "end_to_end_over_limit": round(warm["median_per_s"] / limit, 3),
        "screening_phase_over_limit": round(n / warm["median_screening_s"] / limit, 3),
        "core_seconds": {
            "available": round(cores * wall, 2),
            "decode_and_inference": round(n * (decode_s + infer_s), 2),
            "start_up_wall_s": startup,
            "other_cpu": round(cpu - n * (decode_s + infer_s), 2),
            "idle": round(cores * wall - cpu, 2),
        },
    }


def seed_baseline(paths: list[Path]) -> dict[str, Any]:
    """The student project's loop: Keras MobileNetV2 classifier, model.predict on one image at a time."""
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras
    except ImportError:
        return {"skipped": "the export extra (tensorflow/keras) is not installed"}
    base = keras.applications.MobileNetV2(input_shape=(224, 224, 3), include_top=False, weights=None)
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    model = keras.Model(base.input, keras.layers.Dense(4, activation="softmax")(keras.layers.Dropout(0.2)(x)))
    prep = [np.asarray(load_image(p).convert("RGB").resize((224, 224)), dtype=np.float32) / 127.5 - 1 for p in paths]
    model.predict(prep[0][None], verbose=0)  # build and trace once, as a long-running loop would
    seconds = timed(lambda: [model.predict(x[None], verbose=0) for x in prep], 1)
    return stats(len(paths), seconds)


def decode_only(paths: list[Path]) -> dict[str, Any]:
    """Decode (and prepare both inputs) per format, with and without JPEG draft mode."""
    gate, classifier = load_models(default_models_dir(), "cpu")
    by_fmt: dict[str, list[Path]] = {}
    for p in paths:
        by_fmt.setdefault(p.suffix.lower().replace(".jpeg", ".jpg"), []).append(p)
    out = {}
    for fmt, group in sorted(by_fmt.items()):
        for draft in (True, False):

            def work(group: list[Path] = group, draft: bool = draft) -> None:
                for p in group:
                    img = load_image(p, draft_size=224 if draft else None)
                    to_model_input(img, gate.spec.input)
                    to_model_input(img, classifier.spec.input)

            out[f"{fmt} {'draft' if draft else 'full'}"] = stats(len(group), timed(work, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", type=int, default=2000)
    parser.add_argument("--rss-large", type=int, default=20000)
    parser.add_argument("--seed-images", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    bench = bench_paths()
    compiled(REPO)  # the fresh-process runs start as an installed cxrbatch would
    report: dict[str, Any] = {"machine": machine(), "bench_files": len(bench)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # Fresh-process measurements first: a child's peak RSS on Linux includes its parent's at fork
        # time, so the parent must not have loaded models or TensorFlow yet.
        small = synthetic_set(root / "small", bench, args.rss_large, side=256)
        one_k = root / "one_k"
        one_k.mkdir()
        few = sorted(small.iterdir())[:1000]  # fewer where --rss-large is under 1,000
        for p in few:
            os.link(p, one_k / p.name)
        report["peak_rss_mb"] = {
            str(len(few)): cli_run(["run", str(one_k), "--out", str(root / "k.csv"), "-q"])[1],
            str(args.rss_large): cli_run(["run", str(small), "--out", str(root / "l.csv"), "-q"])[1],
        }
        single = [cli_run(["run", str(bench[0]), "--out", str(root / "one.csv"), "-q"])[0] for _ in range(args.repeats)]
        report["single_image_latency_s"] = {
            "median": round(statistics.median(single), 2),
            "all": [round(s, 2) for s in single],
        }
        report["end_to_end_bench"] = end_to_end(BENCH, len(bench), args.repeats, root / "r.csv")
        decoders = ("--decoders", str(usable_cores()))
        report["end_to_end_bench_decoders"] = end_to_end(BENCH, len(bench), args.repeats, root / "d.csv", decoders)
        syn = synthetic_set(root / "synthetic", bench, args.synthetic)
        report["end_to_end_synthetic"] = end_to_end(syn, args.synthetic, 1, root / "s.csv")
        report["inference_only_bench"] = inference_only(bench, args.repeats, batch=8)
        report["decode_cost_bench"] = decode_cost(bench)
        report["seed_baseline_bench"] = seed_baseline(bench[: args.seed_images])
        report["decode_only_bench"] = decode_only(bench)
    inf = report["inference_only_bench"]
    ceiling = inf[inf["ceiling"]]["both"]["median_per_s"]
    warm = report["end_to_end_bench"]["warm"]["median_per_s"]
    seed = report["seed_baseline_bench"].get("median_per_s")
    report["ratios"] = {
        "end_to_end_over_inference_only": round(warm / ceiling, 3),
        "end_to_end_over_seed_loop": round(warm / seed, 1) if seed else None,
        "decoding_processes_over_threads": round(report["end_to_end_bench_decoders"]["warm"]["median_per_s"] / warm, 3),
    }
    report["pipeline_efficiency"] = efficiency(report, usable_cores())
    print_table(report)
    write_json(args.json, report)


def print_table(r: dict[str, Any]) -> None:
    """Print the results as one readable table."""
    inf = r["inference_only_bench"]
    e2e = r["end_to_end_bench"]
    eff = r["pipeline_efficiency"]
    rows = []
    for mode in ("side_by_side", "one_at_a_time"):
        m = inf[mode]
        how = f"{m['batches_side_by_side']} batches x {m['session_threads']} thread(s)"
        rows += [
            (f"inference only, {mode.replace('_', ' ')} (bench)", f"{m['both']['median_per_s']} img/s", how),
            ("  gate alone / classifier alone", f"{m['gate']['median_per_s']} / {m['classifier']['median_per_s']}", ""),
            ("  gate share of inference time", f"{m['gate_share_of_inference']:.1%}", ""),
        ]
    rows += [
        ("cxrbatch run, bench, cold", f"{e2e['cold']['per_s']} img/s", f"{e2e['cold']['seconds']} s"),
        ("cxrbatch run, bench, warm", f"{e2e['warm']['median_per_s']} img/s", _spread(e2e["warm"])),
        (
            "  the same with a decoding process per core",
            f"{r['end_to_end_bench_decoders']['warm']['median_per_s']} img/s",
            f"{r['ratios']['decoding_processes_over_threads']} of the threads' rate",
        ),
        ("cxrbatch run, synthetic 1024px JPEG, warm", f"{r['end_to_end_synthetic']['warm']['median_per_s']} img/s", ""),
        ("seed-style Keras loop (bench subset)", str(r["seed_baseline_bench"].get("median_per_s", "skipped")), ""),
        ("end to end / inference only", str(r["ratios"]["end_to_end_over_inference_only"]), ""),
        ("end to end / seed loop", str(r["ratios"]["end_to_end_over_seed_loop"]), ""),
        (
            f"peak RSS MB ({' / '.join(r['peak_rss_mb'])} files)",
            " / ".join(str(v) for v in r["peak_rss_mb"].values()),
            "",
        ),
        ("single image, start to report", f"{r['single_image_latency_s']['median']} s", ""),
        (
            "CPU s per image: decode / inference",
            f"{eff['decode_cpu_s_per_image']} / {eff['inference_cpu_s_per_image']}",
            "",
        ),
        ("limit (cores / CPU s per image)", f"{eff['limit_per_s']} img/s", ""),
        ("end to end / limit", str(eff["end_to_end_over_limit"]), ""),
        ("screening phase / limit", str(eff["screening_phase_over_limit"]), ""),
        (
            "core-seconds: decode+infer / other / idle",
            " / ".join(str(eff["core_seconds"][k]) for k in ("decode_and_inference", "other_cpu", "idle")),
            f"of {eff['core_seconds']['available']}",
        ),
    ]
    rows += [
        (f"decode only, {k}", f"{v['median_per_s']} img/s", f"n={v['images']}")
        for k, v in r["decode_only_bench"].items()
    ]
    print(f"machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs")
    for name, value, extra in rows:
        print(f"{name:<48}{value:>22}  {extra}")


def _spread(s: dict[str, Any]) -> str:
    return f"[{s['min_per_s']}-{s['max_per_s']}]"


if __name__ == "__main__":
    run_main(main)
