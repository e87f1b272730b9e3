"""The shared ("siamese") GraphSAGE user tower.

Layer 0 encodes a node linearly: a mean embedding bag of its sparse ids next to a linear map of its
standardised profile. Because it is linear, the mean over a user's friends equals the encoding of
the precomputed friends' mean bag and mean profile (``nbr_*`` features), so layer 1 needs no
neighbour lookups. Layer 2 aggregates ``fanout`` sampled friends' layer-1 states (mean, zero without
friends). The output is L2-normalised, so inner product = cosine.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from friendrec import contract
from training.features import InputSpec

LOG1P_MASK = np.array(
    [1.0 if f.transform == "log1p" else 0.0 for f in contract.PROFILE_SCALARS], dtype=np.float32
)


def transform_profile_tf(x: tf.Tensor) -> tf.Tensor:
    """``contract.transform_profile`` in TensorFlow (a test pins them to the same values)."""
    logged = tf.math.log1p(tf.maximum(x, 0.0))
    return x + LOG1P_MASK * (logged - x)


class UserTower(tf.keras.Model):
    """Raw Feast features of a user and its sampled friends -> a unit-norm embedding."""

    def __init__(
        self,
        spec: InputSpec,
        profile_mean: np.ndarray,
        profile_var: np.ndarray,
        embedding_dim: int = 64,
        sparse_dim: int = 32,
        hidden_dim: int = 128,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec
        self.embedding_dim = embedding_dim
        self.sparse_dim = sparse_dim
        # Row vocab_size is the out-of-vocabulary bucket for ids a newer vocabulary may bring.
        self.sparse_embedding = tf.keras.layers.Embedding(
            spec.vocab_size + 1, sparse_dim, name="sparse_embedding"
        )
        self.profile_mean = tf.constant(profile_mean, dtype=tf.float32)
        self.profile_std = tf.constant(np.sqrt(np.maximum(profile_var, 1e-6)), dtype=tf.float32)
        self.profile_encoder = tf.keras.layers.Dense(sparse_dim, use_bias=False, name="profile")
        self.layer1 = tf.keras.layers.Dense(hidden_dim, activation="relu", name="sage1")
        self.layer2 = tf.keras.layers.Dense(embedding_dim, name="sage2")
        # GraphMAE's [MASK]: replaces a masked user's own layer-0 encoding.
        self.mask_token = self.add_weight(
            name="mask_token", shape=(2 * sparse_dim,), initializer="zeros", trainable=True
        )

    @property
    def input_dim(self) -> int:
        return 2 * self.sparse_dim

    # -- layer 0 -------------------------------------------------------------------------
    def standardise(self, profile: tf.Tensor) -> tf.Tensor:
        return (transform_profile_tf(profile) - self.profile_mean) / self.profile_std

    def bag(self, ids: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """Weighted sum of id embeddings; padding (id < 0) has weight 0."""
        valid = tf.cast(ids >= 0, tf.float32) * weights
        oov = tf.constant(self.spec.vocab_size, dtype=ids.dtype)
        safe = tf.where(ids >= oov, oov, tf.maximum(ids, tf.zeros_like(ids)))
        return tf.reduce_sum(self.sparse_embedding(safe) * valid[..., None], axis=-2)

    def encode_self(self, node: dict[str, tf.Tensor], id_keep: tf.Tensor | None = None):
        """Layer-0 encoding of a node's own features (mean bag, standardised profile)."""
        ids = node["sparse_ids"]
        valid = tf.cast(ids >= 0, tf.float32)
        if id_keep is not None:
            valid *= id_keep
        weights = valid / tf.maximum(tf.reduce_sum(valid, axis=-1, keepdims=True), 1.0)
        return tf.concat(
            [self.bag(ids, weights), self.profile_encoder(self.standardise(node["profile"]))],
            axis=-1,
        )

    def encode_neighbourhood(self, node: dict[str, tf.Tensor]) -> tf.Tensor:
        """Layer-0 encoding of the friends' mean (from the precomputed aggregates)."""
        nbr_profile = self.profile_encoder(
            (node["nbr_profile"] - self.profile_mean) / self.profile_std
        )
        encoded = tf.concat([self.bag(node["nbr_ids"], node["nbr_weights"]), nbr_profile], -1)
        # The zero-neighbour path: without friends the aggregates contribute nothing.
        has_friends = tf.cast(node["degree"] > 0, tf.float32)
        return encoded * has_friends[..., None]

    # -- layers 1 and 2 ------------------------------------------------------------------
    def hidden(self, own: tf.Tensor, neighbourhood: tf.Tensor) -> tf.Tensor:
        return self.layer1(tf.concat([own, neighbourhood], axis=-1))

    def embed(
        self,
        inputs: dict[str, tf.Tensor],
        own_override: tf.Tensor | None = None,
        exclude_own: tf.Tensor | None = None,
        exclude_weight: tf.Tensor | None = None,
        id_keep: tf.Tensor | None = None,
        friend_keep: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """The full tower with the training-time hooks.

        own_override: replaces the user's own layer-0 encoding (masked reconstruction).
        exclude_own / exclude_weight: layer-0 encoding of a training positive and 1 where it must
            be removed from the user's precomputed neighbour mean (leakage guard).
        id_keep / friend_keep: augmentation masks (CCA-SSG views) for the user's ids and friends.
        """
        own_node = {k[5:]: v for k, v in inputs.items() if k.startswith("self_")}
        friend_node = {k[7:]: v for k, v in inputs.items() if k.startswith("friend_")}
        own = self.encode_self(own_node, id_keep) if own_override is None else own_override
        neighbourhood = self.encode_neighbourhood(own_node)
        if exclude_own is not None:
            degree = tf.cast(inputs["self_degree"], tf.float32)[:, None]
            remaining = tf.maximum(degree - exclude_weight[:, None], 0.0)
            corrected = (degree * neighbourhood - exclude_weight[:, None] * exclude_own) / (
                tf.maximum(remaining, 1.0)
            )
            neighbourhood = tf.where(remaining > 0, corrected, tf.zeros_like(corrected))
        h_self = self.hidden(own, neighbourhood)
        h_friends = self.hidden(
            self.encode_self(friend_node), self.encode_neighbourhood(friend_node)
        )
        mask = inputs["friend_mask"]
        if friend_keep is not None:
            mask = mask * friend_keep
        count = tf.reduce_sum(mask, axis=-1, keepdims=True)
        h_nbr = tf.reduce_sum(h_friends * mask[..., None], axis=1) / tf.maximum(count, 1.0)
        z = self.layer2(tf.concat([h_self, h_nbr], axis=-1))
        return tf.math.l2_normalize(z, axis=-1)

    def call(self, inputs: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        return self.embed(inputs)
