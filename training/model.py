"""The SSMTL two-tower model: one shared tower, the TFRS retrieval task, two auxiliary heads.

L = L_ret + w_cca * L_cca + w_mae * L_mae. With both weights at zero the auxiliary heads are not
even run, so the model *is* the single-task baseline (same parameters, same random stream).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import tensorflow as tf
import tensorflow_recommenders as tfrs

from training.losses import cca_ssg_loss, scaled_cosine_error
from training.tower import UserTower, self_node

Objective = Literal["baseline", "ssmtl", "cca", "mae"]


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and augmentation rates (PAPER.md defaults; tune on validation edges)."""

    temperature: float = 0.05
    log_q: bool = True
    # The log-Q correction subtracts strength * log(sampling probability) from each in-batch
    # logit: 1 removes the popularity sampling bias fully, 0 not at all (the same as log_q off).
    log_q_strength: float = 1.0
    cca_weight: float = 0.0
    cca_lambda: float = 5e-3
    cca_fraction: float = 0.5  # of the batch's anchors used for the CCA views
    # > 0: CCA-SSG scores a 2-layer MLP projection of the embedding (this width), not the
    # embedding itself, so its whitening term does not act on the retrieval space directly.
    cca_projector_dim: int = 0
    # The user-id vector's drop rate in each CCA-SSG view; None: the tower's training-time
    # id dropout, drawn independently per view (so the views disagree on the id half the time,
    # and the invariance term teaches the tower to ignore ids; docs/quality.md).
    cca_id_drop: float | None = 0.0
    # CCA-SSG's view augmentations. The paper masks 20 % of the features too; here the
    # invariance term then erases the features, and cold-start users lose (docs/quality.md).
    feature_drop: float = 0.0
    neighbour_drop: float = 0.2
    # > 0: each view also scales every sparse id's weight, friend's weight and id-vector
    # dimension by a mean-1 log-normal factor of this sigma (perturbs what dropping removes).
    view_noise: float = 0.0
    # "clean": one view is the user's unaugmented embedding under a stop-gradient, the other
    # augmented; the invariance term then asks the augmented one to recover it.
    cca_target: Literal["views", "clean"] = "views"
    mae_weight: float = 0.0
    mae_fraction: float = 0.5
    mae_gamma: float = 2.0

    @classmethod
    def for_objective(cls, objective: Objective, **overrides: Any) -> LossConfig:
        weights = {
            "baseline": {"cca_weight": 0.0, "mae_weight": 0.0},
            # Tuned on twitch/ENGB validation edges (docs/quality.md): 0.2 / 1.0 beat
            # 0.05 / 0.5 and 0.01 / 0.1.
            "ssmtl": {"cca_weight": 0.2, "mae_weight": 1.0},
            "cca": {"cca_weight": 0.2, "mae_weight": 0.0},
            "mae": {"cca_weight": 0.0, "mae_weight": 1.0},
        }[objective]
        return cls(**{**weights, **overrides})


def split_inputs(batch: dict[str, tf.Tensor], prefix: str) -> dict[str, tf.Tensor]:
    return {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}


def _batch_mean(per_example: tf.Tensor) -> tf.Tensor:
    """Keras' SUM_OVER_BATCH_SIZE reduction (sum / number of elements), spelled out."""
    return tf.math.divide_no_nan(
        tf.reduce_sum(per_example), tf.cast(tf.size(per_example), per_example.dtype)
    )


def global_candidates(
    replica: tf.distribute.ReplicaContext,
    candidates: tf.Tensor,
    sampling_prob: tf.Tensor | None,
    candidate_ids: tf.Tensor,
) -> tuple[tf.Tensor, tf.Tensor | None, tf.Tensor]:
    """Every replica's candidates (all-gathered), rolled so this replica's own come first.

    The in-batch softmax then scores each local query against the *global* batch of candidates,
    and TFRS's labels (the diagonal of the first ``local batch`` columns) still point at each
    query's own positive; the softmax does not depend on the order of the other columns.
    Gradients flow back through the all-gather (its gradient is an all-reduce of the upstream
    gradient, sliced to this replica's rows). All replicas must have the same local batch size
    (``PairSampler`` shards give them that).
    """
    offset = tf.cast(replica.replica_id_in_sync_group, tf.int32) * tf.shape(candidates)[0]
    gathered = replica.all_gather(candidates, axis=0)
    extras = {"ids": candidate_ids}
    if sampling_prob is not None:
        extras["prob"] = sampling_prob
    extras = replica.all_gather(tf.nest.map_structure(tf.stop_gradient, extras), axis=0)

    def roll(x: tf.Tensor) -> tf.Tensor:
        return tf.roll(x, shift=-offset, axis=0)

    return roll(gathered), roll(extras["prob"]) if "prob" in extras else None, roll(extras["ids"])


