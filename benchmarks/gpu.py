"""The CUDA provider path, measured against the CPU in one run on a machine with a GPU.

    python -m benchmarks.gpu --json benchmarks/results/gpu.json [--fp16 DIR]

Needs onnxruntime-gpu and a CUDA device. Needs no ../shared: the images are synthetic 1024-px
JPEGs made from the Kermany radiographs in samples/ (random crops and brightness shifts). Each
section runs on its own, so one failure is recorded in the JSON and does not hide the others:

1. which providers the sessions really got (`--device cuda` must not fall back to the CPU);
2. parity: CUDA against CPU scores and CAMs on the same tensors (TF32 on and off, and float16);
3. inference only, gate + classifier on pre-decoded tensors, CPU against CUDA, by batch size;
4. `cxrbatch run` end to end in a fresh process, CPU against CUDA, by batch size, worker threads and
   decoding processes (`--decoders`), whole process and screening phase apart;
5. one image, process start to report written, CPU against CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import run_main
from benchmarks.harness import cli_run, model_inputs, stats, synthetic_set, timed
from benchmarks.run import end_to_end as run_end_to_end
from cxrbatch.imaging import load_image
from cxrbatch.models import CPU, CUDA, Model, default_models_dir, load_model, load_models

REPO = Path(__file__).resolve().parent.parent
RADIOGRAPHS = sorted((REPO / "samples").glob("*.jpeg"))
PHOTOS = [REPO / "samples" / "chelsea.png", REPO / "samples" / "rocket.jpg"]
SECTIONS = ("environment", "providers", "parity", "single_image", "search", "end_to_end", "inference_only")


def add_photos(folder: Path, n: int) -> None:
    """n JPEG crops of the bundled photos among the radiographs: the gate rejects them, so the
    classifier's batches come in varying sizes, as in a real inbox."""
    rng = np.random.default_rng(1)
    for i in range(n):
        img = load_image(PHOTOS[i % len(PHOTOS)]).convert("RGB")
        w, h = img.size
        x, y = (int(v) for v in rng.integers(0, min(w, h) // 5, 2))
        img.crop((x, y, w - y, h - x)).save(folder / f"syn{i * 20 + 7:06d}x.jpg", quality=85)


def section(report: dict[str, Any], name: str, fn: Callable[[], Any], json_path: Path | None) -> None:
    """Run one measurement; keep its result or its error, and save what we have so far."""
    report[name] = attempt(fn)
    print(f"== {name}: {json.dumps(report[name])[:1500]}", flush=True)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """One measurement: its result, or its error (and where it happened) in place of it.

    SystemExit too: `cli_run` ends that way when a command fails, and one failure must not lose
    the other measurements."""
    try:
        return fn(*args)
    except (Exception, SystemExit) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[-1500:], "traceback": traceback.format_exc()[-2000:]}


def environment() -> dict[str, Any]:
    import onnxruntime as ort

    gpu = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        if shutil.which("nvidia-smi")
        else None
    )
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "available_providers": list(ort.get_available_providers()),
        "gpu": gpu,
    }


def providers_check(models_dir: Path) -> dict[str, Any]:
    gate, classifier = load_models(models_dir, "cuda")
    options = classifier.session.get_provider_options().get(CUDA, {})
    return {
        "gate": gate.providers,
        "classifier": classifier.providers,
        "cuda_first": gate.on_gpu and classifier.on_gpu,
        "cudnn_conv_algo_search": options.get("cudnn_conv_algo_search"),
    }


def load_pair(models_dir: Path, providers: list[Any]) -> tuple[Model, Model]:
    """The gate and the classifier with explicit providers (and provider options)."""
    return (
        load_model(models_dir / "gate.onnx", "gate", providers),
        load_model(models_dir / "classifier.onnx", "classifier", providers),
    )


