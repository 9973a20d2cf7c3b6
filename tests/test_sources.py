"""Counter-measures against source shortcuts: sample weights and the source alignment loss."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tensorflow", reason="the export extra (tensorflow) is not installed")

from cxrbatch.extras import export_module

pytestmark = pytest.mark.export
sources_module = export_module("sources")


def test_sample_weights_balance_classes_within_each_source() -> None:
    # source "tb": 10 NORMAL + 10 TB; source "big": 60 NORMAL + 20 PNEUMONIA (labels 0 NORMAL, 1 PNEU, 2 TB)
    labels = np.array([0] * 10 + [2] * 10 + [0] * 60 + [1] * 20)
    sources = ["tb"] * 20 + ["big"] * 80
    w = sources_module.sample_weights(labels, sources, 3)
    assert w.mean() == pytest.approx(1.0)
    assert w[:10].sum() == pytest.approx(w[10:20].sum())  # no reward for "looks like the TB source"
    assert w[20:80].sum() == pytest.approx(w[80:].sum())  # classes balanced inside the big source too
    assert w[10] > 2 * w[20]  # the rare class's source counts more per image than a common class elsewhere
    lone = sources_module.sample_weights(np.array([0] * 50 + [1]), ["s"] * 51, 2, cap=5.0)
    assert lone[-1] / lone[0] == pytest.approx(5.0 / (51 / 100))  # capped, not 25x


def test_alignment_plan_pairs_each_class_with_its_sources() -> None:
    # NORMAL (0) from a, b and a lone image of c; PNEUMONIA (1) from a only; TB (2) from b only
    labels = np.array([0] * 12 + [0] * 10 + [0] + [1] * 15 + [2] * 11)
    sources = ["a"] * 12 + ["b"] * 10 + ["c"] + ["a"] * 15 + ["b"] * 11
    plan = sources_module.alignment_plan(labels, sources, 3)
    assert plan == [(0, ("a", "b"))]  # c is too small; one-source classes are not aligned
    masks = sources_module.alignment_targets(plan, labels, sources)
    assert masks.shape == (len(labels), 2)
    assert masks[:12, 0].all() and masks[12:22, 1].all() and masks[:22].sum() == 22
    assert not masks[22:].any()  # the lone NORMAL and the other classes take no part


def test_source_alignment_loss_is_the_spread_of_source_means() -> None:
    loss = sources_module.source_alignment_loss((2,))
    masks = np.array([[1, 0], [1, 0], [0, 1], [0, 1], [0, 0]], dtype=np.float32)
    # source a: mean (1, 0); source b: mean (1, 2); the unmasked last row must not count
    feats = np.array([[0, 0], [2, 0], [0, 2], [2, 2], [100, 100]], dtype=np.float32)
    # between = mean over sources and dims of (mean - centre)^2 = 0.5; variance of members = 1
    np.testing.assert_allclose(np.asarray(loss(masks, feats)), np.full(5, 0.5), rtol=1e-5)
    same_means = np.array([[0, 0], [2, 2], [2, 0], [0, 2], [100, 100]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(loss(masks, same_means)), np.zeros(5), atol=1e-6)
    np.testing.assert_allclose(np.asarray(loss(masks, feats * 0.1)), np.full(5, 0.5), rtol=1e-3)  # scale-free
    import tensorflow as tf

    scale = tf.Variable(1.0)
    with tf.GradientTape() as tape:
        value = tf.reduce_mean(loss(masks, feats * scale))
    assert abs(float(tape.gradient(value, scale))) < 1e-4  # no reward for shrinking the features
    one_source = np.array([[1, 0], [1, 0], [0, 0], [0, 0], [0, 0]], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(loss(one_source, feats)), np.zeros(5), atol=1e-6)
