"""Counter-measures against source shortcuts: sample weights balanced within each source, and
the per-class source alignment loss of phase 2.

Where a class comes from one source only (TUBERCULOSIS here), "looks like that source" predicts
the class; both pieces take away the reward for learning that.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


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
