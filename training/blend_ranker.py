"""Fitting the blend's ranker (``friendrec.fof.BlendRanker``) on validation edges.

Each validation user is a list of candidates (the union of its embedding and friends-of-friends
lists, ``friendrec.fof.blend_features``) and its held-out friends among them. The ranker is fitted
by a listwise softmax: the mean log-probability of a user's held-out friends among its
candidates, the usual surrogate of recall for a re-ranker. A small perceptron rather than a
linear score: the candidate's degree matters according to the user's and to the two sources'
scores, and on TW's validation edges that is worth 1.6 points of Recall@50 that a linear score
of the same features, their squares and products does not reach (ENGB: 0.3; docs/quality.md,
session 22).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from friendrec.fof import BLEND_FEATURES, BlendRanker

HIDDEN = (32, 32)
EPOCHS = 30
MEMBERS = 3  # perceptrons fitted from different seeds and averaged
DECIMALS = 6  # of the fitted weights
BATCH = 64
LEARNING_RATE = 3e-3


def source_order(source: str) -> BlendRanker:
    """A linear ranker that keeps one source's order: its candidates first, by rank (it reads
    no vectors)."""
    weight = np.array(
        [1e3 if f == source else -1.0 if f == f"{source}_log_rank" else 0.0 for f in BLEND_FEATURES]
    )
    width = len(BLEND_FEATURES)
    layers = ((weight[:, None], np.zeros(1)),)
    return BlendRanker(np.zeros(width), np.ones(width), layers, reads_vectors=False)


def fit_ranker(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    hidden: Sequence[int] = HIDDEN,
    epochs: int = EPOCHS,
    seed: int = 0,
    members: int = MEMBERS,
    reads_vectors: bool = True,
) -> BlendRanker:
    """A ranker fitted to ``groups``: per user, its candidates' ``BLEND_FEATURES`` [c, f] and
    whether each is a held-out friend [c] (users with none teach nothing and are left out);
    ``reads_vectors``: whether their inner products were read or bounded (``blend_features``).

    The mean of ``members`` perceptrons fitted from different seeds: on a few thousand
    validation users one fit's Recall@50 moves by about half a point with its seed, and the
    mean of three was 0.35-0.55 points above a single fit on TW, PTBR and ES (validation,
    out of sample). The mean is itself one perceptron, wider, its hidden layers side by side
    (``stack_members``), so serving is unchanged."""
    fits = _fit_members(groups, hidden, epochs, [seed + 1000 * m for m in range(members)])
    ranker = fits[0] if members == 1 else stack_members(fits)
    # Six decimals: the ranker is the same object in a settings file as in memory (the service
    # reads the file, the evaluation the fit), and the file stays small.
    layers = tuple((np.round(w, DECIMALS), np.round(b, DECIMALS)) for w, b in ranker.layers)
    return BlendRanker(ranker.mean, ranker.scale, layers, reads_vectors)


def stack_members(rankers: Sequence[BlendRanker]) -> BlendRanker:
    """One perceptron whose score is the mean of ``rankers``' (same standardisation, same
    depth): first layers side by side, deeper ones block-diagonal, the outputs averaged."""
    from scipy.linalg import block_diag

    first = rankers[0]
    if any(
        not np.array_equal(r.mean, first.mean)
        or not np.array_equal(r.scale, first.scale)
        or len(r.layers) != len(first.layers)
        or r.reads_vectors != first.reads_vectors
        for r in rankers
    ):
        raise ValueError(
            "only perceptrons of the same depth, standardisation and inputs can be stacked"
        )
    layers = [
        (
            np.concatenate([r.layers[0][0] for r in rankers], axis=1),
            np.concatenate([r.layers[0][1] for r in rankers]),
        )
    ]
    for depth in range(1, len(first.layers)):
        layers.append(
            (
                block_diag(*[r.layers[depth][0] for r in rankers]),
                np.concatenate([r.layers[depth][1] for r in rankers]),
            )
        )
    weight, bias = layers[-1]  # the stacked outputs, averaged into one
    out_w = weight.reshape(weight.shape[0], len(rankers), -1).sum(axis=1) / len(rankers)
    layers[-1] = (out_w, bias.reshape(len(rankers), -1).mean(axis=0))
    return replace(first, layers=tuple(layers))


def standardisation(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """The features' mean and spread over the candidates of the users that teach (a constant
    feature: spread 1), which the ranker's inputs are standardised by."""
    x = np.concatenate([x for x, y in groups if len(x) and np.any(y)])
    scale = x.std(axis=0)
    return x.mean(axis=0), np.where(scale > 0, scale, 1.0)


