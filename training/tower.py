"""The shared ("siamese") GraphSAGE user tower.

Layer 0 encodes a node linearly: a mean embedding bag of its sparse ids, a linear map of its
standardised profile and (optionally) a learned embedding of its user id. Because the first two are
linear, the mean over a user's friends equals the encoding of the precomputed friends' mean bag and
mean profile (``nbr_*`` features); the id part averages the ids of the stored friend sample. So
layer 1 needs no extra lookups, and layer 2 aggregates ``fanout`` sampled friends' layer-1 states
(mean; zero without friends). The embedding is L2-normalised, so inner product = cosine.

Users unknown at training time (new sign-ups) share one out-of-vocabulary id vector: they are served
from their features and their friends, which is the cold-start path.

Popularity term (``popularity_bias``): a unit-norm inner product cannot say "this user is popular",
yet the log-Q-corrected softmax is fitted to ``log p(friend | user)``, which has a popularity
part; without one the tower retrieves unpopular users while held-out friends are popular
(docs/quality.md). So a candidate's score gets ``w * log(1 + degree)`` (one learned scalar ``w``):
the index stores ``[e, w * log(1 + degree)]`` (``call``) and queries search with ``[e, 1]``
(``query``), so inner product = cosine + popularity term, with one Milvus search.

The raw profile scalars go through the dataset contract's transform first (``transform``: the
arrays of ``Contract.transform_arrays()``, baked into the graph as constants, so an exported
SavedModel carries them and needs no contract at serving time).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import tensorflow as tf

from training.features import InputSpec

TRANSFORM_KEYS = ("clip_min", "clip_max", "log1p", "standardise", "mean", "std")


def transform_constants(transform: Mapping[str, np.ndarray]) -> dict[str, tf.Tensor]:
    """``Contract.transform_arrays()`` -> TensorFlow constants (float32; the masks bool)."""
    missing = [k for k in TRANSFORM_KEYS if k not in transform]
    if missing:
        raise ValueError(f"transform arrays lack {missing}")
    return {
        k: tf.constant(
            np.asarray(transform[k], dtype=bool if k in ("log1p", "standardise") else np.float32)
        )
        for k in TRANSFORM_KEYS
    }


def transform_profile_tf(x: tf.Tensor, transform: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """``Contract.transform_profile`` in TensorFlow (a test pins them to the same values): clip,
    then log1p of the non-negative part where ``log1p``, then ``(x - mean) / std`` where
    ``standardise``."""
    out = tf.minimum(tf.maximum(x, transform["clip_min"]), transform["clip_max"])
    out = tf.where(transform["log1p"], tf.math.log1p(tf.maximum(out, 0.0)), out)
    return tf.where(transform["standardise"], (out - transform["mean"]) / transform["std"], out)


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over axis -2 of values [..., L, d] where mask [..., L] is 1; zero when empty."""
    total = tf.reduce_sum(values * mask[..., None], axis=-2)
    return total / tf.maximum(tf.reduce_sum(mask, axis=-1, keepdims=True), 1.0)


