"""Leave-one-collection-out: how the classifier's recipe does on a collection it never saw.

A validation split drawn from the same collections as train rewards learning what those
collections look like. The study that chooses the recipe instead trains, for each collection
(`fold`), a model without any of its images (train and val), nor any image of another
collection that shares a cluster with one of them (a re-encoded copy, the same patient), and
scores every image of that collection, from every split.

The recipe studied is the head-only recipe (`cxrbatch train classifier --epochs2 0`): the
frozen ImageNet MobileNetV2's pooled features of `views` views per image (the image as the
runtime sees it, then augmented ones, drawn as training draws them), and phase 1's head on them,
fitted exactly as training fits it (`training.fit_head`, sample weights balanced within each
collection). The features do not depend on which images are left out, so they are computed once
and kept per image (`features_cache`), and each fold costs one head fit: a study of every
collection costs about one training run, and a tree grown by a source only its new images.
Folds are the collections of every class that two or more collections hold (leaving out a
class's only collection tells nothing about transfer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxrbatch import imaging
from cxrbatch.datasets import (
    Split,
    class_names,
    left_out,
    load_split,
    read_manifest,
    refuse_shared_ids,
    sources_of,
)
from cxrbatch.errors import UsageError
from cxrbatch.files import file_sha256
from cxrbatch.metrics import roc_auc

from . import augment
from .cache import cache_activations
from .config import TrainConfig
from .network import build_model, calibrate_batchnorm, head_model
from .sources import sample_weights
from .training import fit_head

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def study(
    data_dir: Path,
    base_weights: Path | None,
    config: TrainConfig,
    folds: tuple[str, ...] = (),
    features_cache: Path | None = None,
    with_tree: tuple[Path, Path | None] | None = None,
) -> dict[str, Any]:
    """Fit one head per left-out collection and score that collection; the study's JSON record.

    `with_tree` (a folder and its features cache) names a second tree holding the same films by
    the same ids, made otherwise (say cut to the lung field): each film's features are then its
    features in both trees side by side, as a classifier that sees both would have them."""
    if config.role != "classifier" or config.epochs2 != 0:
        raise UsageError("the study measures the classifier's head-only recipe (epochs2 0)")
    if base_weights is not None and not base_weights.is_file():
        raise UsageError(f"Base weights not found: {base_weights}")
    for cache in (features_cache, None if with_tree is None else with_tree[1]):
        if cache is not None and cache.is_dir():
            raise UsageError(f"features cache {cache} is a folder: name the .npz file to keep them in")
    classes = class_names(data_dir)
    if config.negative_label not in classes:
        raise UsageError(f"the negative label {config.negative_label!r} is not a class of {data_dir} ({list(classes)})")
    manifest = read_manifest(data_dir)
    if not (data_dir / "val").is_dir():
        raise UsageError(f"{data_dir} has no val/ folder: each head stops early on the val films")
    splits = {name: load_split(data_dir, name, classes) for name in SPLITS if (data_dir / name).is_dir()}
    refuse_shared_ids((p for split in splits.values() for p in split.paths), data_dir)  # features are kept by id
    sources = {name: np.asarray(sources_of(split.paths, manifest), dtype=object) for name, split in splits.items()}
    chosen = folds or default_folds(splits, sources)
    if not chosen:
        raise UsageError(
            f"{data_dir}: no collection to leave out (a MANIFEST.csv must name the collections, and a class "
            "needs two or more of them); name folds with --fold"
        )
    unknown = sorted(set(chosen) - {s for found in sources.values() for s in found})
    if unknown:
        raise UsageError(f"No image of {data_dir} comes from the collection(s) {unknown}")
    feats = _features(data_dir, splits, base_weights, config, features_cache)
    record: dict[str, Any] = {
        "data": data_dir.name, "config": _config_record(config), "classes": list(classes),
        "negative_label": config.negative_label,
    }  # fmt: skip
    if with_tree is not None:
        other = _features(with_tree[0], _same_films(with_tree[0], splits), base_weights, config, with_tree[1])
        feats = _side_by_side(feats, other)
        record["with"] = with_tree[0].name
    record["folds"] = {}
    for fold in chosen:
        log.info(
            "fold %s: trained without it, scored on its %d images",
            fold,
            sum(int((s == fold).sum()) for s in sources.values()),
        )
        gone = {name: left_out(split.paths, manifest, (fold,)) for name, split in splits.items()}
        record["folds"][fold] = _fold(fold, splits, sources, gone, feats, config)
    return record


def default_folds(splits: dict[str, Split], sources: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Every collection holding a class that two or more collections hold."""
    train, names = splits["train"], sources["train"]
    holders: dict[int, set[str]] = {}
    for label, source in zip(train.labels, names, strict=True):
        holders.setdefault(int(label), set()).add(str(source))
    return tuple(sorted({s for held in holders.values() if len(held) > 1 for s in held}))


