"""Source probe: how well do a model's pooled features tell which source an image came from?

Within one class (NORMAL by default, the only class that several sources share), a linear
softmax probe is trained on train-split features to predict the source and scored on the val
split. High probe accuracy means the features carry the source's look, which a classifier can
use as a shortcut wherever classes and sources are confounded. Comparing the trained
classifier's features with the ImageNet initialisation shows whether training added to or took
away from that (`cxrbatch probe`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxrbatch.datasets import Split, class_names, load_split, read_manifest, sources_of
from cxrbatch.errors import UsageError
from cxrbatch.imaging import load_image
from cxrbatch.modelinput import InputSpec, to_model_input

from .config import TrainConfig, sidecar_path
from .network import backbone_features, build_model

MIN_IMAGES = 10  # sources with fewer train images of the class are left out


def features(model: keras.Model, spec: InputSpec, paths: list[Path], batch: int = 64) -> np.ndarray:
    """Pooled backbone features (before the head) of each image, preprocessed as at run time."""
    inputs = keras.Input((spec.height, spec.width, spec.channels))
    pooled = model.get_layer("pool")(backbone_features(model, inputs))
    extractor = keras.Model(inputs, pooled)
    out = []
    for i in range(0, len(paths), batch):
        arr = np.stack([to_model_input(load_image(p), spec) for p in paths[i : i + batch]])
        out.append(np.asarray(extractor.predict_on_batch(arr)))
    return np.concatenate(out)


def fit_probe(x: np.ndarray, y: np.ndarray, k: int, epochs: int = 300, seed: int = 0) -> keras.Model:
    """Train a linear softmax probe on standardised features."""
    keras.utils.set_random_seed(seed)
    probe = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(k, activation="softmax")])
    probe.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    probe.fit(x, y, batch_size=len(x), epochs=epochs, verbose=0)
    return probe


def run_probe(model: keras.Model, spec: InputSpec, data_dir: Path, label: str) -> dict[str, Any]:
    """Probe source identity among images of one class: val accuracy against the majority baseline."""
    classes = class_names(data_dir)
    manifest = read_manifest(data_dir)
    train, val = (load_split(data_dir, s, classes) for s in ("train", "val"))
    index = classes.index(label)

    def pick(split: Split) -> tuple[list[Path], list[str]]:
        paths = [p for p, y in zip(split.paths, split.labels, strict=True) if y == index]
        return paths, sources_of(paths, manifest)

    train_paths, train_src = pick(train)
    counts = Counter(train_src)
    sources = sorted(s for s, n in counts.items() if s and n >= MIN_IMAGES)
    if len(sources) < 2:
        raise UsageError(
            f"the probe needs two or more MANIFEST.csv sources with {MIN_IMAGES}+ train images of {label}; "
            f"{data_dir} has {len(sources)}"
        )
    keep_t = [i for i, s in enumerate(train_src) if s in sources]
    val_paths, val_src = pick(val)
    keep_v = [i for i, s in enumerate(val_src) if s in sources]
    if not keep_v:
        raise UsageError(f"{data_dir / 'val'} has no {label} film of the probed sources {sources}: nothing to score on")
    xt = features(model, spec, [train_paths[i] for i in keep_t])
    xv = features(model, spec, [val_paths[i] for i in keep_v])
    yt = np.array([sources.index(train_src[i]) for i in keep_t])
    yv = np.array([sources.index(val_src[i]) for i in keep_v])
    mean, std = xt.mean(axis=0), xt.std(axis=0) + 1e-6
    linear = fit_probe((xt - mean) / std, yt, len(sources))
    pred = linear.predict((xv - mean) / std, verbose=0).argmax(axis=1)
    per_source = {s: float((pred[yv == i] == i).mean()) for i, s in enumerate(sources) if (yv == i).any()}
    return {
        "class": label,
        "sources": sources,
        "train_images": len(yt),
        "val_images": len(yv),
        "probe_val_accuracy": float((pred == yv).mean()),
        "majority_baseline": float(np.bincount(yv).max() / len(yv)),
        "recall_per_source": per_source,
    }


def probe(ckpt: Path, data_dir: Path, base_weights: Path | None = None, label: str | None = None) -> dict[str, Any]:
    """Probe a trained classifier and, with `base_weights`, the ImageNet initialisation for comparison.

    `label` is the class whose images are probed; by default the checkpoint's negative label
    (the no-finding class, the one several sources share)."""
    if not ckpt.is_file() or not sidecar_path(ckpt).is_file():
        raise UsageError(f"Checkpoint or its sidecar not found: {ckpt} (made by `cxrbatch train`)")
    if base_weights is not None and not base_weights.is_file():
        raise UsageError(f"Base weights not found: {base_weights}")
    summary = json.loads(sidecar_path(ckpt).read_text(encoding="utf-8"))
    label = label or summary.get("negative_label")
    if label not in summary["labels"]:
        why = f"{label!r} is not one of them" if label else "the sidecar has no negative label"
        raise UsageError(f"name the class to probe, one of {summary['labels']} ({why})")
    spec = InputSpec(**summary["input"])
    trained = keras.models.load_model(ckpt, compile=False)
    report = {"trained": run_probe(trained, spec, data_dir, label)}
    if base_weights is not None:
        config = TrainConfig(**summary["config"])
        imagenet = build_model(config, len(summary["labels"]), base_weights)
        report["imagenet"] = run_probe(imagenet, spec, data_dir, label)
    return report
