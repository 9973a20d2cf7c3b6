"""Train the gate or the classifier: MobileNetV2 transfer learning in two phases, on cached activations.

A 2-core machine cannot afford to run the whole MobileNetV2 forward pass every epoch, so the
frozen part runs once per augmented view (`cache`):

1. every training image is augmented `views` times; each view goes through the frozen base up to
   `cache_layer` and that activation is cached (val images once, unaugmented);
2. phase 1: the frozen top blocks turn the cache into pooled features and the new head trains on
   them (Adam 1e-3, LR reduction on plateau, early stopping on val loss);
3. phase 2: every layer above the cache point (`cache_layer`, default the end of block 12, so
   blocks 13-16 and `Conv_1`) is unfrozen, batch-norm statistics kept frozen, and trains with
   the head at 1e-4 on the cached activations, one random view per image per epoch
   (`epochs2=0` skips it; `source_alignment` adds the per-class source alignment loss of
   `sources`, whose sample weights both phases use).

`exclude_sources` leaves manifest sources out of train and val, for leave-source-out checks;
`zoom_out` is the chance that an augmented view is set in a wider frame instead of being
cropped to about `crop_area` of the film or more (`augment.augment`); `negative_label` names
the classifier's no-finding class (a class folder; it goes into the model's metadata).

The checkpoint is a `.keras` file whose input takes 0..255 pixels (grey replicated and scaling
done inside the graph) and a `<ckpt>.json` sidecar with labels, input spec and training summary.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxrbatch.datasets import (
    Split,
    class_names,
    load_split,
    read_manifest,
    refuse_out_inside,
    sources_of,
    without_sources,
)
from cxrbatch.errors import UsageError
from cxrbatch.files import check_out, staged, write_failed

from .cache import ViewSampler, cache_activations, pool_features, refuse_unreadable
from .config import DEFAULTS, TrainConfig, sidecar_path
from .network import backbone_of, build_model, calibrate_batchnorm, cut_at, head_model, top_model, unfreeze_above
from .sources import alignment_plan, alignment_targets, sample_weights, source_alignment_loss

log = logging.getLogger(__name__)
Plan = list[tuple[int, tuple[str, ...]]]


@dataclass
class _Fitting:
    """What both phases train on: the cached activations of the two splits, targets and weights."""

    config: TrainConfig
    train: Split
    val: Split
    train_sources: list[str]
    val_sources: list[str]
    train_cache: np.ndarray  # (N, views, h, w, c), float16
    val_cache: np.ndarray  # (M, h, w, c), float16
    weights: np.ndarray

    def targets(self, split: Split) -> np.ndarray:
        """One-hot class targets (classifier) or the 0/1 target of the sigmoid (gate: 1 for its positive label)."""
        if self.config.role == "gate":
            return positives(split, self.config).astype(np.float32)[:, None]
        return np.eye(len(split.classes), dtype=np.float32)[split.labels]


def positives(split: Split, config: TrainConfig) -> np.ndarray:
    """The gate's films of its positive label (chest X-rays), whatever the folders' order."""
    return split.labels == split.classes.index(str(config.positive_label))


def train(
    role: str,
    data_dir: Path,
    out: Path,
    base_weights: Path | None,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train one model on `data_dir` and save `out` (.keras) with its `.json` sidecar."""
    config = config or DEFAULTS[role]
    check_out(out, ".keras")  # before the hours of training, not after
    check_out(sidecar_path(out), ".json", "--out's sidecar")  # written last, after the checkpoint
    refuse_out_inside(data_dir, out)
    train_split, val_split, manifest = load_data(data_dir, config)
    if base_weights is not None and not base_weights.is_file():
        raise UsageError(f"Base weights not found: {base_weights}")
    refuse_unreadable(train_split.paths + val_split.paths)  # not a val film found once every train view is cached
    keras.utils.set_random_seed(config.seed)
    started = time.time()
    model = build_model(config, len(train_split.classes), base_weights)
    below, above = cut_at(model, config.cache_layer)
    fitting = _cache_splits(model, below, config, (train_split, val_split), manifest, calibrate=base_weights is None)
    history, head_only, pooled_val = _phase1(model, above, fitting)
    if config.epochs2 <= 0:  # head only, as the original recipe: the whole backbone stays frozen
        plan: Plan = []
        history["phase2_epochs"] = 0
        val_scores = np.asarray(head_only.predict(pooled_val, batch_size=config.batch_size, verbose=0))
    else:
        plan, phase2, val_scores = _phase2(model, above, fitting)
        history.update(phase2)
    summary = _summary(data_dir, fitting, history, plan, val_scores, base_weights)
    summary["train_seconds"] = round(time.time() - started, 1)
    summary["made_with"] = made_with()
    save_checkpoint(model, out, summary)
    log.info("saved %s in %.0f s", out, summary["train_seconds"])
    return summary


