"""Train the gate or the classifier: MobileNetV2 transfer learning in two phases, on cached activations.

A 2-core machine cannot afford to run the whole MobileNetV2 forward pass every epoch, so the
frozen part runs once per augmented view:

1. every training image is augmented `views` times; each view goes through the frozen base up to
   `cache_layer` and that activation is cached (val images once, unaugmented);
2. phase 1: the frozen top blocks turn the cache into pooled features and the new head trains on
   them (Adam 1e-3, LR reduction on plateau, early stopping on val loss);
3. phase 2: every layer above the cache point (`cache_layer`, default the end of block 12, so
   blocks 13-16 and `Conv_1`) is unfrozen, batch-norm statistics kept frozen, and trains with
   the head at 1e-4 on the cached activations, one random view per image per epoch
   (`epochs2=0` skips it; `source_alignment` adds the per-class source alignment loss).

`exclude_sources` leaves manifest sources out of train and val, for leave-source-out checks;
`zoom_out` is the chance that an augmented view is set in a wider frame instead of being
cropped to about `crop_area` of the film or more (`export.data.augment`).

The checkpoint is a `.keras` file whose input takes 0..255 pixels (grey replicated and scaling
done inside the graph) and a `<ckpt>.json` sidecar with labels, input spec and training summary.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from cxrbatch.datasets import Split, class_names, load_split, read_manifest, sources_of, without_sources
from cxrbatch.imaging import InputSpec, load_image, to_model_input
from export.data import augment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved in the checkpoint sidecar."""

    role: str
    size: int
    alpha: float = 1.0
    views: int = 4
    epochs1: int = 40
    epochs2: int = 8
    batch_size: int = 64
    lr1: float = 1e-3
    lr2: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.0  # classifier only
    clahe: float = 0.0  # classifier only: CLAHE clip limit instead of global equalisation
    seed: int = 1234
    cache_layer: str = "block_12_add"  # frozen below (cached once), trainable above in phase 2
    source_alignment: float = 0.0  # classifier only: weight of the per-class source alignment loss in phase 2
    exclude_sources: tuple[str, ...] = ()  # manifest sources left out of train and val (leave-source-out runs)
    zoom_out: float = 0.0  # chance that an augmented view is set in a wider frame (`export.data.zoom_out_frame`)
    crop_area: float = 0.70  # the other views are cropped to this share of the film's area or more

    def __post_init__(self) -> None:
        if not 0.0 <= self.zoom_out <= 1.0 or not 0.0 < self.crop_area <= 1.0:
            raise ValueError(
                f"zoom_out must be in [0, 1] and crop_area in (0, 1], not {self.zoom_out}, {self.crop_area}"
            )

    def input_spec(self) -> InputSpec:
        """Gate sees colour (photos are colourful); the classifier sees equalised grey."""
        if self.role == "gate":
            return InputSpec(self.size, self.size, channels=3, colour="rgb", equalize=False)
        return InputSpec(self.size, self.size, channels=1, colour="grey", equalize=not self.clahe, clahe=self.clahe)


DEFAULTS = {
    "gate": TrainConfig(role="gate", size=112, views=3),
    "classifier": TrainConfig(
        role="classifier", size=224, views=10, epochs2=30, lr2=3e-5, cache_layer="block_5_add", zoom_out=0.5
    ),
}


