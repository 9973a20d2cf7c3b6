"""The Keras model: MobileNetV2 between 0..255 pixels and the head, and the views of it that training uses.

`build_model` makes the model that is saved and exported. Training cuts it at `cache_layer`:
`below` (pixels to cached activations, frozen), `above` (cached activations to the feature map),
then either the head alone on pooled features (phase 1) or `above` with the head (phase 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from cxrbatch.datasets import Split
from cxrbatch.errors import UsageError
from cxrbatch.modelinput import InputSpec, to_model_input

from .cache import read_film
from .config import TrainConfig


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
        try:
            base.load_weights(str(base_weights))
        except Exception as exc:  # Keras raises ValueError, OSError, KeyError for another file or width
            raise UsageError(
                f"{base_weights} cannot be loaded into MobileNetV2 of width {config.alpha} "
                f"({type(exc).__name__}): give the no-top .weights.h5 file of that width"
            ) from None
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


def cut_at(model: keras.Model, cache_layer: str) -> tuple[keras.Model, keras.Model]:
    """The model's two halves around `cache_layer`: pixels to activations, activations to features."""
    base = backbone_of(model)
    to_cache = keras.Model(base.input, base.get_layer(cache_layer).output)
    below = keras.Model(model.input, to_cache(model.get_layer("scale").output))
    above = keras.Model(base.get_layer(cache_layer).output, base.output)
    return below, above


def head_model(model: keras.Model, width: int) -> keras.Model:
    """Phase 1's model: pooled features in, the model's own dropout and head out. Features wider
    than the model's own (a study's, of two trees side by side) get a new head of the same kind."""
    inputs = keras.Input((width,))
    head = model.get_layer("head")
    if head.kernel.shape[0] != width:
        head = head.__class__.from_config(head.get_config())
    return keras.Model(inputs, head(model.get_layer("dropout")(inputs)))


def top_model(model: keras.Model, above: keras.Model, aligned: bool) -> keras.Model:
    """Phase 2's model: cached activations in, the class head out (and, when `aligned`, the
    pooled features as a second output for the source alignment loss; not exported)."""
    pooled = model.get_layer("pool")(above.output)
    outputs = {"head": model.get_layer("head")(model.get_layer("dropout")(pooled))}
    if aligned:
        outputs["align"] = pooled
    return keras.Model(above.input, outputs)


def unfreeze_above(base: keras.Model, cache_layer: str) -> None:
    """Make every backbone layer after `cache_layer` trainable, batch norms excepted."""
    names = [layer.name for layer in base.layers]
    first = names.index(cache_layer) + 1
    for i, layer in enumerate(base.layers):
        # Batch-norm layers stay frozen (inference mode): small batches would wreck their statistics.
        layer.trainable = i >= first and not isinstance(layer, keras.layers.BatchNormalization)


def calibrate_batchnorm(model: keras.Model, split: Split, spec: InputSpec, n: int) -> None:
    """Without pretrained weights, set batch-norm statistics from real images.

    A freshly initialised MobileNetV2 in inference mode gives the same output for every input;
    one training-mode pass with momentum 0 makes each layer's moving statistics those of real data.
    """
    base = backbone_of(model)
    pick = np.linspace(0, len(split.paths) - 1, min(n, len(split.paths))).astype(int)
    batch = np.stack([to_model_input(read_film(split.paths[i]), spec) for i in pick])
    layers = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = 0.0
    features = keras.Model(model.input, base(model.get_layer("scale").output))
    features(batch, training=True)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