def save_checkpoint(model: keras.Model, out: Path, summary: dict[str, Any]) -> None:
    """Write `out` and its sidecar, each through a temporary file renamed into place (Keras writes a
    .keras file in place), the old sidecar removed before the checkpoint takes its place: a full
    disk or a kill leaves the last run's pair as it was, or a checkpoint without a sidecar (which
    `export` refuses), never a truncated checkpoint or one beside another run's sidecar."""
    sidecar = sidecar_path(out)
    text = json.dumps(summary, indent=2) + "\n"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)  # check_out checked that it can be made, and made nothing
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as folder:
            made = Path(folder) / out.name  # Keras wants the .keras suffix
            model.save(made)
            with staged(sidecar, lambda fh: fh.write(text), what="checkpoint sidecar") as commit:
                sidecar.unlink(missing_ok=True)
                os.replace(made, out)
                commit()
    except OSError as exc:
        raise write_failed("checkpoint", out, exc) from None


def made_with() -> dict[str, str]:
    """The libraries and processor a model was trained with: a rerun reproduces a model bit for bit
    only with the same ones (decoding and augmentation go through Pillow, the kernels through
    TensorFlow's CPU code paths, which differ between processors)."""
    import platform

    import PIL
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "cpu": f"{cpu} ({os.cpu_count()} cores)",
    }


def _cache_splits(
    model: keras.Model,
    below: keras.Model,
    config: TrainConfig,
    splits: tuple[Split, Split],
    manifest: dict[str, dict[str, str]],
    calibrate: bool,
) -> _Fitting:
    """Cache the train views and the clean val images below the cut, with their sources and weights."""
    train_split, val_split = splits
    spec = config.input_spec()
    rng = np.random.default_rng(config.seed)  # one stream: train's view seeds, then val's
    if calibrate:
        calibrate_batchnorm(model, train_split, spec, config.batch_size)
    log.info("caching %d train images x %d views", len(train_split.paths), config.views)
    train_sources = sources_of(train_split.paths, manifest)
    return _Fitting(
        config,
        train_split,
        val_split,
        train_sources,
        sources_of(val_split.paths, manifest),
        cache_activations(below, train_split, spec, config, rng, views=config.views),
        cache_activations(below, val_split, spec, config, rng, views=0)[:, 0],
        sample_weights(train_split.labels, train_sources, len(train_split.classes)),
    )


def load_data(data_dir: Path, config: TrainConfig) -> tuple[Split, Split, dict[str, dict[str, str]]]:
    """The train and val splits less the excluded sources, and the manifest; refuse what cannot train."""
    classes = class_names(data_dir)
    if config.role == "classifier" and config.negative_label not in classes:
        raise UsageError(
            f"the classifier's negative label {config.negative_label!r} is not a class of {data_dir / 'train'} "
            f"({list(classes)}); give the no-finding class as --negative-label"
        )
    if config.role == "gate" and config.negative_label is not None:
        raise UsageError(f"only the classifier has a negative label (the gate scores {config.positive_label})")
    if config.role == "gate" and config.label_smoothing:  # it would be recorded in the gate's metadata, not used
        raise UsageError("only the classifier takes a label smoothing (the gate's loss is plain binary cross-entropy)")
    if config.role == "gate" and (len(classes) != 2 or config.positive_label not in classes):
        raise UsageError(
            f"the gate learns chest X-rays against everything else: {data_dir / 'train'} needs two class folders, "
            f"{config.positive_label} and one other (e.g. NOT_{config.positive_label}), found {list(classes)}"
        )
    manifest = read_manifest(data_dir)
    whole = {name: load_split(data_dir, name, classes) for name in ("train", "val")}
    train_split, val_split = (without_sources(whole[n], manifest, config.exclude_sources) for n in ("train", "val"))
    if not len(train_split.paths) or not len(val_split.paths):
        raise UsageError(f"{data_dir}: train and val splits both need images")
    untrained, why = _absent(train_split, whole["train"], config)
    if untrained:
        raise UsageError(f"{data_dir / 'train'}: no film of {untrained} is left to train on{why}")
    unjudged, why = _absent(val_split, whole["val"], config)
    if unjudged and config.role == "gate":
        raise UsageError(
            f"the gate's threshold is set on val: {data_dir / 'val'} needs films of both {list(classes)}{why}"
        )
    if unjudged:  # early stopping, LR plateaus, the best weights kept and the val accuracy would all ignore it
        raise UsageError(f"the classifier is judged on val: {data_dir / 'val'} has no film of {unjudged}{why}")
    return train_split, val_split, manifest