def build_model(config: TrainConfig, n_classes: int, base_weights: Path | None) -> keras.Model:
    """Build the full model: 0..255 pixels in, probabilities out, MobileNetV2 in the middle."""
    spec = config.input_spec()
    inputs = keras.Input((spec.height, spec.width, spec.channels), name="image")
    x = inputs
    if spec.channels == 1:
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="scale")(x)
    base = keras.applications.MobileNetV2(
        input_shape=(spec.height, spec.width, 3), alpha=config.alpha, include_top=False, weights=None
    )
    if base_weights is not None:
        base.load_weights(str(base_weights))
    features = base(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    dropped = keras.layers.Dropout(config.dropout, name="dropout")(pooled)
    head = _head(config, n_classes)
    return keras.Model(inputs, head(dropped), name=f"cxrbatch_{config.role}")


def _head(config: TrainConfig, n_classes: int) -> keras.layers.Dense:
    if config.role == "gate":
        return keras.layers.Dense(1, activation="sigmoid", name="head")
    return keras.layers.Dense(n_classes, activation="softmax", name="head")


def backbone_of(model: keras.Model) -> keras.Model:
    """Return the nested MobileNetV2 of a model made by `build_model`."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError("model has no nested backbone")


def backbone_features(model: keras.Model, inputs: Any) -> Any:
    """The backbone's last feature map for `inputs` (0..255 pixels), through the model's own
    grey-to-RGB and scaling layers: how the export and the source probe rebuild a model's front."""
    x = inputs
    if "grey_to_rgb" in {layer.name for layer in model.layers}:
        x = model.get_layer("grey_to_rgb")([x, x, x])
    return backbone_of(model)(model.get_layer("scale")(x))


def train(
    role: str,
    data_dir: Path,
    out: Path,
    base_weights: Path | None,
    config: TrainConfig | None = None,
) -> dict[str, Any]:
    """Train one model on `data_dir` and save `out` (.keras) with its `.json` sidecar."""
    config = config or DEFAULTS[role]
    keras.utils.set_random_seed(config.seed)
    classes = class_names(data_dir)
    manifest = read_manifest(data_dir)
    train_split = without_sources(load_split(data_dir, "train", classes), manifest, config.exclude_sources)
    val_split = without_sources(load_split(data_dir, "val", classes), manifest, config.exclude_sources)
    if not len(train_split.paths) or not len(val_split.paths):
        raise ValueError(f"{data_dir}: train and val splits both need images")
    started = time.time()
    model = build_model(config, len(classes), base_weights)
    base = backbone_of(model)
    head = model.get_layer("head")
    to_cache = keras.Model(base.input, base.get_layer(config.cache_layer).output)
    below = keras.Model(model.input, to_cache(model.get_layer("scale").output))
    above = keras.Model(base.get_layer(config.cache_layer).output, base.output)
    spec = config.input_spec()
    rng = np.random.default_rng(config.seed)
    if base_weights is None:
        _calibrate_batchnorm(model, base, train_split, spec, config.batch_size)

    log.info("caching %d train images x %d views", len(train_split.paths), config.views)
    train_cache = _cache(below, train_split, spec, config, rng, views=config.views)
    val_cache = _cache(below, val_split, spec, config, rng, views=0)[:, 0]
    y_train, y_val = _targets(config, train_split), _targets(config, val_split)
    sources = sources_of(train_split.paths, manifest)
    weights = sample_weights(train_split.labels, sources, len(classes))

    log.info("phase 1: head on frozen features")
    pooled_train = _pool(above, train_cache.reshape((-1, *train_cache.shape[2:])), config.batch_size)
    pooled_val = _pool(above, val_cache, config.batch_size)
    head_model = _head_model(model, pooled_train.shape[1])
    _compile(head_model, config, config.lr1)
    history1 = head_model.fit(
        pooled_train,
        np.repeat(y_train, config.views, axis=0),
        sample_weight=np.repeat(weights, config.views),
        validation_data=(pooled_val, y_val),
        batch_size=config.batch_size,
        epochs=config.epochs1,
        callbacks=_callbacks(patience=5, monitor="loss"),
        verbose=2,
    )

    plan: list[tuple[int, tuple[str, ...]]] = []
    phase2: dict[str, float] = {"phase2_epochs": 0}
    if config.epochs2 <= 0:  # head only, as the original recipe: the whole backbone stays frozen
        val_scores = np.asarray(head_model.predict(pooled_val, batch_size=config.batch_size, verbose=0))
    else:
        log.info("phase 2: top blocks unfrozen")
        _unfreeze_above(base, config.cache_layer)
        plan = alignment_plan(train_split.labels, sources, len(classes)) if config.source_alignment > 0 else []
        log.info("source alignment: %s", {classes[c]: names for c, names in plan} or "none")
        top_model = _top_model(model, above, aligned=bool(plan))
        _compile(top_model, config, config.lr2, alignment=tuple(len(names) for _, names in plan))
        output = "head_" if plan else ""  # Keras prefixes metric names by output once there are several
        y_fit, y_check = {"head": y_train}, {"head": y_val}
        if plan:
            y_fit["align"] = alignment_targets(plan, train_split.labels, sources)
            y_check["align"] = alignment_targets(plan, val_split.labels, sources_of(val_split.paths, manifest))
        history2 = top_model.fit(
            _ViewSampler(train_cache, y_fit, weights, config.batch_size, config.seed),
            validation_data=(val_cache, y_check),
            epochs=config.epochs2,
            callbacks=_callbacks(patience=8, monitor="accuracy", output=output),
            verbose=2,
        )
        assert head is model.get_layer("head")  # the full model shares every trained layer
        val_scores = np.asarray(top_model.predict(val_cache, batch_size=config.batch_size, verbose=0)["head"])
        phase2 = {
            "phase2_epochs": len(history2.history["loss"]),
            "phase2_best_val_loss": float(min(history2.history[f"val_{output}loss"])),
        }
    validation, threshold = _validate(config, val_split.labels, val_scores)

    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    summary = {
        "role": role,
        "labels": list(classes),
        "input": asdict(spec),
        "config": asdict(config),
        "data": {
            "dir_name": data_dir.name,
            "train": train_split.counts(),
            "val": val_split.counts(),
        },
        "history": {
            "phase1_epochs": len(history1.history["loss"]),
            "phase1_best_val_loss": float(min(history1.history["val_loss"])),
            **phase2,
        },
        "source_alignment": {classes[c]: list(names) for c, names in plan},
        "validation": validation,
        "threshold": threshold,
        "train_seconds": round(time.time() - started, 1),
        "base_weights": base_weights.name if base_weights else None,
    }
    sidecar_path(out).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("saved %s in %.0f s", out, summary["train_seconds"])
    return summary


def sidecar_path(ckpt: Path) -> Path:
    """Where the JSON summary of a checkpoint lives."""
    return ckpt.with_name(ckpt.name + ".json")


def _validate(config: TrainConfig, labels: np.ndarray, scores: np.ndarray) -> tuple[dict[str, float], float]:
    """Score the val split; for the gate, pick the threshold that keeps 99.8% of val X-rays (at most 0.5)."""
    if config.role != "gate":
        accuracy = float((scores.argmax(axis=1) == labels).mean())
        return {"val_accuracy": round(accuracy, 4)}, 0.0
    positive = scores[labels == 1, 0]
    threshold = float(min(0.5, np.quantile(positive, 0.002)))
    return {
        "val_xray_kept": round(float((positive >= threshold).mean()), 4),
        "val_not_xray_rejected": round(float((scores[labels == 0, 0] < threshold).mean()), 4),
    }, threshold


def _targets(config: TrainConfig, split: Split) -> np.ndarray:
    if config.role == "gate":
        return split.labels.astype(np.float32)[:, None]
    return np.eye(len(split.classes), dtype=np.float32)[split.labels]


def sample_weights(labels: np.ndarray, sources: list[str], n: int, cap: float = 5.0) -> np.ndarray:
    """Weight images so that classes are balanced within each source, and rare classes' sources count more.

    Plain inverse-frequency class weights teach a shortcut when a class comes from one source:
    TUBERCULOSIS (141 train images, all from one source whose other 141 images are NORMAL) would
    weigh 8x more than those NORMALs, so "looks like that source" would pay. Here classes are
    balanced within each source (a weight capped at `cap`, so a lone image cannot dominate), and
    then every image of a source is scaled by the square-root class balance of its rarest class:
    the TB source as a whole counts more, its NORMALs as much as its TBs. The mean weight is 1.
    Images without a known source count as one source.
    """
    weights = np.ones(len(labels), dtype=np.float64)
    source_arr = np.asarray(sources, dtype=object)
    present_by_source = {}
    for source in set(sources):
        in_source = source_arr == source
        present = np.unique(labels[in_source])
        present_by_source[source] = present
        for c in present:
            group = in_source & (labels == c)
            weights[group] = min(cap, in_source.sum() / (len(present) * group.sum()))
    totals = np.bincount(labels, weights=weights, minlength=n)
    class_factor = np.sqrt(totals.sum() / (n * np.maximum(totals, 1e-9)))
    for source, present in present_by_source.items():
        weights[source_arr == source] *= class_factor[present].max()
    return (weights / weights.mean()).astype(np.float32)


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


def alignment_plan(
    labels: np.ndarray, sources: list[str], n: int, min_images: int = 10
) -> list[tuple[int, tuple[str, ...]]]:
    """Per class, the sources whose features the alignment loss pulls together.

    Only sources with at least `min_images` train images of that class count, and only classes
    with two or more such sources are aligned (TUBERCULOSIS, from one source, is not).
    """
    source_arr = np.asarray(sources, dtype=object)
    plan = []
    for c in range(n):
        names, counts = np.unique(source_arr[labels == c].astype(str), return_counts=True)
        kept = tuple(str(name) for name, k in zip(names, counts, strict=True) if name and k >= min_images)
        if len(kept) >= 2:
            plan.append((c, kept))
    return plan


def alignment_targets(plan: list[tuple[int, tuple[str, ...]]], labels: np.ndarray, sources: list[str]) -> np.ndarray:
    """Source membership masks, one column per (class, source) of `plan`, in plan order; all-zero
    rows for images of other classes or smaller sources."""
    source_arr = np.asarray(sources, dtype=object)
    columns = [(labels == c) & (source_arr == name) for c, names in plan for name in names]
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((len(labels), 0), np.float32)


def source_alignment_loss(groups: tuple[int, ...]) -> Any:
    """A loss on the pooled features: for each aligned class, the spread of its per-source feature
    means within the batch, in units of the batch's feature variance for that class.

    The variance is differentiated too, so the loss is scale-free. (With it held constant, the
    cheapest way down was to shrink every feature to zero: on the real data the features
    collapsed within two epochs and the classifier called everything NORMAL.)

    `y_true` holds the masks of `alignment_targets`, `groups` how many sources each aligned class
    has. Classes with fewer than two sources in a batch add nothing. Pulling each class's source
    means together (class-conditional moment matching) keeps the class signal and removes the
    first-order "this looks like that source" signal, such as whatever tells the NORMALs of the
    only TB source from every other NORMAL. The value is the same for every image of the batch.
    """
    ops = keras.ops

    def loss(y_true: Any, y_pred: Any) -> Any:
        total = ops.zeros(())
        start = 0
        for size in groups:
            masks = y_true[:, start : start + size]
            start += size
            counts = ops.sum(masks, axis=0)
            means = ops.matmul(ops.transpose(masks), y_pred) / ops.maximum(counts, 1.0)[:, None]
            present = ops.cast(counts > 0, "float32")
            k = ops.sum(present)
            centre = ops.sum(means * present[:, None], axis=0) / ops.maximum(k, 1.0)
            between = ops.sum(present * ops.mean(ops.square(means - centre), axis=1)) / ops.maximum(k, 1.0)
            member = ops.sum(masks, axis=1, keepdims=True)
            n = ops.maximum(ops.sum(member), 1.0)
            mean_all = ops.sum(member * y_pred, axis=0) / n
            variance = ops.mean(ops.sum(member * ops.square(y_pred - mean_all), axis=0) / n)
            ratio = between / (variance + 1e-6)  # scale-free: shrinking the features gains nothing
            total = total + ops.where(k >= 2, ratio, 0.0)
        return ops.zeros_like(y_pred[:, 0]) + total

    return loss


def _top_model(model: keras.Model, above: keras.Model, aligned: bool) -> keras.Model:
    """Phase 2's model: cached activations in, the class head out (and, when `aligned`, the
    pooled features as a second output for the source alignment loss; not exported)."""
    pooled = model.get_layer("pool")(above.output)
    outputs = {"head": model.get_layer("head")(model.get_layer("dropout")(pooled))}
    if aligned:
        outputs["align"] = pooled
    return keras.Model(above.input, outputs)


def _head_model(model: keras.Model, width: int) -> keras.Model:
    inputs = keras.Input((width,))
    return keras.Model(inputs, model.get_layer("head")(model.get_layer("dropout")(inputs)))


def _unfreeze_above(base: keras.Model, cache_layer: str) -> None:
    names = [layer.name for layer in base.layers]
    first = names.index(cache_layer) + 1
    for i, layer in enumerate(base.layers):
        # Batch-norm layers stay frozen (inference mode): small batches would wreck their statistics.
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)