def parity(models_dir: Path, fp16_dir: Path | None, paths: list[Path]) -> dict[str, Any]:
    """Largest differences of CUDA (and float16) outputs from the CPU float32 outputs."""
    import onnxruntime as ort

    cpu_gate, cpu_clf = load_models(models_dir, "cpu")
    g, c = model_inputs(paths, cpu_gate, cpu_clf)
    ref_g = cpu_gate.run(g)[cpu_gate.spec.score_output]
    ref_c = cpu_clf.run(c, with_cam=True)

    def compare(gate: Model, clf: Model) -> dict[str, Any]:
        out_g = gate.run(g)[gate.spec.score_output]
        out_c = clf.run(c, with_cam=True)
        scores, cam = clf.spec.score_output, clf.spec.cam_output
        result = {
            "gate_max_abs": float(np.abs(out_g - ref_g).max()),
            "gate_decisions_changed": int(((out_g >= gate.spec.threshold) != (ref_g >= gate.spec.threshold)).sum()),
            "classifier_max_abs": float(np.abs(out_c[scores] - ref_c[scores]).max()),
            "top_labels_changed": int((out_c[scores].argmax(1) != ref_c[scores].argmax(1)).sum()),
            "images": len(paths),
            "providers": clf.providers,
        }
        if cam:
            result["cam_max_rel"] = float(np.abs(out_c[cam] - ref_c[cam]).max() / np.abs(ref_c[cam]).max())
        return result

    out: dict[str, Any] = {}
    tf32: list[Any] = [(CUDA, {"use_tf32": "1"}), CPU]
    fp32: list[Any] = [(CUDA, {"use_tf32": "0"}), CPU]
    for name, providers in (("cuda_tf32", tf32), ("cuda_fp32", fp32)):
        out[name] = attempt(lambda p=providers: compare(*load_pair(models_dir, p)))
    if fp16_dir:
        out["cuda_fp16"] = attempt(lambda: compare(*load_models(fp16_dir, "cuda")))
    out["onnxruntime_build"] = ort.get_build_info() if hasattr(ort, "get_build_info") else None
    return out


def search(models_dir: Path, paths: list[Path], batch: int, repeats: int) -> dict[str, Any]:
    """cuDNN algorithm search, exhaustive against heuristic: start-up, first batch, new shape, steady rate."""
    modes = {
        "EXHAUSTIVE": {"cudnn_conv_algo_search": "EXHAUSTIVE"},
        "HEURISTIC": {"cudnn_conv_algo_search": "HEURISTIC"},
        "HEURISTIC, no TF32": {"cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0"},
    }
    return {name: _search_mode(models_dir, paths, batch, repeats, options) for name, options in modes.items()}


