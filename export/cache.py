"""The activation cache: each (augmented) view runs through the frozen lower layers once, and
phase 2 draws one cached view per image per epoch.

A 2-core machine cannot afford the whole MobileNetV2 forward pass every epoch; the layers below
the cache point are frozen anyway, so their output is computed once and stored as float16.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
from PIL import Image

from cxrbatch.cores import usable_cores
from cxrbatch.datasets import Split
from cxrbatch.errors import ImageError, UsageError, first_few
from cxrbatch.imaging import load_image
from cxrbatch.modelinput import InputSpec, to_model_input

from .augment import augment
from .config import TrainConfig

log = logging.getLogger(__name__)


def read_film(path: Path, what: str = "training film") -> Image.Image:
    """A film a model is made or checked with, decoded as the runtime decodes it; one that cannot
    be read is named (such data is meant to be read whole)."""
    try:
        return load_image(path)
    except ImageError as exc:
        raise UsageError(f"{what} {path} cannot be read: {exc}") from None


def refuse_unreadable(paths: list[Path], what: str = "training film") -> None:
    """Decode every film once, as `read_film` will, and refuse the run naming those that cannot be
    read: found by the caching, a val film (or a late train one) cost most of the run first."""
    started = time.perf_counter()

    def problem(path: Path) -> tuple[Path, str] | None:
        try:
            load_image(path)
        except ImageError as exc:
            return path, str(exc)
        return None

    with ThreadPoolExecutor(max_workers=usable_cores()) as pool:  # decoding releases the GIL: every core works
        bad = [found for found in pool.map(problem, paths) if found]
    log.info("%d films decoded in %.1f s, %d unreadable", len(paths), time.perf_counter() - started, len(bad))
    if len(bad) == 1:
        raise UsageError(f"{what} {bad[0][0]} cannot be read: {bad[0][1]}")
    if bad:
        named = first_few([f"{path} ({why})" for path, why in bad], 5, "; ")
        raise UsageError(f"{len(bad)} {what}s cannot be read: {named}")


def views_of(path: Path, spec: InputSpec, seed: int, views: int, config: TrainConfig) -> np.ndarray:
    """The image as the runtime sees it, then `views - 1` augmented versions (views=0: clean only)."""
    img = read_film(path)
    clean = to_model_input(img, spec)
    if views <= 1:
        return clean[None]
    rng = np.random.default_rng(seed)
    augmented = [to_model_input(augment(img, rng, config.zoom_out, config.crop_area), spec) for _ in range(views - 1)]
    return np.stack([clean, *augmented])


def cache_activations(
    below: keras.Model,
    split: Split,
    spec: InputSpec,
    config: TrainConfig,
    rng: np.random.Generator | np.ndarray,
    views: int,
) -> np.ndarray:
    """Run every (augmented) image through the frozen lower part once: (N, views or 1, h, w, c).

    One seed per image is drawn from `rng` (whatever `views` is), so the same seed gives the
    same views; `rng` may also be the seeds themselves, one per image. Decoding and augmenting
    the next chunk overlaps the model on this one."""
    seeds = rng if isinstance(rng, np.ndarray) else rng.integers(0, 2**32, len(split.paths))
    per_batch = max(1, config.batch_size // max(views, 1))
    chunks = [range(i, min(i + per_batch, len(split.paths))) for i in range(0, len(split.paths), per_batch)]
    out: list[np.ndarray] = []

    def prepare(chunk: range) -> np.ndarray:
        return np.stack([views_of(split.paths[i], spec, int(seeds[i]), views, config) for i in chunk])

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


def pool_features(above: keras.Model, acts: np.ndarray, batch: int) -> np.ndarray:
    """Global-average-pooled features of cached activations run through the upper layers."""
    pooled = [
        np.asarray(above.predict_on_batch(acts[i : i + batch].astype(np.float32))).mean(axis=(1, 2))
        for i in range(0, len(acts), batch)
    ]
    return np.concatenate(pooled)


class ViewSampler(keras.utils.PyDataset):  # type: ignore[misc]
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