class UserTower(tf.keras.Model):
    """Raw Feast features of a user and its sampled friends -> a unit-norm embedding."""

    def __init__(
        self,
        spec: InputSpec,
        profile_mean: np.ndarray,
        profile_var: np.ndarray,
        known_user_ids: np.ndarray,
        embedding_dim: int = 64,
        sparse_dim: int = 32,
        id_dim: int = 32,
        hidden_dim: int = 128,
        id_dropout: float = 0.0,
        *,
        transform: Mapping[str, np.ndarray],
        popularity_bias: bool = False,
        **kwargs,
    ) -> None:
        """``transform``: the dataset contract's ``transform_arrays()`` (one entry per profile
        scalar, in contract order)."""
        super().__init__(**kwargs)
        self.spec = spec
        self.transform = transform_constants(transform)
        self.embedding_dim = embedding_dim
        self.sparse_dim = sparse_dim
        self.id_dim = id_dim
        # Training drops whole user-id vectors so the tower cannot lean on memorised ids alone:
        # less overfitting, and practice for the cold-start path (new users have no id vector).
        self.id_dropout = tf.keras.layers.Dropout(id_dropout, noise_shape=None, name="id_dropout")
        # Row vocab_size is the out-of-vocabulary bucket for ids a newer vocabulary may bring.
        self.sparse_embedding = tf.keras.layers.Embedding(
            spec.vocab_size + 1, sparse_dim, name="sparse_embedding"
        )
        self.profile_mean = tf.constant(profile_mean, dtype=tf.float32)
        self.profile_std = tf.constant(np.sqrt(np.maximum(profile_var, 1e-6)), dtype=tf.float32)
        self.profile_encoder = tf.keras.layers.Dense(sparse_dim, use_bias=False, name="profile")
        if id_dim:
            keys = np.asarray(known_user_ids, dtype=np.int64)
            self.id_rows = tf.lookup.StaticHashTable(
                tf.lookup.KeyValueTensorInitializer(
                    tf.constant(keys), tf.range(len(keys), dtype=tf.int64)
                ),
                default_value=len(keys),  # the shared unknown-user row
            )
            self.id_embedding = tf.keras.layers.Embedding(
                len(keys) + 1,
                id_dim,
                embeddings_initializer=tf.keras.initializers.RandomNormal(stddev=0.05),
                name="user_id_embedding",
            )
        self.layer1 = tf.keras.layers.Dense(hidden_dim, activation="relu", name="sage1")
        self.layer2 = tf.keras.layers.Dense(embedding_dim, name="sage2")
        self.popularity_bias = popularity_bias
        if popularity_bias:  # cosine units per unit of log(1 + degree); see the module docstring
            self.popularity_weight = self.add_weight(
                name="popularity_weight", shape=(), initializer="zeros", trainable=True
            )
        # GraphMAE's [MASK]: replaces a masked user's own layer-0 encoding.
        self.mask_token = self.add_weight(
            name="mask_token", shape=(self.input_dim,), initializer="zeros", trainable=True
        )

    @property
    def input_dim(self) -> int:
        return 2 * self.sparse_dim + self.id_dim

    @property
    def profile_width(self) -> int:
        """Profile scalars per user (the contract's; the serving signature's profile width)."""
        return int(self.profile_mean.shape[0])

    # -- layer 0 -------------------------------------------------------------------------
    def standardise(self, profile: tf.Tensor) -> tf.Tensor:
        return (
            transform_profile_tf(profile, self.transform) - self.profile_mean
        ) / self.profile_std

    def bag(self, ids: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Weighted sum of id embeddings; padding (id < 0) has weight 0."""
        valid = tf.cast(ids >= 0, tf.float32) * weights
        oov = tf.constant(self.spec.vocab_size, dtype=ids.dtype)
        safe = tf.where(ids >= oov, oov, tf.maximum(ids, tf.zeros_like(ids)))
        return tf.reduce_sum(self.sparse_embedding(safe) * valid[..., None], axis=-2)

    def user_vectors(self, user_ids: tf.Tensor) -> tf.Tensor:
        return self.id_embedding(self.id_rows.lookup(tf.convert_to_tensor(user_ids, tf.int64)))

    def encode_self(
        self,
        node: dict[str, tf.Tensor],
        id_keep: tf.Tensor | None = None,
        training: bool = False,
        id_vector_keep: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Layer-0 encoding of a node's own features. ``id_vector_keep`` [batch, 1] replaces the
        training-time id dropout of the user-id vector (an augmentation chooses its own)."""
        ids = node["sparse_ids"]
        valid = tf.cast(ids >= 0, tf.float32)
        if id_keep is not None:
            valid *= id_keep
        weights = valid / tf.maximum(tf.reduce_sum(valid, axis=-1, keepdims=True), 1.0)
        parts = [self.bag(ids, weights), self.profile_encoder(self.standardise(node["profile"]))]
        if self.id_dim:
            vectors = self.user_vectors(node["user_id"])
            if id_vector_keep is None:
                id_vector_keep = self.id_dropout(tf.ones_like(vectors[..., :1]), training=training)
            parts.append(vectors * id_vector_keep)
        return tf.concat(parts, axis=-1)

    def encode_neighbourhood(
        self, node: dict[str, tf.Tensor], exclude_user: tf.Tensor | None = None
    ) -> tf.Tensor:
        """Layer-0 encoding of the mean friend, from the precomputed aggregates (+ the mean id
        vector of the stored friend sample, without ``exclude_user`` where given)."""
        nbr_profile = self.profile_encoder(
            (node["nbr_profile"] - self.profile_mean) / self.profile_std
        )
        parts = [self.bag(node["nbr_ids"], node["nbr_weights"]), nbr_profile]
        # The zero-neighbour path: without friends the aggregates contribute nothing.
        has_friends = tf.cast(node["degree"] > 0, tf.float32)[..., None]
        parts = [p * has_friends for p in parts]
        if self.id_dim:
            friends = node["friend_ids"]
            mask = tf.cast(friends >= 0, tf.float32)
            if exclude_user is not None:
                mask *= tf.cast(friends != exclude_user[..., None], tf.float32)
            parts.append(masked_mean(self.user_vectors(friends), mask))
        return tf.concat(parts, axis=-1)

    # -- layers 1 and 2 ------------------------------------------------------------------
    def hidden(self, own: tf.Tensor, neighbourhood: tf.Tensor) -> tf.Tensor:
        return self.layer1(tf.concat([own, neighbourhood], axis=-1))

    def embed(
        self,
        inputs: dict[str, tf.Tensor],
        own_override: tf.Tensor | None = None,
        exclude: dict[str, tf.Tensor] | None = None,
        id_keep: tf.Tensor | None = None,
        friend_keep: tf.Tensor | None = None,
        training: bool = False,
        friend_states: tf.Tensor | None = None,
        id_vector_keep: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """The full tower with the training-time hooks.

        own_override: replaces the user's own layer-0 encoding (masked reconstruction).
        exclude: the other side of a training friendship (its ``self_*`` inputs); it is removed
            from this user's neighbourhood (leakage guard): exactly from the id part, and from
            the precomputed feature means by subtracting its encoding (``degree`` friends).
        id_keep / friend_keep / id_vector_keep: augmentation masks (CCA-SSG views) for the user's
            sparse ids, its friends and its user-id vector.
        friend_states: the friends' layer-1 states when already computed (augmented views and
            masked users share them with the main pass: their augmentations touch only the user).
        """
        own_node = {k[5:]: v for k, v in inputs.items() if k.startswith("self_")}
        own = (
            self.encode_self(own_node, id_keep, training, id_vector_keep)
            if own_override is None
            else own_override
        )
        if exclude is None:
            neighbourhood = self.encode_neighbourhood(own_node)
        else:
            other = {k[5:]: v for k, v in exclude.items() if k.startswith("self_")}
            neighbourhood = self.encode_neighbourhood(own_node, exclude_user=other["user_id"])
            features = 2 * self.sparse_dim
            other_enc = self.encode_self(other)[:, :features]
            degree = tf.cast(own_node["degree"], tf.float32)[:, None]
            remaining = degree - 1.0
            corrected = (degree * neighbourhood[:, :features] - other_enc) / tf.maximum(
                remaining, 1.0
            )
            corrected = tf.where(remaining > 0, corrected, tf.zeros_like(corrected))
            neighbourhood = tf.concat([corrected, neighbourhood[:, features:]], axis=-1)
        h_self = self.hidden(own, neighbourhood)
        if friend_states is None:
            friend_states = self.friend_states(inputs, training)
        mask = inputs["friend_mask"]
        if friend_keep is not None:
            mask = mask * friend_keep
        z = self.layer2(tf.concat([h_self, masked_mean(friend_states, mask)], axis=-1))
        return tf.math.l2_normalize(z, axis=-1)

    def friend_states(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """Layer-1 states of the sampled friends [batch, fanout, hidden]: most of the cost."""
        friend_node = {k[7:]: v for k, v in inputs.items() if k.startswith("friend_")}
        return self.hidden(
            self.encode_self(friend_node, training=training), self.encode_neighbourhood(friend_node)
        )

    # -- the two vector forms ------------------------------------------------------------
    @property
    def output_dim(self) -> int:
        """Width of the index and query vectors."""
        return self.embedding_dim + int(self.popularity_bias)

    def candidate_vectors(
        self,
        unit: tf.Tensor,
        inputs: dict[str, tf.Tensor],
        exclude: dict[str, tf.Tensor] | None = None,
    ) -> tf.Tensor:
        """What the index stores: the unit embedding, then the popularity term. With ``exclude``
        (a training pair's other side) the degree does not count that friendship (leakage)."""
        if not self.popularity_bias:
            return unit
        degree = tf.cast(inputs["self_degree"], tf.float32)
        if exclude is not None:
            degree = tf.maximum(degree - 1.0, 0.0)
        return tf.concat([unit, (self.popularity_weight * tf.math.log1p(degree))[:, None]], -1)

    def query_vectors(self, unit: tf.Tensor) -> tf.Tensor:
        """What a search is made with: the unit embedding, then 1 (picks up the term)."""
        if not self.popularity_bias:
            return unit
        return tf.concat([unit, tf.ones_like(unit[:, :1])], axis=-1)

    def query_form(self, candidates: np.ndarray) -> np.ndarray:
        """Users' query vectors from their index vectors (no second pass through the tower)."""
        if not self.popularity_bias:
            return candidates
        out = np.array(candidates, dtype=np.float32, copy=True)
        out[:, -1] = 1.0
        return out

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        """The index vector (see ``query`` for the query vector)."""
        return self.candidate_vectors(self.embed(inputs, training=training), inputs)

    def query(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.query_vectors(self.embed(inputs, training=training))