def _calibrate_batchnorm(model: keras.Model, base: keras.Model, split: Split, spec: InputSpec, n: int) -> None:
    """Without pretrained weights, set batch-norm statistics from real images.

    A freshly initialised MobileNetV2 in inference mode gives the same output for every input;
    one training-mode pass with momentum 0 makes each layer's moving statistics those of real data.
    """
    pick = np.linspace(0, len(split.paths) - 1, min(n, len(split.paths))).astype(int)
    batch = np.stack([to_model_input(load_image(split.paths[i]), spec) for i in pick])
    layers = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    features = keras.Model(model.input, base(model.get_layer("scale").output))
    features(batch, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum


def _views(path: Path, spec: InputSpec, seed: int, views: int, config: TrainConfig) -> np.ndarray:
    """The image as the runtime sees it, then `views - 1` augmented versions (views=0: clean only)."""
    img = load_image(path)
    clean = to_model_input(img, spec)
    if views <= 1:
        return clean[None]
    rng = np.random.default_rng(seed)
    augmented = [to_model_input(augment(img, rng, config.zoom_out, config.crop_area), spec) for _ in range(views - 1)]
    return np.stack([clean, *augmented])


def _cache(
    below: keras.Model, split: Split, spec: InputSpec, config: TrainConfig, rng: np.random.Generator, views: int
) -> np.ndarray:
    """Run every (augmented) image through the frozen lower part once: (N, views or 1, h, w, c)."""
    seeds = rng.integers(0, 2**32, len(split.paths))
    per_batch = max(1, config.batch_size // max(views, 1))
    chunks = [range(i, min(i + per_batch, len(split.paths))) for i in range(0, len(split.paths), per_batch)]
    out: list[np.ndarray] = []

    def prepare(chunk: range) -> np.ndarray:
        return np.stack([_views(split.paths[i], spec, int(seeds[i]), views, config) for i in chunk])

    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = pool.submit(prepare, chunks[0])
        for k in range(len(chunks)):
            batch = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(prepare, chunks[k + 1])
            flat = batch.reshape((-1, *batch.shape[2:]))
            act = np.asarray(below.predict_on_batch(flat))
            out.append(act.reshape((batch.shape[0], batch.shape[1], *act.shape[1:])).astype(np.float16))
            if k % 20 == 0:
                log.info("cached %d/%d", min((k + 1) * per_batch, len(split.paths)), len(split.paths))
    return np.concatenate(out)


def _pool(above: keras.Model, acts: np.ndarray, batch: int) -> np.ndarray:
    pooled = [
        np.asarray(above.predict_on_batch(acts[i : i + batch].astype(np.float32))).mean(axis=(1, 2))
        for i in range(0, len(acts), batch)
    ]
    return np.concatenate(pooled)


class _ViewSampler(keras.utils.PyDataset):  # type: ignore[misc]
    """Each epoch, one randomly chosen cached view per image, shuffled; `y` maps output names to targets."""

    def __init__(self, cache: np.ndarray, y: dict[str, np.ndarray], w: np.ndarray, batch: int, seed: int) -> None:
        super().__init__()
        self.cache, self.y, self.w, self.batch = cache, y, w, batch
        self.rng = np.random.default_rng(seed)
        self.on_epoch_end()

    def __len__(self) -> int:
        return int(np.ceil(len(self.w) / self.batch))

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.w))
        self.pick = self.rng.integers(0, self.cache.shape[1], len(self.w))

    def __getitem__(self, index: int) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        idx = self.order[index * self.batch : (index + 1) * self.batch]
        x = self.cache[idx, self.pick[idx]].astype(np.float32)
        return x, {name: y[idx] for name, y in self.y.items()}, self.w[idx]
