"""Fitting the blend's ranker (``friendrec.fof.BlendRanker``) on validation edges.

Each validation user is a list of candidates (the union of its embedding and friends-of-friends
lists, ``friendrec.fof.blend_features``) and its held-out friends among them. The ranker is fitted
by a listwise softmax: the mean log-probability of a user's held-out friends among its
candidates, the usual surrogate of recall for a re-ranker. A small perceptron rather than a
linear score: on Twitch's validation edges (docs/quality.md, session 22) the interaction of the
candidate's degree with the user's and with the two sources' scores is worth 1.6-4 points of
Recall@50 that a linear score of the same features does not reach.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from friendrec.fof import BLEND_FEATURES, BlendRanker

HIDDEN = (32, 32)
EPOCHS = 30
BATCH = 64
LEARNING_RATE = 3e-3


def source_order(source: str) -> BlendRanker:
    """A linear ranker that keeps one source's order: its candidates first, by rank."""
    weight = np.array(
        [1e3 if f == source else -1.0 if f == f"{source}_log_rank" else 0.0 for f in BLEND_FEATURES]
    )
    width = len(BLEND_FEATURES)
    return BlendRanker(np.zeros(width), np.ones(width), ((weight[:, None], np.zeros(1)),))


def fit_ranker(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    hidden: Sequence[int] = HIDDEN,
    epochs: int = EPOCHS,
    seed: int = 0,
) -> BlendRanker:
    """A ranker fitted to ``groups``: per user, its candidates' ``BLEND_FEATURES`` [c, f] and
    whether each is a held-out friend [c] (users with none teach nothing and are left out)."""
    import tensorflow as tf

    groups = [(x, y) for x, y in groups if len(x) and np.any(y)]
    if not groups:
        raise ValueError("no validation user has a held-out friend among the candidates")
    x_all = np.concatenate([x for x, _ in groups])
    mean, scale = x_all.mean(axis=0), x_all.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    width = max(len(x) for x, _ in groups)
    features = np.zeros((len(groups), width, len(BLEND_FEATURES)), np.float32)
    labels = np.zeros((len(groups), width), np.float32)
    present = np.zeros((len(groups), width), bool)
    for i, (x, y) in enumerate(groups):
        features[i, : len(x)] = (x - mean) / scale
        labels[i, : len(x)] = y
        present[i, : len(x)] = True

    tf.keras.utils.set_random_seed(seed)
    layers = [tf.keras.layers.Dense(h, activation="relu") for h in hidden]
    model = tf.keras.Sequential([*layers, tf.keras.layers.Dense(1)])
    model.build((None, len(BLEND_FEATURES)))
    optimizer = tf.keras.optimizers.Adam(LEARNING_RATE)

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            scores = tf.where(mask, tf.squeeze(model(x), -1), -1e9)
            log_p = tf.nn.log_softmax(scores, axis=1)
            loss = -tf.reduce_mean(tf.reduce_sum(y * log_p, 1) / tf.reduce_sum(y, 1))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(groups))
        for lo in range(0, len(order), BATCH):
            batch = order[lo : lo + BATCH]
            step(features[batch], labels[batch], present[batch])
    weights = model.get_weights()
    fitted = tuple(
        (np.asarray(w, np.float64), np.asarray(b, np.float64))
        for w, b in zip(weights[::2], weights[1::2], strict=True)
    )
    return BlendRanker(mean, scale, fitted)
