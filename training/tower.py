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

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from training.features import InputSpec
from training.variable_rows import gather_variable_rows

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


def self_node(inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    """A user's own node features (its ``self_*`` inputs, without the prefix)."""
    return {k[5:]: v for k, v in inputs.items() if k.startswith("self_")}


def distinct_friends(
    sides: Sequence[Mapping[str, tf.Tensor]],
) -> tuple[dict[str, tf.Tensor], list[tf.Tensor]]:
    """The distinct users among the ``friend_*`` inputs of ``sides`` (node features [U, ...],
    the first occurrence of each user id standing for all) and, per side, each occurrence's
    row among them [batch, fanout]."""
    keys = [k[7:] for k in sides[0] if k.startswith("friend_") and k != "friend_mask"]
    flat = {
        k: tf.concat(
            [tf.reshape(s[f"friend_{k}"], [-1, *s[f"friend_{k}"].shape[2:]]) for s in sides], 0
        )
        for k in keys
    }
    unique, index = tf.unique(flat["user_id"])
    first = tf.math.unsorted_segment_min(tf.range(tf.size(index)), index, tf.size(unique))
    nodes = {k: tf.gather(v, first) for k, v in flat.items()}
    shapes = [tf.shape(s["friend_user_id"]) for s in sides]
    parts = tf.split(index, [tf.reduce_prod(shape) for shape in shapes])
    return nodes, [tf.reshape(p, shape) for p, shape in zip(parts, shapes, strict=True)]


def masked_mean(values: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean over axis -2 of values [..., L, d] where mask [..., L] is 1; zero when empty."""
    total = tf.reduce_sum(values * mask[..., None], axis=-2)
    return total / tf.maximum(tf.reduce_sum(mask, axis=-1, keepdims=True), 1.0)


# Tables up to this many elements get a dense gradient in training's pooled lookups (8 MiB).
DENSE_GRADIENT_MAX = 1 << 21


@tf.custom_gradient
def _gather_dense_gradient(table: tf.Tensor, rows: tf.Tensor):
    """``tf.gather`` whose gradient is the dense table gradient, summed by one ScatterNd: the
    default (one sparse row per looked-up row) makes the optimizer deduplicate them with Unique
    and UnsortedSegmentSum, the slowest kernels of a training step on CPU."""

    def grad(upstream: tf.Tensor) -> tuple[tf.Tensor, None]:
        shape = tf.shape(table, out_type=rows.dtype)
        return tf.scatter_nd(tf.expand_dims(rows, -1), upstream, shape), None

    return tf.gather(table, rows), grad


def gather_rows(table: tf.Variable, rows: tf.Tensor) -> tf.Tensor:
    """``table[rows]``; a small table's gradient is dense (``_gather_dense_gradient``)."""
    if table.shape.num_elements() <= DENSE_GRADIENT_MAX:
        return _gather_dense_gradient(tf.convert_to_tensor(table), rows)
    return gather_variable_rows(table, rows)


def pooled_lookup(
    table: tf.Variable,
    ids: tf.Tensor,
    weights: tf.Tensor,
    to_rows: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.Tensor:
    """``sum_j weights[..., j] * table[rows(ids[..., j])]``: [..., L] -> [..., D], the same
    values as gathering every entry and reducing (to float rounding), for a fraction of the
    work: only the entries of non-zero weight are looked up (id lists are mostly padding:
    twitch/ENGB users have 21 of 64 sparse ids, 7 of 32 sampled friends) and summed with a
    sorted segment sum. Entries of zero weight get no weight gradient (no weight depends on a
    trainable variable here)."""
    width = ids.shape[-1]
    flat_ids = tf.reshape(ids, [-1, width])
    flat_weights = tf.reshape(weights, [-1, width])
    entries = tf.where(flat_weights != 0)  # row-major: the rows come sorted
    picked = tf.gather_nd(flat_ids, entries)
    vectors = gather_rows(table, picked if to_rows is None else to_rows(picked))
    summed = tf.math.segment_sum(
        vectors * tf.gather_nd(flat_weights, entries)[:, None], entries[:, 0]
    )
    rows = tf.shape(flat_ids, out_type=tf.int64)[0]
    summed = tf.pad(summed, [[0, rows - tf.shape(summed, out_type=tf.int64)[0]], [0, 0]])
    return tf.reshape(summed, tf.concat([tf.shape(ids)[:-1], [table.shape[-1]]], 0))


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

    def bag(self, ids: tf.Tensor, weights: tf.Tensor, pooled: bool = False) -> tf.Tensor:
        """Weighted sum of id embeddings; padding (id < 0) has weight 0. ``pooled``: through
        ``pooled_lookup`` (training's shared path; inference keeps the plain gather)."""
        valid = tf.cast(ids >= 0, tf.float32) * weights
        oov = tf.constant(self.spec.vocab_size, dtype=ids.dtype)
        safe = tf.where(ids >= oov, oov, tf.maximum(ids, tf.zeros_like(ids)))
        if pooled:
            return pooled_lookup(self.built_embeddings(self.sparse_embedding), safe, valid)
        return tf.reduce_sum(self.sparse_embedding(safe) * valid[..., None], axis=-2)

    @staticmethod
    def built_embeddings(layer: tf.keras.layers.Embedding) -> tf.Variable:
        """An embedding layer's table, built (by a call, for its usual variable name) if no
        call has built it yet."""
        if not layer.built:
            layer(tf.zeros([0], tf.int64))
        return layer.embeddings

    def id_rows_of(self, user_ids: tf.Tensor) -> tf.Tensor:
        """User ids -> rows of the user-id embedding (unknown users: the shared last row)."""
        return self.id_rows.lookup(tf.convert_to_tensor(user_ids, tf.int64))

    def user_vectors(self, user_ids: tf.Tensor, pooled: bool = False) -> tf.Tensor:
        if pooled:
            return gather_rows(self.built_embeddings(self.id_embedding), self.id_rows_of(user_ids))
        # Not the layer's call: tf.nn.embedding_lookup reads a distributed table whole.
        return gather_variable_rows(
            self.built_embeddings(self.id_embedding), self.id_rows_of(user_ids)
        )

    def encode_features(
        self, node: dict[str, tf.Tensor], id_keep: tf.Tensor | None = None, pooled: bool = False
    ) -> tf.Tensor:
        """The feature part of a node's layer-0 encoding (its sparse-id bag and profile, without
        the user-id vector): what the leakage guard subtracts from a neighbourhood."""
        ids = node["sparse_ids"]
        valid = tf.cast(ids >= 0, tf.float32)
        if id_keep is not None:
            valid *= id_keep
        weights = valid / tf.maximum(tf.reduce_sum(valid, axis=-1, keepdims=True), 1.0)
        return tf.concat(
            [
                self.bag(ids, weights, pooled),
                self.profile_encoder(self.standardise(node["profile"])),
            ],
            axis=-1,
        )

    def encode_self(
        self,
        node: dict[str, tf.Tensor],
        id_keep: tf.Tensor | None = None,
        training: bool = False,
        id_vector_keep: tf.Tensor | None = None,
        features: tf.Tensor | None = None,
        pooled: bool = False,
    ) -> tf.Tensor:
        """Layer-0 encoding of a node's own features. ``id_vector_keep`` [batch, 1] replaces the
        training-time id dropout of the user-id vector (an augmentation chooses its own);
        ``features``: ``encode_features(node, id_keep)`` when already computed; ``pooled``:
        training's lookups (``pooled_lookup``)."""
        if features is None:
            features = self.encode_features(node, id_keep, pooled)
        parts = [features]
        if self.id_dim:
            vectors = self.user_vectors(node["user_id"], pooled)
            if id_vector_keep is None:
                id_vector_keep = self.id_dropout(tf.ones_like(vectors[..., :1]), training=training)
            parts.append(vectors * id_vector_keep)
        return tf.concat(parts, axis=-1)

    def draw_id_keep(self, shape: tf.Tensor, training: bool = False) -> tf.Tensor:
        """The training-time id dropout of user-id vectors of the given batch shape
        ([..., 1]: 0 or 1 / (1 - rate) per vector; ones outside training)."""
        return self.id_dropout(tf.ones(tf.concat([shape, [1]], 0)), training=training)

    def encode_neighbourhood(
        self,
        node: dict[str, tf.Tensor],
        exclude_user: tf.Tensor | None = None,
        pooled: bool = False,
    ) -> tf.Tensor:
        """Layer-0 encoding of the mean friend, from the precomputed aggregates (+ the mean id
        vector of the stored friend sample, without ``exclude_user`` where given)."""
        nbr_profile = self.profile_encoder(
            (node["nbr_profile"] - self.profile_mean) / self.profile_std
        )
        parts = [self.bag(node["nbr_ids"], node["nbr_weights"], pooled), nbr_profile]
        # The zero-neighbour path: without friends the aggregates contribute nothing.
        has_friends = tf.cast(node["degree"] > 0, tf.float32)[..., None]
        parts = [p * has_friends for p in parts]
        if self.id_dim:
            friends = node["friend_ids"]
            mask = tf.cast(friends >= 0, tf.float32)
            if exclude_user is not None:
                mask *= tf.cast(friends != exclude_user[..., None], tf.float32)
            if pooled:
                table = self.built_embeddings(self.id_embedding)
                total = pooled_lookup(table, friends, mask, to_rows=self.id_rows_of)
                count = tf.maximum(tf.reduce_sum(mask, axis=-1, keepdims=True), 1.0)
                parts.append(total / count)
            else:
                parts.append(masked_mean(self.user_vectors(friends), mask))
        return tf.concat(parts, axis=-1)

    # -- layers 1 and 2 ------------------------------------------------------------------
    def hidden(self, own: tf.Tensor, neighbourhood: tf.Tensor) -> tf.Tensor:
        return self.layer1(tf.concat([own, neighbourhood], axis=-1))

    def pair_neighbourhood(
        self,
        inputs: dict[str, tf.Tensor],
        exclude: dict[str, tf.Tensor] | None = None,
        exclude_features: tf.Tensor | None = None,
        pooled: bool = False,
    ) -> tf.Tensor:
        """The user's layer-0 neighbourhood encoding, with the other side of a training
        friendship (``exclude``, its ``self_*`` inputs) removed (the leakage guard): exactly
        from the id part, and from the precomputed feature means by subtracting its encoding
        (``degree`` friends). ``exclude_features``: ``encode_features`` of ``exclude``'s own
        node when already computed; ``pooled``: training's lookups (``pooled_lookup``)."""
        own_node = self_node(inputs)
        if exclude is None:
            return self.encode_neighbourhood(own_node, pooled=pooled)
        other = self_node(exclude)
        neighbourhood = self.encode_neighbourhood(own_node, other["user_id"], pooled)
        features = 2 * self.sparse_dim
        if exclude_features is None:
            exclude_features = self.encode_features(other, pooled=pooled)
        degree = tf.cast(own_node["degree"], tf.float32)[:, None]
        remaining = degree - 1.0
        corrected = (degree * neighbourhood[:, :features] - exclude_features) / tf.maximum(
            remaining, 1.0
        )
        corrected = tf.where(remaining > 0, corrected, tf.zeros_like(corrected))
        return tf.concat([corrected, neighbourhood[:, features:]], axis=-1)

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
        neighbourhood: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """The full tower with the training-time hooks.

        own_override: replaces the user's own layer-0 encoding (masked reconstruction; or the
            encoding itself, computed once for several passes).
        exclude: the other side of a training friendship, removed from this user's
            neighbourhood (``pair_neighbourhood``).
        id_keep / friend_keep / id_vector_keep: augmentation masks (CCA-SSG views) for the user's
            sparse ids, its friends and its user-id vector.
        friend_states: the friends' layer-1 states when already computed (augmented views and
            masked users share them with the main pass: their augmentations touch only the user).
        neighbourhood: ``pair_neighbourhood(inputs, exclude)`` when already computed (the same
            sharing: augmentations do not touch it).
        """
        own = (
            self.encode_self(self_node(inputs), id_keep, training, id_vector_keep)
            if own_override is None
            else own_override
        )
        if neighbourhood is None:
            neighbourhood = self.pair_neighbourhood(inputs, exclude)
        h_self = self.hidden(own, neighbourhood)
        if friend_states is None:
            friend_states = self.friend_states(inputs, training)
        mask = inputs["friend_mask"]
        if friend_keep is not None:
            mask = mask * friend_keep
        return self.readout(h_self, friend_states, mask)

    def readout(self, h_self: tf.Tensor, friend_states: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
        """Layer 2: the unit embedding from a user's layer-1 state and its friends' [.., fanout,
        hidden] (``mask`` [.., fanout]: which friends count)."""
        z = self.layer2(tf.concat([h_self, masked_mean(friend_states, mask)], axis=-1))
        return tf.math.l2_normalize(z, axis=-1)

    def node_states(
        self,
        node: dict[str, tf.Tensor],
        training: bool = False,
        id_vector_keep: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Layer-1 states of nodes from their own rows. In inference a user's ``h_self`` and, for
        every user that samples it as a friend, its ``friend_states`` entry: one function of the
        node's row, what makes layer-by-layer inference over a whole table exact."""
        return self.hidden(
            self.encode_self(node, training=training, id_vector_keep=id_vector_keep),
            self.encode_neighbourhood(node),
        )

    def friend_states(
        self,
        inputs: dict[str, tf.Tensor],
        training: bool = False,
        id_vector_keep: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Layer-1 states of the sampled friends [batch, fanout, hidden], one per occurrence
        (inference, and the reference for ``shared_friend_states``). ``id_vector_keep``
        [batch, fanout, 1]: the friends' id dropout when already drawn."""
        friend_node = {k[7:]: v for k, v in inputs.items() if k.startswith("friend_")}
        return self.node_states(friend_node, training, id_vector_keep)

    def shared_friend_states(
        self,
        sides: Sequence[dict[str, tf.Tensor]],
        training: bool = False,
        id_vector_keeps: Sequence[tf.Tensor] | None = None,
    ) -> list[tf.Tensor]:
        """``friend_states`` of several inputs (the two sides of training pairs) with each
        distinct friend's layer 0 computed once: a batch repeats friends heavily (twitch/ENGB:
        ~2,200 distinct users among the 5,120 sampled friends of a 256-pair batch's two sides),
        and the gathered embedding rows and their sparse gradients were most of a training step.

        Same values (to float rounding): layer 1 is ``ReLU(W [features ; id * keep ; nbr] + b)``,
        split as ``(W_f features + W_n nbr + b) + keep * (W_i id)``, both terms per distinct
        friend, so the id dropout is still drawn per occurrence (``id_vector_keeps``, one
        [batch, fanout, 1] per side, when already drawn). Friends are told apart by user id: the
        inputs must hold one feature row per user (one ``FeatureTable``; absent friends all
        carry the padding id and zeros).
        """
        nodes, rows = distinct_friends(sides)
        if id_vector_keeps is None:
            id_vector_keeps = [
                self.draw_id_keep(tf.shape(side["friend_mask"]), training) for side in sides
            ]
        own = self.encode_features(nodes, pooled=True)
        neighbourhood = self.encode_neighbourhood(nodes, pooled=True)
        if not self.layer1.built:  # by a call, as the first call of ``hidden`` would
            self.layer1(tf.zeros([0, 2 * self.input_dim]))
        kernel, bias = self.layer1.kernel, self.layer1.bias
        features = 2 * self.sparse_dim
        own_rows = features + self.id_dim
        base = tf.nn.bias_add(
            tf.matmul(own, kernel[:features]) + tf.matmul(neighbourhood, kernel[own_rows:]),
            bias,
        )
        if not self.id_dim:
            states = tf.nn.relu(base)
            return [tf.gather(states, r) for r in rows]
        ids = tf.matmul(self.user_vectors(nodes["user_id"], True), kernel[features:own_rows])
        return [
            tf.nn.relu(tf.gather(base, r) + keep * tf.gather(ids, r))
            for r, keep in zip(rows, id_vector_keeps, strict=True)
        ]

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