def _fit_members(
    groups: Sequence[tuple[np.ndarray, np.ndarray]],
    hidden: Sequence[int],
    epochs: int,
    seeds: Sequence[int],
) -> list[BlendRanker]:
    """One perceptron per seed, each fitted as if alone (its own initial weights, its own batch
    order, its own Adam moments), but all in one training step: the members' weights are
    stacked on a leading axis and the step minimises the sum of their losses, whose gradient
    for each member is its own loss's (Adam's moments are per weight). One traced step instead
    of one per member, and a third of the steps: fitted one by one, the members took most of a
    `bench quality` entry's time on a small graph (`pytest --durations`)."""
    import tensorflow as tf

    groups = [(x, y) for x, y in groups if len(x) and np.any(y)]
    if not groups:
        raise ValueError("no validation user has a held-out friend among the candidates")
    mean, scale = standardisation(groups)
    width = max(len(x) for x, _ in groups)
    features = np.zeros((len(groups), width, len(BLEND_FEATURES)), np.float32)
    labels = np.zeros((len(groups), width), np.float32)
    present = np.zeros((len(groups), width), bool)
    for i, (x, y) in enumerate(groups):
        features[i, : len(x)] = (x - mean) / scale
        labels[i, : len(x)] = y
        present[i, : len(x)] = True

    initial = []  # each member's Keras initialisation from its seed
    for seed in seeds:
        tf.keras.utils.set_random_seed(seed)
        dense = [tf.keras.layers.Dense(h, activation="relu") for h in hidden]
        model = tf.keras.Sequential([*dense, tf.keras.layers.Dense(1)])
        model.build((None, len(BLEND_FEATURES)))
        initial.append(model.get_weights())
    weights = [tf.Variable(np.stack(w)) for w in zip(*initial, strict=True)]  # [members, ...]
    optimizer = tf.keras.optimizers.Adam(LEARNING_RATE)

    def scores(x: tf.Tensor) -> tf.Tensor:  # [m, b, c, f] -> [m, b, c]
        h = x
        for depth in range(0, len(weights), 2):
            kernel, bias = weights[depth], weights[depth + 1]
            h = tf.einsum("mbcf,mfh->mbch", h, kernel) + bias[:, None, None, :]
            if depth + 2 < len(weights):
                h = tf.nn.relu(h)
        return tf.squeeze(h, -1)

    @tf.function(reduce_retracing=True)
    def step(x: tf.Tensor, y: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        with tf.GradientTape() as tape:
            log_p = tf.nn.log_softmax(tf.where(mask, scores(x), -1e9), axis=-1)
            per_user = tf.reduce_sum(y * log_p, -1) / tf.reduce_sum(y, -1)  # [m, b]
            loss = -tf.reduce_sum(tf.reduce_mean(per_user, axis=1))  # each member's mean, summed
        grads = tape.gradient(loss, weights)
        optimizer.apply_gradients(zip(grads, weights, strict=True))
        return loss

    rngs = [np.random.default_rng(seed) for seed in seeds]
    for _ in range(epochs):
        orders = np.stack([rng.permutation(len(groups)) for rng in rngs])  # [members, users]
        for lo in range(0, len(groups), BATCH):
            batch = orders[:, lo : lo + BATCH]
            step(features[batch], labels[batch], present[batch])
    fitted = [np.asarray(w.numpy(), np.float64) for w in weights]
    return [
        BlendRanker(
            mean, scale, tuple((fitted[d][m], fitted[d + 1][m]) for d in range(0, len(fitted), 2))
        )
        for m in range(len(seeds))
    ]