def _absent(split: Split, whole: Split, config: TrainConfig) -> tuple[list[str], str]:
    """The classes `split` has no film of, and why where `--exclude-source` took their films ("" if not)."""
    missing = [c for c, n in split.counts().items() if n == 0]
    taken = [c for c in missing if whole.counts()[c]]
    why = f" once {list(config.exclude_sources)} are left out (they held every film of {taken} there)" if taken else ""
    return missing, why


def _phase1(model: keras.Model, above: keras.Model, f: _Fitting) -> tuple[dict[str, Any], keras.Model, np.ndarray]:
    """Train the head on pooled features of every cached view; return its history, model and val features."""
    config = f.config
    log.info("phase 1: head on frozen features")
    pooled_train = pool_features(above, f.train_cache.reshape((-1, *f.train_cache.shape[2:])), config.batch_size)
    pooled_val = pool_features(above, f.val_cache, config.batch_size)
    head_only = head_model(model, pooled_train.shape[1])
    history = fit_head(head_only, config, (pooled_train, f.targets(f.train), f.weights), (pooled_val, f.targets(f.val)))
    return history, head_only, pooled_val


def fit_head(
    head: keras.Model,
    config: TrainConfig,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Phase 1 proper: the head on pooled features of `config.views` views per image, in image
    order (train = features (N * views, d), one target and one weight per image), early stopping
    on the val loss with the best weights kept; the leave-one-collection-out study fits its
    heads with this too."""
    features, targets, weights = train
    _compile(head, config, config.lr1)
    history = head.fit(
        features,
        np.repeat(targets, config.views, axis=0),
        sample_weight=np.repeat(weights, config.views),
        validation_data=val,
        batch_size=config.batch_size,
        epochs=config.epochs1,
        callbacks=_callbacks(patience=5, monitor="loss"),
        verbose=2,
    )
    return {
        "phase1_epochs": len(history.history["loss"]),
        "phase1_best_val_loss": float(min(history.history["val_loss"])),
    }


def _phase2(model: keras.Model, above: keras.Model, f: _Fitting) -> tuple[Plan, dict[str, Any], np.ndarray]:
    """Train the layers above the cache point with the head, one random cached view per image per
    epoch; return the alignment plan, the history and the val scores."""
    config, classes = f.config, f.train.classes
    log.info("phase 2: top blocks unfrozen")
    unfreeze_above(backbone_of(model), config.cache_layer)
    plan = alignment_plan(f.train.labels, f.train_sources, len(classes)) if config.source_alignment > 0 else []
    log.info("source alignment: %s", {classes[c]: names for c, names in plan} or "none")
    top = top_model(model, above, aligned=bool(plan))
    _compile(top, config, config.lr2, alignment=tuple(len(names) for _, names in plan))
    output = "head_" if plan else ""  # Keras prefixes metric names by output once there are several
    y_fit, y_check = {"head": f.targets(f.train)}, {"head": f.targets(f.val)}
    if plan:
        y_fit["align"] = alignment_targets(plan, f.train.labels, f.train_sources)
        y_check["align"] = alignment_targets(plan, f.val.labels, f.val_sources)
    history = top.fit(
        ViewSampler(f.train_cache, y_fit, f.weights, config.batch_size, config.seed),
        validation_data=(f.val_cache, y_check),
        epochs=config.epochs2,
        callbacks=_callbacks(patience=8, monitor="accuracy", output=output),
        verbose=2,
    )
    # `top` shares every trained layer with `model`, which is what gets saved.
    val_scores = np.asarray(top.predict(f.val_cache, batch_size=config.batch_size, verbose=0)["head"])
    phase2 = {
        "phase2_epochs": len(history.history["loss"]),
        "phase2_best_val_loss": float(min(history.history[f"val_{output}loss"])),  # of any epoch
        **kept_epoch(history.history, output),
    }
    return plan, phase2, val_scores


def kept_epoch(history: dict[str, list[float]], output: str = "") -> dict[str, Any]:
    """The phase-2 epoch whose weights the model keeps, and its val figures: early stopping on val
    accuracy restores the first epoch of the best (the lowest val loss may be another epoch's)."""
    accuracy = history[f"val_{output}accuracy"]
    kept = int(np.argmax(accuracy))  # the first of equals, as Keras counts only a strict improvement
    return {
        "phase2_kept_epoch": kept + 1,
        "phase2_kept_val_accuracy": float(accuracy[kept]),
        "phase2_kept_val_loss": float(history[f"val_{output}loss"][kept]),
    }


def _summary(
    data_dir: Path, f: _Fitting, history: dict[str, Any], plan: Plan, val_scores: np.ndarray, weights: Path | None
) -> dict[str, Any]:
    """The checkpoint sidecar: what the exporter writes into the model's metadata."""
    config, classes = f.config, f.train.classes
    validation, threshold = _validate(config, f.val, val_scores)
    return {
        "role": config.role,
        "labels": list(classes),
        "positive_label": config.positive_label if config.role == "gate" else None,  # what the sigmoid scores
        "negative_label": config.negative_label,
        "input": asdict(config.input_spec()),
        "config": asdict(config),
        "data": {"dir_name": data_dir.name, "train": f.train.counts(), "val": f.val.counts()},
        "sources": training_sources(f.train_sources, [classes[i] for i in f.train.labels]),
        "history": history,
        "source_alignment": {classes[c]: list(names) for c, names in plan},
        "validation": validation,
        "threshold": threshold,
        "base_weights": weights.name if weights else None,
    }


def training_sources(sources: list[str], labels: list[str]) -> list[dict[str, Any]]:
    """Train images per (source, label), sorted: the `training.sources` record of the model."""
    counts = Counter(zip(sources, labels, strict=True))
    return [{"source": s or "unknown", "label": lab, "train": n} for (s, lab), n in sorted(counts.items())]


def _validate(config: TrainConfig, val: Split, scores: np.ndarray) -> tuple[dict[str, float], float]:
    """Score the val split; for the gate, pick the threshold that keeps 99.8% of val X-rays (at most 0.5)."""
    if config.role != "gate":
        accuracy = float((scores.argmax(axis=1) == val.labels).mean())
        return {"val_accuracy": round(accuracy, 4)}, 0.0
    xray = positives(val, config)
    positive = scores[xray, 0]
    threshold = float(min(0.5, np.quantile(positive, 0.002)))
    return {
        "val_xray_kept": round(float((positive >= threshold).mean()), 4),
        "val_not_xray_rejected": round(float((scores[~xray, 0] < threshold).mean()), 4),
    }, threshold


def _compile(model: keras.Model, config: TrainConfig, lr: float, alignment: tuple[int, ...] = ()) -> None:
    """Adam at `lr`; the class loss on the head and, with `alignment` (sources per aligned class),
    the source alignment loss on the pooled features, weighted by `config.source_alignment`."""
    if config.role == "gate":
        loss: Any = "binary_crossentropy"
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    optimizer = keras.optimizers.Adam(lr)
    if alignment:
        model.compile(
            optimizer=optimizer,
            loss={"head": loss, "align": source_alignment_loss(alignment)},
            loss_weights={"head": 1.0, "align": config.source_alignment},
            metrics={"head": ["accuracy"]},
        )
    else:
        model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])


def _callbacks(patience: int, monitor: str, output: str = "") -> list[keras.callbacks.Callback]:
    """LR reduction on a val-loss plateau; early stopping on val `monitor`, keeping the best weights.

    `output` is the prefix Keras gives the head's metrics in a model with several outputs."""
    return [
        keras.callbacks.ReduceLROnPlateau(
            monitor=f"val_{output}loss", mode="min", factor=0.3, patience=max(1, patience // 2 + 1), min_lr=1e-6
        ),
        keras.callbacks.EarlyStopping(
            monitor=f"val_{output}{monitor}",
            mode="max" if monitor == "accuracy" else "min",
            patience=patience,
            restore_best_weights=True,
        ),
    ]