def _fold(
    fold: str,
    splits: dict[str, Split],
    sources: dict[str, np.ndarray],
    gone: dict[str, np.ndarray],
    feats: dict[str, np.ndarray],
    config: TrainConfig,
) -> dict[str, Any]:
    """Train without the collection's films and every film sharing a cluster with one of them
    (`datasets.left_out`: its films under another collection's name), score the collection's own."""
    train, val = splits["train"], splits["val"]
    keep_train, keep_val = ~gone["train"], ~gone["val"]
    labels = train.labels[keep_train]
    eye = np.eye(len(train.classes), dtype=np.float32)
    if len(np.unique(labels)) < len(train.classes):
        missing = sorted(set(train.classes) - {train.classes[i] for i in np.unique(labels)})
        return {"skipped": f"without it, no training image of {missing}"}
    keras.utils.set_random_seed(config.seed)
    head = head_model(build_model(config, len(train.classes), None), feats["train"].shape[-1])
    weights = sample_weights(labels, list(sources["train"][keep_train]), len(train.classes))
    history = fit_head(
        head,
        config,
        (feats["train"][keep_train].reshape((-1, feats["train"].shape[-1])).astype(np.float32), eye[labels], weights),
        (feats["val"][keep_val].astype(np.float32), eye[val.labels[keep_val]]),
    )
    held_x = np.concatenate([feats[f"{name}_clean"][sources[name] == fold] for name in splits]).astype(np.float32)
    held_y = np.concatenate([splits[name].labels[sources[name] == fold] for name in splits])
    probs = np.asarray(head.predict(held_x, batch_size=config.batch_size, verbose=0), dtype=np.float64)
    return {
        "trained_on": int(keep_train.sum()),
        # train and val films of other collections left out as they share a cluster with the fold's own
        "left_out_by_cluster": int(sum((gone[name] & (sources[name] != fold)).sum() for name in ("train", "val"))),
        "history": history,
        **held_out_metrics(probs, held_y, train.classes, config),
    }


def held_out_metrics(
    probs: np.ndarray, truth: np.ndarray, classes: tuple[str, ...], config: TrainConfig
) -> dict[str, Any]:
    """Per class of the held-out collection: films, share called that class, share called the
    no-finding class; the no-finding AUC (1 - P(negative)) and, per finding, its one-class AUC
    against the collection's no-finding films."""
    negative = classes.index(str(config.negative_label))
    pred = probs.argmax(axis=1)
    out: dict[str, Any] = {"n": len(truth), "by_class": {}}
    is_negative = truth == negative
    for c, name in enumerate(classes):
        mine = truth == c
        if not mine.any():
            continue
        row: dict[str, Any] = {
            "n": int(mine.sum()),
            "recall": round(float((pred[mine] == c).mean()), 4),
            "called_" + classes[negative]: round(float((pred[mine] == negative).mean()), 4),
        }
        if c != negative and is_negative.any():
            both = mine | is_negative
            row["auc_vs_" + classes[negative]] = _round(roc_auc(probs[both, c], mine[both]))
            row["auc_abnormal_vs_" + classes[negative]] = _round(roc_auc(1.0 - probs[both, negative], mine[both]))
        out["by_class"][name] = row
    return out