def _search_mode(
    models_dir: Path, paths: list[Path], batch: int, repeats: int, options: dict[str, str]
) -> dict[str, Any]:
    providers: list[Any] = [(CUDA, options), CPU]
    started = time.perf_counter()
    gate, clf = load_pair(models_dir, providers)
    sessions_s = time.perf_counter() - started
    g, c = model_inputs(paths, gate, clf)

    def first(n: int) -> float:
        started = time.perf_counter()
        gate.run(g[:n])
        clf.run(c[:n])
        return round(time.perf_counter() - started, 3)

    def steady() -> None:
        for i in range(0, len(g) - batch + 1, batch):
            gate.run(g[i : i + batch])
            clf.run(c[i : i + batch])

    return {
        "create_sessions_s": round(sessions_s, 3),
        "first_batch_s": first(batch),
        "new_batch_shape_s": first(batch - 1),
        "same_shape_again_s": first(batch - 1),
        f"steady batch {batch}": stats(len(g) // batch * batch, timed(steady, repeats)),
    }


def inference_only(models: dict[str, Path], paths: list[Path], batches: list[int], repeats: int) -> dict[str, Any]:
    """Images/s of gate + classifier on pre-decoded tensors, per device, precision and batch size."""
    out: dict[str, Any] = {}
    for label, (models_dir, device) in {
        "cpu_fp32": (models["fp32"], "cpu"),
        "cuda_fp32": (models["fp32"], "cuda"),
        **({"cuda_fp16": (models["fp16"], "cuda")} if "fp16" in models else {}),
    }.items():
        rates = attempt(_rates, models_dir, device, paths, batches, repeats)
        if "error" in rates:
            out[label] = rates
        else:
            out.update({f"{label} batch {batch}": rate for batch, rate in rates.items()})
    return out


def _rates(models_dir: Path, device: str, paths: list[Path], batches: list[int], repeats: int) -> dict[int, Any]:
    """Load the models and decode the tensors once, then time every batch size."""
    gate, clf = load_models(models_dir, device, threads=None)  # one batch at a time, on every core
    g, c = model_inputs(paths, gate, clf)
    return {batch: attempt(_both_rate, gate, clf, g, c, batch, repeats) for batch in batches}


def _both_rate(gate: Model, clf: Model, g: np.ndarray, c: np.ndarray, batch: int, repeats: int) -> dict[str, Any]:
    def both() -> None:
        for i in range(0, len(g), batch):
            gate.run(g[i : i + batch])
            clf.run(c[i : i + batch])

    both()  # warm-up: cuDNN picks its algorithms on the first run of each shape
    return stats(len(g), timed(both, repeats))


def end_to_end(folder: Path, n: int, configs: list[tuple[str, int, int, int, Path]], repeats: int) -> dict[str, Any]:
    """`benchmarks.run.end_to_end` (fresh-process runs, cold apart from warm, the screening phase
    from each run's JSON apart from the whole process, whose start-up, CUDA's above all, weighs on
    a small folder) per (device, batch, workers, decoding processes, models)."""
    out: dict[str, Any] = {}
    for device, batch, workers, decoders, models_dir in configs:
        options = ["--device", device, "--batch-size", str(batch), "--workers", str(workers)]
        options += ["--decoders", str(decoders), "--models", str(models_dir)]
        key = f"{device} {models_dir.name} batch {batch} workers {workers}"
        key += f" decoders {decoders}" if decoders else ""
        out[key] = attempt(run_end_to_end, folder, n, repeats, folder.parent / "e2e.csv", tuple(options))
    return out


def single_image(path: Path, out_dir: Path, repeats: int) -> dict[str, Any]:
    out = {}
    for device in ("cpu", "cuda"):
        args = ["run", str(path), "--out", str(out_dir / "one.csv"), "-q", "--device", device]
        out[device] = attempt(_latency, args, repeats)
    return out


def _latency(args: list[str], repeats: int) -> dict[str, Any]:
    seconds = [cli_run(args)[0] for _ in range(repeats)]
    return {"median_s": round(statistics.median(seconds), 2), "all": [round(s, 2) for s in seconds]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic 1024-px JPEGs for end to end")
    parser.add_argument("--tensors", type=int, default=512, help="pre-decoded images for inference only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fp16", type=Path, help="folder with float16 gate.onnx and classifier.onnx")
    parser.add_argument("--photos", type=float, default=0.05, help="share of non-X-ray photos among the images")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--e2e",
        nargs="+",
        default=["cpu:8:2", "cpu:32:8", "cuda:32:2", "cuda:32:8", "cuda:32:14", "cuda:64:14", "cuda:32:14:14"],
        help="end-to-end runs as DEVICE:BATCH:WORKERS[:DECODERS], DECODERS being `--decoders` (decoding"
        " processes; default 0); the float16 models are added at cuda:64:14",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print(
            "no CUDA provider in this onnxruntime: the CUDA sections record a DeviceError and only the CPU figures "
            "are measured (on a GPU machine, install onnxruntime-gpu)",
            file=sys.stderr,
        )
    fp32_dir = default_models_dir()
    models = {"fp32": fp32_dir, **({"fp16": args.fp16.resolve()} if args.fp16 else {})}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        syn = synthetic_set(root / "synthetic", RADIOGRAPHS, args.images, workers=os.cpu_count() or 1)
        add_photos(syn, int(args.images * args.photos))
        paths = sorted(syn.iterdir())
        n = len(paths)
        fields = [c.split(":") for c in args.e2e]
        configs = [(d, int(b), int(w), int(p[0]) if p else 0, fp32_dir) for d, b, w, *p in fields]
        if "fp16" in models:
            configs.append(("cuda", 64, 14, 0, models["fp16"]))
        measures: dict[str, Callable[[], Any]] = {
            "environment": environment,
            "providers": lambda: providers_check(fp32_dir),
            "parity": lambda: parity(fp32_dir, models.get("fp16"), paths[:64]),
            "single_image": lambda: single_image(paths[0], root, args.repeats),
            "search": lambda: search(fp32_dir, paths[: args.tensors], 32, args.repeats),
            "end_to_end": lambda: end_to_end(syn, n, configs, 2),
            "inference_only": lambda: inference_only(models, paths[: args.tensors], [8, 32, 64], args.repeats),
        }
        report["images"] = {"radiographs": args.images, "photos": n - args.images}
        for name in args.sections:
            section(report, name, measures[name], args.json)


if __name__ == "__main__":
    run_main(main)