class SSMTLModel(tfrs.Model):
    """Training-time wrapper: serving uses ``self.tower`` alone."""

    def __init__(
        self, tower: UserTower, losses: LossConfig, seed: int = 0, share_states: bool = True
    ) -> None:
        """``share_states``: compute each distinct friend's layer 0 once per batch, each
        anchor's own encoding and guarded neighbourhood once for every pass that uses them, and
        look embeddings up only for the ids present (``pooled_lookup``): the same loss and
        gradients, to float rounding, several times faster on CPU (docs/model.md). False: every
        pass computes its own, per occurrence, as inference does (the reference the tests
        compare with)."""
        super().__init__()
        self.tower = tower
        self.loss_config = losses
        self.share_states = share_states
        # Mean over the batch, as in PAPER.md (TFRS defaults to a sum, which would rescale the
        # auxiliary weights with the batch size). Keras refuses SUM_OVER_BATCH_SIZE inside a
        # tf.distribute strategy, so a model built in one takes per-example losses and the same
        # mean itself (``_batch_mean``).
        self.distributed = tf.distribute.has_strategy()
        reduction = (
            tf.keras.losses.Reduction.NONE
            if self.distributed
            else tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE
        )
        self.task = tfrs.tasks.Retrieval(
            loss=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction=reduction),
            temperature=losses.temperature,
            remove_accidental_hits=True,
        )
        self.rng = tf.random.Generator.from_seed(seed)
        vocab = tower.spec.vocab_size
        if losses.cca_weight > 0 and losses.cca_projector_dim > 0:
            width = losses.cca_projector_dim
            self.cca_projector = tf.keras.Sequential(
                [
                    tf.keras.layers.Dense(width, activation="relu", name="cca_hidden"),
                    tf.keras.layers.Dense(width, name="cca_out"),
                ],
                name="cca_projector",
            )
        if losses.mae_weight > 0:
            self.decoder = tf.keras.Sequential(
                [
                    tf.keras.layers.Dense(128, activation="relu", name="mae_hidden"),
                    tf.keras.layers.Dense(vocab + tower.profile_mean.shape[0], name="mae_out"),
                ],
                name="mae_decoder",
            )
        self.loss_trackers = {
            name: tf.keras.metrics.Mean(name=name) for name in ("retrieval", "cca", "mae")
        }

    def embed_pair_side(
        self, side: dict[str, tf.Tensor], other: dict[str, tf.Tensor] | None, **hooks: Any
    ) -> tf.Tensor:
        """Embed one side of the training pairs with the other side removed from its
        neighbourhood (the leakage guard; ``other`` None: no pair)."""
        return self.tower.embed(side, exclude=other, **hooks)

    def embed_pairs(
        self, query: dict[str, tf.Tensor], candidate: dict[str, tf.Tensor], training: bool = False
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """Both sides' embeddings (each guarded against the other), the query side's friend
        states and (with ``share_states``) its guarded neighbourhood, for the auxiliary heads.

        The random draws come in one order either way: the friends' id dropout (query side,
        then candidate side), then the query users' own, then the candidates'.
        """
        tower = self.tower
        sides = (query, candidate)
        keeps = [tower.draw_id_keep(tf.shape(side["friend_mask"]), training) for side in sides]
        if not self.share_states:
            q_friends = tower.friend_states(query, training, keeps[0])
            c_friends = tower.friend_states(candidate, training, keeps[1])
            q = self.embed_pair_side(query, candidate, training=training, friend_states=q_friends)
            c = self.embed_pair_side(candidate, query, training=training, friend_states=c_friends)
            return q, c, q_friends, None
        q_friends, c_friends = tower.shared_friend_states(sides, training, keeps)
        q_features, c_features = (
            tower.encode_features(self_node(side), pooled=True) for side in sides
        )
        q_own, c_own = (
            tower.encode_self(self_node(side), training=training, features=f, pooled=True)
            for side, f in ((query, q_features), (candidate, c_features))
        )
        q_nbr = tower.pair_neighbourhood(query, candidate, c_features, pooled=True)
        c_nbr = tower.pair_neighbourhood(candidate, query, q_features, pooled=True)
        q = tower.embed(query, own_override=q_own, friend_states=q_friends, neighbourhood=q_nbr)
        c = tower.embed(candidate, own_override=c_own, friend_states=c_friends, neighbourhood=c_nbr)
        return q, c, q_friends, q_nbr

    def compute_loss(self, batch: dict[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        cfg = self.loss_config
        query = split_inputs(batch, "q/")
        candidate = split_inputs(batch, "c/")
        q, c, q_friends, q_nbr = self.embed_pairs(query, candidate, training)
        log_q = self._log_q_weights(batch["c_sampling_prob"])
        candidates = self.tower.candidate_vectors(c, candidate, exclude=query)
        candidate_ids = batch["c_id"]
        replica = tf.distribute.get_replica_context()
        if replica is not None and replica.num_replicas_in_sync > 1:
            candidates, log_q, candidate_ids = global_candidates(
                replica, candidates, log_q, candidate_ids
            )
        if "n_id" in batch:  # mixed negatives: uniformly drawn users after the in-batch ones
            negatives = split_inputs(batch, "n/")
            unit = self.tower.embed(negatives, training=training)
            candidates = tf.concat(
                [candidates, self.tower.candidate_vectors(unit, negatives)], axis=0
            )
            candidate_ids = tf.concat([candidate_ids, batch["n_id"]], axis=0)
            if log_q is not None:
                log_q = tf.concat([log_q, self._log_q_weights(batch["n_sampling_prob"])], 0)
        retrieval = self.task(
            self.tower.query_vectors(q),
            candidates,
            candidate_sampling_probability=log_q,
            candidate_ids=candidate_ids,
            compute_metrics=False,
        )
        if self.distributed:
            retrieval = _batch_mean(retrieval)
        total = retrieval
        self.loss_trackers["retrieval"].update_state(retrieval)
        if cfg.cca_weight <= 0 and cfg.mae_weight <= 0:
            return total
        aux: tuple[Any, ...] = (query, candidate, q_friends, training)
        pairs = None
        if "u/friend_mask" in batch:  # users drawn uniformly (``aux_users``), no pair to guard
            users = split_inputs(batch, "u/")
            (friends,) = self.tower.shared_friend_states([users], training)
            # Their neighbourhood once for every view (augmentations do not touch it).
            q_nbr = self.tower.pair_neighbourhood(users, pooled=True)
            aux = (users, None, friends, training)
            pairs = tf.shape(query["friend_mask"])[0]  # each loss takes its fraction of these
        if cfg.cca_weight > 0:
            cca = self.cca_loss(*aux, neighbourhood=q_nbr, pairs=pairs)
            self.loss_trackers["cca"].update_state(cca)
            total += cfg.cca_weight * cca
        if cfg.mae_weight > 0:
            mae = self.mae_loss(*aux, neighbourhood=q_nbr, pairs=pairs)
            self.loss_trackers["mae"].update_state(mae)
            total += cfg.mae_weight * mae
        return total

    def _log_q_weights(self, sampling_prob: tf.Tensor) -> tf.Tensor | None:
        """What TFRS' log-Q correction takes (it subtracts log of it): the candidates' sampling
        probabilities to the power ``log_q_strength`` (p ** s subtracts s * log p); None: off."""
        cfg = self.loss_config
        if not cfg.log_q or cfg.log_q_strength <= 0:
            return None
        if cfg.log_q_strength != 1.0:
            return tf.pow(sampling_prob, cfg.log_q_strength)
        return sampling_prob

    @staticmethod
    def _heads(
        query: dict[str, tf.Tensor],
        candidate: dict[str, tf.Tensor] | None,
        fraction: float,
        batch: tf.Tensor | None = None,
    ) -> tuple[tf.Tensor, dict[str, tf.Tensor], dict[str, tf.Tensor] | None]:
        """The first M = fraction * batch pairs (the users an auxiliary objective sees);
        ``candidate`` None: users without a pair (``aux_users: uniform``), of which there are
        at least M for the pairs' ``batch`` size."""
        if batch is None:
            batch = tf.shape(query["friend_mask"])[0]
        m = tf.maximum(tf.cast(tf.cast(batch, tf.float32) * fraction, tf.int32), 2)
        heads = None if candidate is None else {k: v[:m] for k, v in candidate.items()}
        return m, {k: v[:m] for k, v in query.items()}, heads

    def _noise(self, shape: tf.Tensor | list[int]) -> tf.Tensor:
        """Mean-1 log-normal factors, sigma ``view_noise``: a view's perturbation that keeps
        every input (dropping one teaches the invariance term to ignore it)."""
        sigma = self.loss_config.view_noise
        return tf.exp(sigma * self.rng.normal(shape) - 0.5 * sigma**2)

    def cca_loss(
        self,
        query: dict[str, tf.Tensor],
        candidate: dict[str, tf.Tensor] | None,
        friend_states: tf.Tensor,
        training: bool = False,
        neighbourhood: tf.Tensor | None = None,
        pairs: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Two views of the first M anchors (their friends' states, and their guarded
        neighbourhood where given, are shared with the main pass): under ``cca_target``
        'views', both independently augmented (feature masking of their own ids, neighbour
        dropping, id-vector dropping, noise); under 'clean', the first is the anchors'
        unaugmented embedding under a stop-gradient, a target the augmented one is pulled
        towards but that the term cannot move."""
        cfg = self.loss_config
        m, q, c = self._heads(query, candidate, cfg.cca_fraction, pairs)
        shared = {
            "training": training,
            "friend_states": friend_states[:m],
            "neighbourhood": None if neighbourhood is None else neighbourhood[:m],
        }

        def view(augmented: bool) -> tf.Tensor:
            """One view; unaugmented: no drop and no id dropout (what the service computes)."""
            id_keep = friend_keep = None
            vector_keep = None if augmented else tf.ones([m, 1])
            if augmented:
                id_keep = tf.cast(
                    self.rng.uniform(tf.shape(q["self_sparse_ids"])) >= cfg.feature_drop,
                    tf.float32,
                )
                friend_keep = tf.cast(
                    self.rng.uniform(tf.shape(q["friend_mask"])) >= cfg.neighbour_drop,
                    tf.float32,
                )
                if cfg.cca_id_drop is not None:
                    kept = tf.cast(self.rng.uniform([m, 1]) >= cfg.cca_id_drop, tf.float32)
                    vector_keep = kept / (1.0 - cfg.cca_id_drop)  # dropout's scaling
                if cfg.view_noise > 0:
                    id_keep *= self._noise(tf.shape(id_keep))
                    friend_keep *= self._noise(tf.shape(friend_keep))
                    if self.tower.id_dim:
                        if vector_keep is None:  # the tower's id dropout, as without noise
                            vector_keep = self.tower.draw_id_keep([m], training)
                        vector_keep *= self._noise([m, self.tower.id_dim])
            own = None
            if self.share_states:  # training's lookups (``pooled_lookup``), as the main pass
                own = self.tower.encode_self(
                    self_node(q), id_keep, training, vector_keep, pooled=True
                )
            return self.embed_pair_side(
                q,
                c,
                own_override=own,
                id_keep=id_keep,
                id_vector_keep=vector_keep,
                friend_keep=friend_keep,
                **shared,
            )

        first = view(True) if cfg.cca_target == "views" else tf.stop_gradient(view(False))
        views = [first, view(True)]
        if cfg.cca_projector_dim > 0:
            views = [self.cca_projector(v) for v in views]
        return cca_ssg_loss(views[0], views[1], cfg.cca_lambda)

    def mae_loss(
        self,
        query: dict[str, tf.Tensor],
        candidate: dict[str, tf.Tensor] | None,
        friend_states: tf.Tensor,
        training: bool = False,
        neighbourhood: tf.Tensor | None = None,
        pairs: tf.Tensor | None = None,
    ) -> tf.Tensor:
        """Replace M anchors' own features by [MASK], encode, decode, score with SCE."""
        cfg = self.loss_config
        m, q, c = self._heads(query, candidate, cfg.mae_fraction, pairs)
        masked = tf.tile(self.tower.mask_token[None, :], [m, 1])
        z = self.embed_pair_side(
            q,
            c,
            own_override=masked,
            training=training,
            friend_states=friend_states[:m],
            neighbourhood=None if neighbourhood is None else neighbourhood[:m],
        )
        vocab = self.tower.spec.vocab_size
        ids = q["self_sparse_ids"]
        safe = tf.where((ids < 0) | (ids >= vocab), tf.constant(vocab, ids.dtype), ids)
        multi_hot = tf.math.bincount(
            tf.cast(safe, tf.int32), minlength=vocab, maxlength=vocab, axis=-1, binary_output=True
        )
        target = tf.concat(
            [tf.cast(multi_hot, tf.float32), self.tower.standardise(q["self_profile"])], axis=-1
        )
        return scaled_cosine_error(self.decoder(z), target, cfg.mae_gamma)

    @property
    def metrics(self) -> list[tf.keras.metrics.Metric]:
        return [*super().metrics, *self.loss_trackers.values()]