def _features(
    data_dir: Path, splits: dict[str, Split], base_weights: Path | None, config: TrainConfig, cache: Path | None
) -> dict[str, np.ndarray]:
    """Pooled features: train's `views` views per image, and every split's clean images (a view 0).

    Kept per image (by id, the file stem: `study` refuses two films of one id) in `cache`, each
    with the sha256 of the file it was made from, so a tree that grew by a source costs only the
    new images, and a film changed under its id (a `lungs crop` tree keeps the ids) is computed
    again; hashing is cheap beside decoding (about 0.6 s for 7,000 films of 130 MB in all). An
    image's views are drawn from a seed made of the run's seed and its id."""
    key = _feature_key(config, base_weights)
    made_from = {p: file_sha256(p) for split in splits.values() for p in split.paths}  # a film's content
    stored = _read_cache(cache, key)
    wanted = {
        name: [p for p in split.paths if stored[_kind(name)].get(p.stem, ("",))[0] != made_from[p]]
        for name, split in splits.items()
    }
    changed = sum(p.stem in stored[_kind(name)] for name, paths in wanted.items() for p in paths)
    computed = sum(map(len, wanted.values()))
    log.info(
        "features of %s: %d reused, %d computed (%d of them of a film that changed since it was cached)",
        data_dir, len(made_from) - computed, computed, changed,
    )  # fmt: skip
    if computed:
        keras.utils.set_random_seed(config.seed)
        model = build_model(config, len(splits["train"].classes), base_weights)
        if base_weights is None:  # as training does: a random backbone needs real batch-norm statistics
            calibrate_batchnorm(model, splits["train"], config.input_spec(), config.batch_size)
        pooled = keras.Model(model.input, model.get_layer("pool").output)
        for name, paths in wanted.items():
            if paths:
                views = config.views if name == "train" else 0
                part = Split(paths, np.zeros(len(paths), dtype=int), splits[name].classes)
                seeds = np.asarray([_seed(config.seed, p.stem) for p in paths], dtype=np.uint64)
                acts = cache_activations(pooled, part, config.input_spec(), config, seeds, views=views)
                stored[_kind(name)].update((p.stem, (made_from[p], a)) for p, a in zip(paths, acts, strict=True))
        _write_cache(cache, key, stored)
    out = {"train": np.stack([stored["views"][p.stem][1] for p in splits["train"].paths])}
    for name, split in splits.items():
        if name == "train":
            out["train_clean"] = out["train"][:, 0]
        else:
            out[f"{name}_clean"] = np.stack([stored["clean"][p.stem][1][0] for p in split.paths])
    out["val"] = out["val_clean"]
    return out


def _same_films(other: Path, splits: dict[str, Split]) -> dict[str, Split]:
    """The splits of `other`, in the order of `splits` by id (file stem); every film must be there."""
    out = {}
    loaded = {name: load_split(other, name, split.classes).paths for name, split in splits.items()}
    refuse_shared_ids((p for paths in loaded.values() for p in paths), other)
    for name, split in splits.items():
        found = {p.stem: p for p in loaded[name]}
        missing = [p.name for p in split.paths if p.stem not in found]
        if missing:
            raise UsageError(f"{other}/{name} lacks {len(missing)} film(s) of the study's tree, e.g. {missing[0]}")
        out[name] = Split([found[p.stem] for p in split.paths], split.labels, split.classes)
    return out


def _side_by_side(feats: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each film's features of both trees concatenated (view k beside view k for train's views)."""
    return {k: np.concatenate([v, other[k]], axis=-1) for k, v in feats.items()}


def cached_clean_features(cache: Path) -> dict[str, np.ndarray]:
    """Each film's clean pooled features (N x d by id) from a study's features cache, whatever settings made
    it: the clean image of every split (view 0 of a train film's views)."""
    if not cache.is_file():
        raise UsageError(f"Features cache not found: {cache}")
    with np.load(cache, allow_pickle=False) as data:
        out = dict(zip(data["views_ids"].tolist(), data["views"][:, 0], strict=True))
        out.update(zip(data["clean_ids"].tolist(), data["clean"][:, 0], strict=True))
    return out


def _kind(split: str) -> str:
    return "views" if split == "train" else "clean"


def _seed(seed: int, image_id: str) -> int:
    return int(hashlib.sha1(f"{seed}:{image_id}".encode()).hexdigest()[:8], 16)


Stored = dict[str, dict[str, tuple[str, np.ndarray]]]  # kind -> id -> (the film's sha256, its features)


def _read_cache(cache: Path | None, key: dict[str, Any]) -> Stored:
    """The cached rows, each with the content hash of the film it was made from; none from a cache
    made with other settings (or before rows carried that hash)."""
    stored: Stored = {"views": {}, "clean": {}}
    if cache is None or not cache.is_file():
        return stored
    with np.load(cache, allow_pickle=False) as data:
        if json.loads(str(data["key"])) != key or any(f"{kind}_sha256" not in data for kind in stored):
            log.info("%s was made with other settings: computing the features again", cache)
            return stored
        for kind in stored:
            rows = zip(data[f"{kind}_sha256"].tolist(), data[kind], strict=True)
            stored[kind] = dict(zip(data[f"{kind}_ids"].tolist(), rows, strict=True))
    return stored


def _write_cache(cache: Path | None, key: dict[str, Any], stored: Stored) -> None:
    if cache is None:
        return
    arrays = {"key": np.asarray(json.dumps(key))}
    for kind, by_id in stored.items():
        ids = sorted(by_id)
        arrays[f"{kind}_ids"] = np.asarray(ids, dtype=str)
        arrays[f"{kind}_sha256"] = np.asarray([by_id[i][0] for i in ids], dtype=str)
        arrays[kind] = np.stack([by_id[i][1] for i in ids]) if ids else np.zeros((0,), dtype=np.float16)
    cache.parent.mkdir(parents=True, exist_ok=True)
    part = cache.with_name(cache.name + ".part.npz")
    np.savez(part, **arrays)  # type: ignore[arg-type]  # numpy 2.4 stubs read the first ** key as allow_pickle
    part.replace(cache)


def _feature_key(config: TrainConfig, base_weights: Path | None) -> dict[str, Any]:
    """What the features depend on besides each film (the head's settings do not change them): the
    recipe's settings, the backbone's starting weights, by content (None: random), and the versions
    of the preprocessing and the augmentation."""
    keys = ("size", "alpha", "views", "seed", "zoom_out", "crop_area", "clahe", "cache_layer")
    weights = None if base_weights is None else file_sha256(base_weights)
    return {k: getattr(config, k) for k in keys} | {
        "base_weights_sha256": weights,
        "preprocessing_version": imaging.PREPROCESSING_VERSION,
        "augmentation_version": augment.AUGMENTATION_VERSION,
    }


def _config_record(config: TrainConfig) -> dict[str, Any]:
    keys = ("size", "alpha", "views", "epochs1", "batch_size", "lr1", "dropout", "label_smoothing", "clahe", "seed")
    return {k: getattr(config, k) for k in keys} | {"zoom_out": config.zoom_out, "crop_area": config.crop_area}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def format_study(record: dict[str, Any]) -> str:
    """The study as a table: one line per (held-out collection, class)."""
    negative = record["negative_label"]
    head = f"{'left-out collection':<24} {'class':<13} {'n':>5} {'recall':>7} {'→' + negative:>8}"
    lines = [head + f" {'AUC':>6} {'AUC ab.':>8}"]
    for fold, result in record["folds"].items():
        if "skipped" in result:
            lines.append(f"{fold:<24} skipped: {result['skipped']}")
            continue
        for name, row in result["by_class"].items():
            auc, abnormal = row.get(f"auc_vs_{negative}"), row.get(f"auc_abnormal_vs_{negative}")
            lines.append(
                f"{fold:<24} {name:<13} {row['n']:>5} {row['recall']:>7.3f} {row[f'called_{negative}']:>8.3f} "
                f"{'-' if auc is None else f'{auc:.3f}':>6} {'-' if abnormal is None else f'{abnormal:.3f}':>8}"
            )
    return "\n".join(lines)
