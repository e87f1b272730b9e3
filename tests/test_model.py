"""The SSMTL model: losses on hand-made tensors, the baseline identity, the leakage guard,
training progress, export round trip, and training/serving parity through Feast."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import tensorflow as tf
from contracts import tagged, twitch_like
from musae_files import prepare_all_train
from tensorflow_serving.apis import prediction_log_pb2
from tiny_models import SMALL

import training  # noqa: F401  (TF_USE_LEGACY_KERAS before TensorFlow)
from feature_repo.jobs.graph_features import compute_graph_features, profile_table
from friendrec.config import TrainingSettings
from friendrec.feast_store import open_store
from friendrec.fof import BLEND_FEATURES
from training.blend_ranker import source_order
from training.export import MODEL_CARD, WARMUP_FILE, export_tower, load_signature
from training.features import (
    FeatureTable,
    InputSpec,
    fetch_online_inputs,
    sample_neighbours,
    tower_inputs,
)
from training.losses import cca_ssg_loss, scaled_cosine_error
from training.model import LossConfig, SSMTLModel, split_inputs
from training.pipeline import PairSampler, embed_all
from training.tower import UserTower, transform_constants, transform_profile_tf
from training.train import (
    TrainingContext,
    aux_user_count,
    loss_config,
    make_train_step,
    read_run_config,
    run_name,
)


# -- losses ------------------------------------------------------------------------------------
def test_cca_loss_known_values_and_collapse_penalty():
    # Two standardised, uncorrelated columns over M = 4 users: C = C_A = C_B = I.
    z = tf.constant([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert float(cca_ssg_loss(z, z, lambd=0.5)) == pytest.approx(-2.0, abs=1e-5)
    # Collapse: both columns identical -> C_A has off-diagonal 1, each view pays 2.
    collapsed = tf.constant([[1.0, 1.0], [1.0, 1.0], [-1.0, -1.0], [-1.0, -1.0]])
    assert float(cca_ssg_loss(collapsed, collapsed, lambd=0.5)) == pytest.approx(
        -2.0 + 0.5 * 4.0, abs=1e-5
    )
    # Unrelated views: the invariance term vanishes (trace C = 0) but decorrelation does not.
    other = tf.constant([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    assert float(cca_ssg_loss(z, other, lambd=0.5)) == pytest.approx(0.0, abs=1e-5)


def test_scaled_cosine_error_known_values():
    x = tf.constant([[1.0, 0.0], [0.0, 2.0]])
    assert float(scaled_cosine_error(x, x, gamma=2.0)) == pytest.approx(0.0, abs=1e-6)
    orthogonal = tf.constant([[0.0, 3.0], [5.0, 0.0]])
    assert float(scaled_cosine_error(orthogonal, x, gamma=3.0)) == pytest.approx(1.0, abs=1e-6)
    assert float(scaled_cosine_error(-x, x, gamma=2.0)) == pytest.approx(4.0, abs=1e-5)
    half = tf.constant([[1.0, 1.0]])  # cos 45 degrees
    expected = (1 - np.sqrt(0.5)) ** 2
    assert float(scaled_cosine_error(half, tf.constant([[1.0, 0.0]]), 2.0)) == pytest.approx(
        expected, rel=1e-5
    )


@pytest.mark.parametrize(
    ("make", "raw"),
    [
        (twitch_like, [[0.0, 9.0, 1.0, 0.0], [1459.0, 9528.0, 0.0, 1.0], [-3.0, 0.5, 1.0, 1.0]]),
        (tagged, [[-5.0, 1.0], [250.0, 0.0], [35.0, 1.0], [99.5, 0.0]]),
    ],
)
def test_profile_transform_matches_the_contract(make, raw):
    """Clip, log1p and standardisation in TensorFlow equal ``Contract.transform_profile``."""
    c = make()
    raw = np.array(raw, np.float32)
    got = transform_profile_tf(tf.constant(raw), transform_constants(c.transform_arrays()))
    np.testing.assert_allclose(got.numpy(), c.transform_profile(raw), rtol=1e-6)


# -- the model on real data ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(engb_store):
    settings = engb_store.model_copy(update={"training": SMALL})
    return TrainingContext.load(settings, "twitch/ENGB")


def first_batch(ctx) -> dict[str, tf.Tensor]:
    """The first training batch of the SMALL settings (seed 0), as tensors."""
    sampler = PairSampler(ctx.data, ctx.table, SMALL.fanout, SMALL.batch_size, seed=0)
    return {k: tf.constant(v) for k, v in next(sampler.epoch()).items()}


def test_pairs_are_both_directions_in_one_seeded_permutation(ctx):
    """The sampler keeps each friendship once, as narrow row indices, yet yields the stream of
    both directions ``(a, b) + (b, a)`` in ``permutation(2E)`` order, as when it held them."""
    sampler = PairSampler(ctx.data, ctx.table, SMALL.fanout, SMALL.batch_size, seed=0)
    src, dst = ctx.data.edges("train")
    a, b = ctx.table.rows_of(src), ctx.table.rows_of(dst)
    q_rows, c_rows = np.concatenate([a, b]), np.concatenate([b, a])
    assert sampler.a.dtype == np.int32 and sampler.num_pairs == len(q_rows)
    first = np.random.default_rng(0).permutation(len(q_rows))[: SMALL.batch_size]
    batch = next(sampler.epoch())
    np.testing.assert_array_equal(batch["q/self_user_id"], ctx.table.user_ids[q_rows[first]])
    np.testing.assert_array_equal(batch["c_id"], c_rows[first])
    counts = np.bincount(c_rows, minlength=len(ctx.table))
    np.testing.assert_array_equal(sampler.sampling_prob, (counts / counts.sum()).astype(np.float32))
    # The table keeps vocabulary ids narrow; the tower still gets the signature's int64.
    assert ctx.table.sparse_ids.dtype == np.int32
    assert batch["q/self_sparse_ids"].dtype == batch["c/friend_nbr_ids"].dtype == np.int64


def test_zero_auxiliary_weights_are_exactly_the_baseline(ctx):
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)
    baseline = SSMTLModel(tower, LossConfig.for_objective("baseline"), seed=1)
    zeroed = SSMTLModel(
        tower, LossConfig.for_objective("ssmtl", cca_weight=0.0, mae_weight=0.0), seed=1
    )
    full = SSMTLModel(tower, LossConfig.for_objective("ssmtl"), seed=1)
    base_loss = float(baseline.compute_loss(batch))
    assert float(zeroed.compute_loss(batch)) == base_loss
    assert float(full.compute_loss(batch)) != base_loss
    assert float(full.loss_trackers["retrieval"].result()) == pytest.approx(base_loss, rel=1e-6)


def test_log_q_strength_scales_the_sampling_correction(ctx):
    """Strength 1 is the full log-Q correction (the default, the same run folder), 0 is none
    (log_q off), and a strength between them is a third loss and a new run."""
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)

    def loss(**overrides: object) -> float:
        return float(SSMTLModel(tower, LossConfig(**overrides), seed=1).compute_loss(batch))

    full, none, half = loss(), loss(log_q=False), loss(log_q_strength=0.5)
    assert loss(log_q_strength=1.0) == full and loss(log_q_strength=0.0) == none
    assert len({full, none, half}) == 3
    assert loss_config(SMALL.model_copy(update={"log_q_strength": 0.5})).log_q_strength == 0.5
    assert run_name(SMALL) == run_name(SMALL.model_copy(update={"log_q_strength": 1.0}))
    assert run_name(SMALL) != run_name(SMALL.model_copy(update={"log_q_strength": 0.5}))


def test_view_settings_name_a_new_run_only_where_cca_ssg_reads_them():
    """Feature masking and friend dropping act through CCA-SSG's views alone: without CCA-SSG a
    change of them is the same model (``tune`` skips it), with it a new one."""
    for objective in ("baseline", "mae"):
        cfg = SMALL.model_copy(update={"objective": objective})
        for change in ({"feature_drop": 0.2}, {"neighbour_drop": 0.5}):
            assert run_name(cfg) == run_name(cfg.model_copy(update=change))
    for objective in ("ssmtl", "cca"):
        cfg = SMALL.model_copy(update={"objective": objective})
        for change in ({"feature_drop": 0.2}, {"neighbour_drop": 0.5}):
            assert run_name(cfg) != run_name(cfg.model_copy(update=change))


def test_cached_runs_keep_their_names_across_default_changes():
    """A run folder is a trained model's identity: the defaults' single-task model keeps the name
    its runs were cached under while CCA-SSG's views masked features by default, and so does
    SSMTL asked for with that masking (a default that moved must not rename or reuse a run)."""
    assert run_name(TrainingSettings(objective="baseline", seed=0)) == "baseline-seed0-95e71ef2"
    ssmtl = TrainingSettings(objective="ssmtl", seed=0)
    masked = ssmtl.model_copy(update={"feature_drop": 0.2})
    assert run_name(masked) == "ssmtl-seed0-680c3fea"
    assert run_name(ssmtl) != run_name(masked)


def test_uniform_negatives_join_every_querys_softmax(ctx):
    """Mixed negatives: the same pairs (and query/candidate inputs) plus users drawn uniformly;
    each column's sampling weight is the mixture's expected count; with the correction off the
    extra columns can only add to each softmax's denominator, so the loss rises."""
    n_extra, size = 16, SMALL.batch_size
    plain = PairSampler(ctx.data, ctx.table, SMALL.fanout, size, seed=0)
    mixed = PairSampler(ctx.data, ctx.table, SMALL.fanout, size, seed=0, uniform_negatives=n_extra)
    a, b = next(plain.epoch()), next(mixed.epoch())
    for key, value in a.items():
        if key != "c_sampling_prob":
            np.testing.assert_array_equal(b[key], value, err_msg=key)
    assert b["n_id"].shape == (n_extra,) and b["n/friend_mask"].shape == (n_extra, SMALL.fanout)
    users = len(ctx.table)
    expected = size * plain.sampling_prob + n_extra / users
    np.testing.assert_allclose(b["c_sampling_prob"], expected[a["c_id"]], rtol=1e-6)
    np.testing.assert_allclose(b["n_sampling_prob"], expected[b["n_id"]], rtol=1e-6)

    tower = ctx.build_tower(SMALL)
    model = SSMTLModel(tower, LossConfig(log_q=False), seed=1)
    without = float(model.compute_loss({k: tf.constant(v) for k, v in a.items()}))
    with tf.GradientTape() as tape:
        loss = model.compute_loss({k: tf.constant(v) for k, v in b.items()})
    assert float(loss) > without
    corrected = SSMTLModel(tower, LossConfig(), seed=1)
    assert np.isfinite(float(corrected.compute_loss({k: tf.constant(v) for k, v in b.items()})))
    grads = tape.gradient(loss, tower.trainable_variables)
    assert any(g is not None and float(tf.reduce_sum(tf.abs(tf.convert_to_tensor(g)))) > 0
               for g in grads)  # fmt: skip
    assert run_name(SMALL) == run_name(SMALL.model_copy(update={"uniform_negatives": 0}))
    assert run_name(SMALL) != run_name(SMALL.model_copy(update={"uniform_negatives": 64}))


def test_aux_users_uniform_moves_the_auxiliary_losses_off_the_pairs(ctx):
    """``aux_users: uniform``: the sampler adds a batch of uniformly drawn users (only when an
    auxiliary loss is on), the retrieval part is unchanged, the auxiliary losses are computed on
    those users (no pair to guard) and train the tower through them."""
    uniform = SMALL.model_copy(update={"objective": "ssmtl", "aux_users": "uniform"})
    count = aux_user_count(uniform, loss_config(uniform))
    assert count == -(-SMALL.batch_size // 2)  # the larger fraction an auxiliary loss takes
    mae_only = uniform.model_copy(update={"mae_fraction": 0.75, "cca_weight": 0.0})
    assert aux_user_count(mae_only, loss_config(mae_only)) == -(-SMALL.batch_size * 3 // 4)
    baseline = uniform.model_copy(update={"objective": "baseline"})
    assert aux_user_count(baseline, loss_config(baseline)) == 0  # no loss to feed: no draw
    assert aux_user_count(SMALL, loss_config(SMALL.model_copy(update={"objective": "ssmtl"}))) == 0

    plain = PairSampler(ctx.data, ctx.table, SMALL.fanout, SMALL.batch_size, 0)
    drawn = PairSampler(ctx.data, ctx.table, SMALL.fanout, SMALL.batch_size, 0, aux_users=count)
    a, b = next(plain.epoch()), next(drawn.epoch())
    assert set(b) - set(a) == {f"u/{k[2:]}" for k in a if k.startswith("q/")}
    for key, value in a.items():
        np.testing.assert_array_equal(b[key], value, err_msg=key)
    assert b["u/friend_mask"].shape == (count, SMALL.fanout)

    tower = ctx.build_tower(SMALL)
    tensors = {k: tf.constant(v) for k, v in b.items()}
    only_mae = SSMTLModel(tower, LossConfig(mae_weight=1.0), seed=1)
    on_pairs = float(only_mae.compute_loss({k: v for k, v in tensors.items() if k[:2] != "u/"}))
    with tf.GradientTape() as tape:
        on_users = only_mae.compute_loss(tensors)
    assert float(on_users) != pytest.approx(on_pairs)  # other users, another reconstruction
    retrieval = SSMTLModel(tower, LossConfig(), seed=1)  # no auxiliary loss: u/ is ignored
    assert float(retrieval.compute_loss(tensors)) == pytest.approx(
        float(retrieval.compute_loss({k: v for k, v in tensors.items() if k[:2] != "u/"}))
    )
    grads = tape.gradient(on_users, only_mae.decoder.trainable_variables)
    assert all(g is not None for g in grads)

    # Each loss takes its fraction of the *pairs'* batch from the drawn users: rows past them
    # are unused (a fraction of all the rows given would take some of the other users appended
    # here too; inference mode: no random draws).
    exact = float(only_mae.compute_loss(tensors))
    extended = {
        k: tf.concat([v, tensors[f"q/{k[2:]}"]], 0) if k[:2] == "u/" else v
        for k, v in tensors.items()
    }
    assert float(only_mae.compute_loss(extended)) == pytest.approx(exact, rel=1e-6)
    cca = SSMTLModel(tower, LossConfig(cca_weight=1.0), seed=1)
    assert np.isfinite(float(cca.compute_loss(tensors)))
    pairs = uniform.model_copy(update={"aux_users": "pairs"})
    assert run_name(pairs) == run_name(pairs.model_copy(update={"aux_users": "pairs"}))
    assert run_name(pairs) != run_name(uniform)
    assert run_name(baseline) == run_name(baseline.model_copy(update={"aux_users": "pairs"}))


def test_cca_projector_is_trained_through_the_cca_loss_only(ctx):
    """With ``cca_projector_dim`` the CCA loss scores the projection: the projector gets gradients
    from it, the retrieval loss is untouched and the run keeps the settings' defaults' folder."""
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)
    plain = SSMTLModel(tower, LossConfig.for_objective("cca"), seed=1)
    projected = SSMTLModel(tower, LossConfig.for_objective("cca", cca_projector_dim=16), seed=1)
    assert not hasattr(plain, "cca_projector")
    with tf.GradientTape() as tape:
        loss = projected.compute_loss(batch)
    plain.compute_loss(batch)
    assert float(projected.loss_trackers["cca"].result()) != float(
        plain.loss_trackers["cca"].result()
    )
    assert float(projected.loss_trackers["retrieval"].result()) == pytest.approx(
        float(plain.loss_trackers["retrieval"].result()), rel=1e-6
    )
    grads = tape.gradient(loss, projected.cca_projector.trainable_variables)
    assert grads and all(float(tf.reduce_sum(tf.abs(g))) > 0 for g in grads)
    cfg = SMALL.model_copy(update={"objective": "cca"})
    assert run_name(cfg) != run_name(cfg.model_copy(update={"cca_projector_dim": 16}))
    assert run_name(cfg) == run_name(cfg.model_copy(update={"cca_projector_dim": 0}))


def unaugmented_optimum(
    tower: UserTower,
    query: dict[str, tf.Tensor],
    candidate: dict[str, tf.Tensor],
    friends: tf.Tensor,
    lambd: float,
) -> float:
    """CCA-SSG of the anchors' unaugmented embedding (no id dropout) with itself: the loss when
    both views are that embedding, its optimum for these users."""
    view = tower.embed(
        query,
        exclude=candidate,
        friend_states=friends,
        training=True,
        id_vector_keep=tf.ones([tf.shape(friends)[0], 1]),
    )
    return float(cca_ssg_loss(view, view, lambd))


def test_cca_id_drop_sets_the_views_user_id_augmentation(ctx):
    """``cca_id_drop`` replaces the tower's id dropout inside the CCA views: at 0 (and no other
    augmentation) both views are the same embedding, so the invariance term is at its optimum;
    with the tower's dropout (None) the views disagree on the user-id vector (a worse optimum)."""
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)
    query, candidate = split_inputs(batch, "q/"), split_inputs(batch, "c/")
    friends = tower.friend_states(query, training=True)
    rates = {"feature_drop": 0.0, "neighbour_drop": 0.0, "cca_fraction": 1.0}
    same = SSMTLModel(tower, LossConfig.for_objective("cca", cca_id_drop=0.0, **rates), seed=1)
    expected = unaugmented_optimum(tower, query, candidate, friends, same.loss_config.cca_lambda)
    got = float(same.cca_loss(query, candidate, friends, training=True))
    assert got == pytest.approx(expected, rel=1e-5)
    dropped = SSMTLModel(tower, LossConfig.for_objective("cca", cca_id_drop=None, **rates), seed=1)
    assert float(dropped.cca_loss(query, candidate, friends, training=True)) > expected + 1e-3
    # A run folder names the setting only where it changes the model: not for the baseline.
    for objective, differs in (("cca", True), ("ssmtl", True), ("baseline", False), ("mae", False)):
        names = {
            run_name(SMALL.model_copy(update={"objective": objective, "cca_id_drop": rate}))
            for rate in (None, 0.0)
        }
        assert (len(names) == 2) == differs, objective


def test_view_noise_makes_the_views_differ_by_positive_mean_1_factors(ctx):
    """``view_noise``: with no drop, two noisy views of a user differ (the invariance term is
    above its optimum, where the views are equal) by mean-1 positive factors: nothing is
    removed, so the term cannot be met by ignoring an input. It names a new run only where
    CCA-SSG reads it."""
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)
    query, candidate = split_inputs(batch, "q/"), split_inputs(batch, "c/")
    friends = tower.friend_states(query, training=True)
    rates = {"feature_drop": 0.0, "neighbour_drop": 0.0, "cca_fraction": 1.0, "cca_id_drop": 0.0}
    plain = SSMTLModel(tower, LossConfig.for_objective("cca", **rates), seed=1)
    noisy = SSMTLModel(tower, LossConfig.for_objective("cca", view_noise=0.3, **rates), seed=1)
    optimum = float(plain.cca_loss(query, candidate, friends, training=True))
    assert float(noisy.cca_loss(query, candidate, friends, training=True)) > optimum + 1e-3
    factors = noisy._noise([200_000]).numpy()
    assert factors.min() > 0 and abs(factors.mean() - 1.0) < 0.01
    assert 0.25 < np.log(factors).std() < 0.35
    for objective, differs in (("cca", True), ("ssmtl", True), ("baseline", False), ("mae", False)):
        cfg = SMALL.model_copy(update={"objective": objective})
        assert (run_name(cfg) != run_name(cfg.model_copy(update={"view_noise": 0.3}))) == differs
        assert run_name(cfg) == run_name(cfg.model_copy(update={"view_noise": 0.0}))


def test_clean_cca_target_is_the_unaugmented_embedding_under_a_stop_gradient(ctx):
    """``cca_target: clean``: with no augmentation the augmented view is the target, so the
    loss is CCA-SSG of the unaugmented embedding with itself; the target takes no gradient, so
    the gradient is exactly half of the symmetric loss's (which, at equal views, gets the same
    gradient through either side). With augmentation the loss leaves that optimum. It names a
    new run only where CCA-SSG reads it."""
    tower = ctx.build_tower(SMALL)
    batch = first_batch(ctx)
    query, candidate = split_inputs(batch, "q/"), split_inputs(batch, "c/")
    off = {"feature_drop": 0.0, "neighbour_drop": 0.0, "cca_fraction": 1.0, "cca_id_drop": 0.0}
    models = {
        target: SSMTLModel(tower, LossConfig.for_objective("cca", cca_target=target, **off))
        for target in ("views", "clean")
    }
    friends = tower.friend_states(query)  # one draw of the friends for every pass
    optimum = unaugmented_optimum(
        tower, query, candidate, friends, models["clean"].loss_config.cca_lambda
    )
    grads = {}
    for target, model in models.items():
        with tf.GradientTape() as tape:
            loss = model.cca_loss(query, candidate, friends, training=True)
        assert float(loss) == pytest.approx(optimum, rel=1e-5), target
        variables = tower.trainable_variables
        grads[target] = [
            tf.convert_to_tensor(g) for g in tape.gradient(loss, variables) if g is not None
        ]
    assert grads["clean"], "the augmented side must take a gradient"
    scale = max(float(tf.reduce_max(tf.abs(g))) for g in grads["views"])
    assert scale > 1e-6
    for clean, views in zip(grads["clean"], grads["views"], strict=True):
        np.testing.assert_allclose(clean.numpy(), 0.5 * views.numpy(), atol=1e-4 * scale)
    dropped = SSMTLModel(
        tower, LossConfig.for_objective("cca", cca_target="clean", **{**off, "neighbour_drop": 0.5})
    )
    assert float(dropped.cca_loss(query, candidate, friends, training=True)) > optimum + 1e-3
    for objective, differs in (("cca", True), ("ssmtl", True), ("baseline", False), ("mae", False)):
        cfg = SMALL.model_copy(update={"objective": objective})
        clean = cfg.model_copy(update={"cca_target": "clean"})
        assert (run_name(cfg) != run_name(clean)) == differs
    assert loss_config(SMALL.model_copy(update={"cca_target": "clean"})).cca_target == "clean"


def test_runs_from_before_an_added_setting_read_back_as_trained(tmp_path):
    """A run folder written before ``cca_id_drop`` existed was trained with the tower's dropout in
    the views (None), not today's default, and keeps its name."""
    cfg = SMALL.model_copy(update={"objective": "ssmtl", "cca_id_drop": None})
    old = json.loads(cfg.model_dump_json())
    del old["cca_id_drop"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    read = read_run_config(tmp_path)
    assert read.cca_id_drop is None and run_name(read) == run_name(cfg)
    (tmp_path / "config.json").write_text(SMALL.model_dump_json())
    assert read_run_config(tmp_path).cca_id_drop == SMALL.cca_id_drop == 0.0


def test_training_steps_lower_the_loss(ctx):
    cfg = SMALL.model_copy(update={"objective": "ssmtl"})
    tower = ctx.build_tower(cfg)
    model = SSMTLModel(tower, loss_config(cfg), seed=0)
    optimizer = tf.keras.optimizers.Adam(5e-3)
    sampler = PairSampler(ctx.data, ctx.table, cfg.fanout, 128, seed=0)
    fixed = {k: tf.constant(v) for k, v in next(sampler.epoch()).items()}

    def retrieval_loss() -> float:
        model.loss_trackers["retrieval"].reset_state()
        model.compute_loss(fixed)
        return float(model.loss_trackers["retrieval"].result())

    before = retrieval_loss()
    step = make_train_step(model, optimizer)
    for _, batch in zip(range(40), sampler.epoch(), strict=False):
        step({k: tf.constant(v) for k, v in batch.items()})
    assert retrieval_loss() < before - 0.2


def _loss_terms_and_gradients(model: SSMTLModel, batch, seed: int):
    """The loss, its terms and the dense gradients of every trainable variable, in training
    mode with the random draws of ``seed``."""
    for tracker in model.loss_trackers.values():
        tracker.reset_state()
    tf.keras.utils.set_random_seed(seed)
    with tf.GradientTape() as tape:
        loss = model.compute_loss(batch, training=True)
    variables = model.trainable_variables
    grads = tape.gradient(loss, variables)
    terms = {k: float(m.result()) for k, m in model.loss_trackers.items()}
    dense = {
        v.name: np.zeros(v.shape) if g is None else tf.convert_to_tensor(g).numpy()
        for g, v in zip(grads, variables, strict=True)
    }
    return float(loss), terms, dense


def test_shared_states_keep_the_loss_and_gradients(ctx):
    """The fast training path (each distinct friend's layer 0 once per batch, the anchors'
    encodings and guarded neighbourhoods once for every pass, lookups of the present ids only
    with dense gradients) gives the per-occurrence reference's loss, loss terms and gradients:
    same batch, same weights, same random draws (the friends' and anchors' id dropout, the
    CCA-SSG views' masks and, with ``cca_id_drop`` None, their id dropout), both heads on."""
    cfg = SMALL.model_copy(update={"objective": "ssmtl", "cca_id_drop": None})
    tower = ctx.build_tower(cfg)
    batch = first_batch(ctx)
    models = {
        share: SSMTLModel(tower, loss_config(cfg), seed=1, share_states=share)
        for share in (False, True)
    }
    for model in models.values():
        model.compute_loss(batch)  # builds the heads (the same draws of ``rng`` in both)
    models[True].decoder.set_weights(models[False].decoder.get_weights())
    ref_loss, ref_terms, ref_grads = _loss_terms_and_gradients(models[False], batch, seed=5)
    loss, terms, grads = _loss_terms_and_gradients(models[True], batch, seed=5)
    assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    assert terms == pytest.approx(ref_terms, rel=1e-5, abs=1e-6)
    assert list(grads) == list(ref_grads)
    for name, want in ref_grads.items():
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(grads[name] - want).max() <= 1e-5 * scale, name
    assert any(np.abs(g).max() > 0 for g in ref_grads.values())
    # The random draws matter (so the two paths drew the same ones): another seed differs.
    other, _, _ = _loss_terms_and_gradients(models[False], batch, seed=6)
    assert abs(other - ref_loss) > 1e-4


@pytest.mark.parametrize("dense_gradient", [True, False])
def test_pooled_lookup_equals_the_gathered_sum(monkeypatch, dense_gradient):
    """``pooled_lookup`` (present ids only, segment sum) equals gathering every entry and
    summing, and so do the table's gradients, dense (ScatterNd) or sparse (IndexedSlices)."""
    import training.tower as tower_module

    if not dense_gradient:
        monkeypatch.setattr(tower_module, "DENSE_GRADIENT_MAX", 0)
    r = np.random.default_rng(0)
    table = tf.Variable(r.normal(size=(50, 4)).astype(np.float32))
    ids = r.integers(0, 50, (3, 5, 7))
    weights = r.random((3, 5, 7)).astype(np.float32)
    weights[r.random((3, 5, 7)) < 0.5] = 0.0  # padding and masked entries
    weights[2, 4] = 0.0  # a last row with no entry at all
    ids, weights = tf.constant(ids), tf.constant(weights)
    upstream = tf.constant(r.normal(size=(3, 5, 4)).astype(np.float32))
    results = []
    for pooled in (False, True):
        with tf.GradientTape() as tape:
            if pooled:
                out = tower_module.pooled_lookup(table, ids, weights)
            else:
                out = tf.reduce_sum(tf.gather(table, ids) * weights[..., None], axis=-2)
            loss = tf.reduce_sum(out * upstream)
        grad = tape.gradient(loss, table)
        assert isinstance(grad, tf.IndexedSlices) != (pooled and dense_gradient)
        results.append((out.numpy(), tf.convert_to_tensor(grad).numpy()))
    (want, want_grad), (got, got_grad) = results
    assert got.shape == want.shape == (3, 5, 4)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-6, atol=1e-6)


def test_positive_never_among_sampled_neighbours(ctx):
    sampler = PairSampler(ctx.data, ctx.table, SMALL.fanout, 256, seed=0)
    batch = next(sampler.epoch())
    for side, other in (("q/", "c/"), ("c/", "q/")):
        friends = batch[f"{side}friend_user_id"]
        positives = batch[f"{other}self_user_id"]
        mask = batch[f"{side}friend_mask"] > 0
        assert not np.any((friends == positives[:, None]) & mask)
        assert mask.sum() > 256  # neighbours are sampled at all


def test_leakage_guard_equals_removing_the_friendship(tmp_path):
    """Embedding u with its training positive v excluded == embedding u in the graph without
    the friendship (u, v): the exclusion removes exactly v's contribution."""
    edges = [(0, 1), (0, 2), (1, 2), (2, 3), (1, 4)]
    features = {0: [1, 2], 1: [2, 3], 2: [1, 5], 3: [4], 4: [5, 6]}
    settings, data = prepare_all_train(tmp_path, edges, features, num_users=5)
    spec = InputSpec.from_settings(settings, data.meta.vocab_size, fanout=4)

    def table_for(graph):
        rows = {r["user_id"]: r for r in profile_table(graph, settings).to_pylist()}
        for r in compute_graph_features(graph, 2**40, settings, False).to_table(0).to_pylist():
            rows[r["user_id"]].update(r)
        return FeatureTable.from_rows([rows[u] for u in sorted(rows)], spec, data.contract)

    full = table_for(data)
    keep = ~((data.src == 0) & (data.dst == 2))
    reduced_data = type(data)(
        **{
            **data.__dict__,
            "src": data.src[keep],
            "dst": data.dst[keep],
            "created_ts": data.created_ts[keep],
            "split": data.split[keep],
        }
    )
    reduced = table_for(reduced_data)
    profile = data.contract.transform_profile(full.profile)
    tower = UserTower(
        spec,
        profile.mean(0),
        profile.var(0),
        full.user_ids,
        16,
        8,
        8,
        32,
        transform=data.contract.transform_arrays(),
    )

    u, v = np.array([0]), np.array([2])
    guarded = tower_inputs(full, u, sample_neighbours(full, u, 4, None, exclude=v))
    other = tower_inputs(full, v, sample_neighbours(full, v, 4, None, exclude=u))
    with_guard = tower.embed(guarded, exclude=other).numpy()
    without_edge = tower(tower_inputs(reduced, u, sample_neighbours(reduced, u, 4, None))).numpy()
    np.testing.assert_allclose(with_guard, without_edge, atol=1e-5)
    unguarded = tower(tower_inputs(full, u, sample_neighbours(full, u, 4, None))).numpy()
    assert np.abs(unguarded - without_edge).max() > 1e-3  # the guard is not a no-op


def test_layer_by_layer_inference_is_the_tower_on_each_users_inputs(ctx):
    """``embed_all`` computes every user's layer-1 state once and layer 2 over the friends'
    states: the same index vectors as the tower on each user's own inputs, for every user."""
    tower = ctx.build_tower(SMALL)
    tower.popularity_weight.assign(0.3)
    rows = np.arange(len(ctx.table))
    inputs = tower_inputs(ctx.table, rows, sample_neighbours(ctx.table, rows, SMALL.fanout, None))
    direct = tower(inputs, training=False).numpy()
    layered = embed_all(tower, ctx.table, SMALL.fanout, batch=1000)  # several chunks
    assert layered.shape == direct.shape == (len(ctx.table), tower.output_dim)
    np.testing.assert_allclose(layered, direct, atol=1e-5)
    assert np.abs(direct[:, -1]).max() > 0.1  # the popularity term is in both


def test_export_round_trip_and_training_serving_parity(ctx, engb_store, tmp_path):
    """The served embedding (Feast online reads -> SavedModel) equals the training-code embedding
    (offline point-in-time table -> tower) for the same users."""
    tower = ctx.build_tower(SMALL)
    users = np.array([0, 1, 17, 300, 7125])
    rows = ctx.table.rows_of(users)
    inputs = tower_inputs(ctx.table, rows, sample_neighbours(ctx.table, rows, SMALL.fanout, None))
    trained = embed_all(tower, ctx.table, SMALL.fanout)[rows]
    path = export_tower(tower, tmp_path / "models", "user_tower", inputs, {"test": True})
    assert path.name == "1"
    served = load_signature(path)(**{k: tf.constant(v) for k, v in inputs.items()})["embedding"]
    assert np.abs(served.numpy() - trained).max() <= 1e-5

    store = open_store(engb_store, "twitch/ENGB")
    online, known = fetch_online_inputs(store, users, tower.spec, ctx.contract)
    assert known.all()
    served_online = load_signature(path)(**{k: tf.constant(v) for k, v in online.items()})
    assert np.abs(served_online["embedding"].numpy() - trained).max() <= 1e-5

    card = json.loads((path / MODEL_CARD).read_text())
    assert card["version"] == 1 and card["signature"] == "serving_default"
    assert set(card["inputs"]) == set(inputs)
    width = len(ctx.contract.profile_scalars)
    assert card["inputs"]["self_profile"]["shape"] == [None, width] == [None, 4]
    record = next(iter(tf.data.TFRecordDataset(str(path / "assets.extra" / WARMUP_FILE))))
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    assert set(log.predict_log.request.inputs) == set(inputs)
    assert export_tower(tower, tmp_path / "models", "user_tower", inputs, {}).name == "2"


def test_unknown_users_take_the_cold_start_path(ctx, engb_store):
    tower = ctx.build_tower(SMALL)
    inputs, known = fetch_online_inputs(
        open_store(engb_store, "twitch/ENGB"), [5, 10**12], tower.spec, ctx.contract
    )
    assert known.tolist() == [True, False]
    assert inputs["friend_mask"][1].sum() == 0 and (inputs["self_sparse_ids"][1] < 0).all()
    emb = tower(inputs).numpy()
    assert np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)


def test_train_resumes_and_evaluate_writes_the_report(ctx, tmp_path):
    from training.evaluation import EvalSet
    from training.runs import evaluate_runs, latest_run
    from training.train import best_validation_recalls, train, validation_recalls

    cfg = SMALL.model_copy(update={"epochs": 1, "max_steps_per_epoch": 5, "objective": "baseline"})
    first, _ = train(ctx, cfg, show_progress=False)
    assert first.epochs_run == 1 and len(first.history) == 1
    more, tower = train(ctx, cfg.model_copy(update={"epochs": 2}), show_progress=False)
    assert more.model_dir == first.model_dir  # the same run, continued
    assert more.epochs_run == 2 and more.history[0] == first.history[0]
    # The best epoch's per-user figures, saved beside its weights, are the restored tower's.
    valset = EvalSet.from_prepared(ctx.data, "val", max_queries=cfg.val_max_users, seed=cfg.seed)
    saved = best_validation_recalls(more, valset)
    assert saved is not None and saved.mean() == pytest.approx(more.best_val_recall50)
    np.testing.assert_allclose(saved, validation_recalls(tower, ctx, valset), atol=1e-12)
    assert best_validation_recalls(replace(more, best_epoch=more.best_epoch + 1), valset) is None
    others = EvalSet.from_prepared(ctx.data, "val", max_queries=len(saved) - 1, seed=cfg.seed)
    assert best_validation_recalls(more, others) is None  # another query set's figures
    ssmtl, _ = train(ctx, cfg.model_copy(update={"objective": "ssmtl"}), show_progress=False)
    assert ssmtl.history[0]["cca"] != 0.0 and ssmtl.history[0]["mae"] > 0.0

    runs = {"baseline": latest_run(ctx, "baseline"), "ssmtl": latest_run(ctx, "ssmtl")}
    report = evaluate_runs(ctx, runs, tmp_path / "report", split="test", n_boot=200)
    assert set(report["results"]) == {"baseline", "ssmtl", "adamic_adar", "random"}
    for slices in report["results"].values():
        assert 0.0 <= slices["all"]["recall@50"] <= slices["all"]["recall@100"] <= 1.0
    assert {c["a"] for c in report["comparisons"]} == {"ssmtl", "adamic_adar"}
    assert (tmp_path / "report" / "recall_at_k.png").read_bytes()[:4] == b"\x89PNG"
    assert "adamic_adar" in (tmp_path / "report" / "metrics.md").read_text()


@pytest.fixture(scope="module")
def quality_entry(engb_store, tmp_path_factory):
    """One ``bench quality`` per-graph entry on 3-step models, with ``--tune-minutes`` (a budget
    that stops `tune` after its first trial) and ``--blend-without-reads``: its settings, the
    entry and the report folder. Two tests read it; each run costs minutes on 2 cores."""
    from bench.quality import evaluate_dataset

    out = tmp_path_factory.mktemp("quality")
    quick = SMALL.model_copy(update={"epochs": 1, "max_steps_per_epoch": 3})
    settings = engb_store.model_copy(update={"training": quick, "workdir": out / "w"})
    entry = evaluate_dataset(
        settings, "twitch/ENGB", [0], ["baseline"], 1, out, tune_budget_s=1.0,
        blend_without_reads=True,
    )  # fmt: skip
    return settings, entry, out


def test_bench_quality_reports_the_blend_its_ceiling_and_the_degree_buckets(quality_entry):
    """``bench quality``'s per-graph entry on a 3-step model: the blend fitted on validation and
    judged on test, never above the recall of the two lists it merges; with
    ``--blend-without-reads`` the blend without vector reads beside it, fitted on the bound."""
    _, entry, out = quality_entry
    results = entry["results"]
    blends = {
        "blend (baseline)": "blend_gain",
        "blend without reads (baseline)": "blend_gain_without_reads",
    }
    assert {"baseline", "adamic_adar", *blends} <= set(results)
    for slice_name in ("all", "cold_start"):
        ceiling = entry["blend_ceiling"]["baseline"][slice_name]
        sources = [
            results[m][slice_name]["recall@100"] for m in ("baseline", "fof (service, cap 256)")
        ]
        assert max(sources) <= ceiling + 1e-12
        best = max(results[m][slice_name]["recall@50"] for m in ("baseline", "adamic_adar"))
        for name, key in blends.items():
            assert results[name][slice_name]["recall@100"] <= ceiling + 1e-12
            assert entry[key]["baseline"][slice_name] == pytest.approx(
                results[name][slice_name]["recall@50"] / best - 1
            )
    for key, reads in (("blend_rankers", True), ("blend_rankers_without_reads", False)):
        chosen = entry[key]["baseline"][0]
        assert set(chosen["by_bucket"]) == set(entry["by_degree"]["baseline"])
        assert chosen["chosen"] in ("blend", "embedding", "fof")
        assert chosen["val_recall50"] == max(chosen["val_recall50_by_source"].values())
        assert 0.0 < chosen["val_recall50"] <= 1.0
        # A source's order reads no vectors; a fitted ranker reads them as it was asked.
        assert chosen["ranker"]["reads_vectors"] == (reads and chosen["chosen"] == "blend")
    assert (out / "twitch_engb" / "metrics.md").exists()


def test_tune_gate_replays_the_recorded_trials_without_training(quality_entry, tmp_path):
    """`bench tune-gate` on a `bench quality --tune-minutes` entry: the trial restored from its
    cached run, scored per validation user, gives the validation figure `tune` recorded; no run
    is trained; the rule's choice and its test figures come out."""
    from bench.tune_gate import replay
    from bench.tune_gate import run as run_gate
    from friendrec.errors import FriendrecError
    from training.runs import runs_dir

    settings, entry, _ = quality_entry
    entry = copy.deepcopy(entry)  # the fixture's is shared; a trial is added below
    ctx = TrainingContext.load(settings, "twitch/ENGB")
    runs = sorted(p.name for p in runs_dir(ctx).iterdir())
    replayed = replay(settings, entry, 1)
    assert sorted(p.name for p in runs_dir(ctx).iterdir()) == runs  # nothing trained
    assert [t["run"] for t in replayed["trials"]] == [entry["tuned"]["best_run"]]
    assert replayed["trials"][0]["val_recall50"] == pytest.approx(entry["tuned"]["val_recall50"])
    assert replayed["gated"] == replayed["top"] == {"objective": "ssmtl"}
    test = replayed["test_vs_single_task"]["gated"]["all"]
    tuned = next(c for c in entry["comparisons"] if c["a"] == "tuned" and c["slice"] == "all"
                 and c["metric"] == "recall@50")  # fmt: skip
    base = entry["results"]["baseline"]["all"]["recall@50"]
    assert test == pytest.approx({k: tuned[k] / base for k in ("diff", "lo", "hi")})

    # A trial whose run is not there is an error, not a silent retraining.
    untrained = {"objective": "ssmtl", "temperature": 0.5}
    entry["tuned"]["trials"].append({"settings": untrained})
    with pytest.raises(FriendrecError, match=r"not in .*FRIENDREC_WORKDIR"):
        replay(settings, entry, 1)
    assert sorted(p.name for p in runs_dir(ctx).iterdir()) == runs
    # Sources that cannot be replayed say why.
    (tmp_path / "untuned.json").write_text(json.dumps({"max_epochs": 1, "datasets": [{}]}))
    (tmp_path / "broken.json").write_text("{")
    for name, why in [("missing.json", "no such"), ("broken.json", "not a `bench quality` JSON"),
                      ("untuned.json", "--tune-minutes")]:  # fmt: skip
        with pytest.raises(FriendrecError, match=why):
            run_gate(settings, [tmp_path / name], tmp_path / "gate.json")
    assert not (tmp_path / "gate.json").exists()


def test_tune_stops_at_its_budget_and_writes_settings_that_load(ctx, tmp_path, monkeypatch):
    from friendrec.config import load_settings
    from training.tune import tune, write_outputs

    quick = SMALL.model_copy(update={"epochs": 1, "max_steps_per_epoch": 3})
    tctx = replace(ctx, settings=ctx.settings.model_copy(update={"training": quick}))
    result = tune(tctx, budget_s=1.0, show_progress=False)  # past the budget after one trial
    assert [t.settings["objective"] for t in result.trials] == ["ssmtl"]  # the defaults
    assert result.best["popularity_bias"] and result.best_run == result.trials[0].run
    assert result.blend["ranker"]["features"] == list(BLEND_FEATURES)
    paths = write_outputs(result, tmp_path / "tuned.yaml")
    assert "objective=ssmtl **chosen**" in paths["table"].read_text()
    monkeypatch.setenv("FRIENDREC_CONFIG", str(paths["settings"]))
    loaded = load_settings(workdir=tmp_path)
    assert loaded.data.dataset == "twitch/ENGB" and loaded.training.popularity_bias
    assert loaded.training.objective == "ssmtl"
    assert loaded.serving.blend_ranker == result.blend["ranker"]


def test_tune_skips_a_change_that_leaves_the_model_as_it_is(ctx, monkeypatch, tmp_path):
    """A second-stage change that cannot act on the best trial (uniformly drawn auxiliary users
    around the single-task model) is no new trial; one that can is trained."""
    from types import SimpleNamespace

    from training import tune as tune_module

    trained: list[dict] = []

    def fake_train(ctx, cfg, show_progress=True):
        trained.append({"objective": cfg.objective, "aux_users": cfg.aux_users,
                        "temperature": cfg.temperature})  # fmt: skip
        result = SimpleNamespace(
            best_val_recall50=0.1 + 0.01 * len(trained), best_epoch=1, model_dir=tmp_path / "r"
        )
        return result, None

    monkeypatch.setattr(tune_module, "train", fake_train)
    monkeypatch.setattr(tune_module, "validation_recalls", lambda *a: np.full(50, 0.2))
    monkeypatch.setattr(tune_module, "_choose_blend", lambda ctx, cfg: {})
    monkeypatch.setattr(tune_module, "WEIGHTS", ((0.0, 0.0),))
    monkeypatch.setattr(tune_module, "NEIGHBOURS", ({"aux_users": "uniform"}, {"temperature": 0.1}))
    single_task = SMALL.model_copy(update={"objective": "baseline"})  # the defaults: trial 1
    tctx = replace(ctx, settings=ctx.settings.model_copy(update={"training": single_task}))
    result = tune_module.tune(tctx, budget_s=3600, show_progress=False)
    assert [t["temperature"] for t in trained] == [SMALL.temperature, 0.1]
    assert {t["objective"] for t in trained} == {"baseline"}
    assert [t.settings for t in result.trials] == [
        {"objective": "baseline"},
        {"objective": "baseline", "temperature": 0.1},
    ]


def test_tune_budgets_by_the_trials_it_trained_not_the_cached_ones(ctx, monkeypatch, tmp_path):
    """Finished runs are restored in no time: counted in the mean, two of them would make a
    60 s trial look like 20 s and the next trial overrun a 100 s budget by 20 s."""
    from types import SimpleNamespace

    from friendrec.config import TrainingSettings
    from training import tune as tune_module
    from training.runs import runs_dir
    from training.train import run_name

    clock = [0.0]
    settings = ctx.settings.model_copy(update={"training": SMALL, "workdir": tmp_path})
    tctx = replace(ctx, settings=settings)
    for objective in ("baseline", "ssmtl"):  # finished before this tune
        cfg = TrainingSettings.model_validate(
            {**SMALL.model_dump(), "popularity_bias": True, "objective": objective}
        )
        (runs_dir(tctx) / run_name(cfg)).mkdir(parents=True)
        (runs_dir(tctx) / run_name(cfg) / "result.json").write_text("{}")

    def fake_train(ctx, cfg, show_progress=True):
        if not (runs_dir(ctx) / run_name(cfg) / "result.json").exists():
            clock[0] += 60.0  # a trial that trains
        result = SimpleNamespace(
            best_val_recall50=0.3, best_epoch=1, model_dir=tmp_path / run_name(cfg)
        )
        return result, None

    monkeypatch.setattr(tune_module, "train", fake_train)
    monkeypatch.setattr(tune_module, "validation_recalls", lambda *a: np.full(50, 0.3))
    monkeypatch.setattr(tune_module, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(tune_module, "_choose_blend", lambda ctx, cfg: {})
    monkeypatch.setattr(tune_module, "WEIGHTS", ((0.0, 0.0), (0.2, 1.0), (0.2, 0.0), (0.0, 1.0)))
    result = tune_module.tune(tctx, budget_s=100, show_progress=False)
    # The defaults (SMALL: ssmtl) first, then the grid; ssmtl's own weights are that same run.
    assert [t.settings["objective"] for t in result.trials] == ["ssmtl", "baseline", "cca"]
    assert [t.cached for t in result.trials] == [True, True, False]
    assert result.spent_s <= result.budget_s


def test_tune_reports_each_gain_with_its_ci_and_can_require_it_above_0(ctx, monkeypatch, tmp_path):
    """Each trial's gain over the defaults comes with its paired-bootstrap CI over validation
    users. The best validation mean is chosen; with ``require_significance`` only a trial whose
    CI is above 0 may replace the defaults. Here the best is ahead of them by noise (half the
    users up, half down), and a trial with a smaller but steady gain is chosen instead; without
    that one, the defaults are."""
    from types import SimpleNamespace

    from training import tune as tune_module
    from training.tune import write_outputs

    rng = np.random.default_rng(0)
    defaults = rng.uniform(0.2, 0.6, 400)
    swing = np.where(np.arange(400) % 2 == 0, 0.3, -0.28)  # mean +0.01, CI far across 0
    per_user = {
        ("ssmtl", SMALL.temperature): defaults,
        ("baseline", SMALL.temperature): np.clip(defaults + swing, 0, 1),
        ("baseline", 0.1): defaults + 0.005,  # mean +0.005 on every user
    }
    trained: list = []

    def fake_train(ctx, cfg, show_progress=True):
        key = (cfg.objective, cfg.temperature)
        trained.append(key)
        run = tmp_path / f"{cfg.objective}-{cfg.temperature}"
        return SimpleNamespace(
            best_val_recall50=float(per_user[key].mean()), best_epoch=1, model_dir=run
        ), key

    monkeypatch.setattr(tune_module, "train", fake_train)
    monkeypatch.setattr(tune_module, "validation_recalls", lambda tower, *a: per_user[tower])
    ranker = source_order("embedding").as_dict()
    blend = {"val_recall50": 0.5, "chosen": "embedding", "ranker": ranker}
    monkeypatch.setattr(tune_module, "_choose_blend", lambda ctx, cfg: blend)
    monkeypatch.setattr(tune_module, "WEIGHTS", ((0.0, 0.0),))
    tctx = replace(ctx, settings=ctx.settings.model_copy(update={"training": SMALL}))

    monkeypatch.setattr(tune_module, "NEIGHBOURS", ({"temperature": 0.1},))
    plain = tune_module.tune(tctx, budget_s=3600, show_progress=False)
    assert trained == [("ssmtl", 0.05), ("baseline", 0.05), ("baseline", 0.1)]
    assert plain.best_run == plain.top_run == plain.trials[1].run
    assert plain.best == {"objective": "baseline", "popularity_bias": True,
                          "epochs": SMALL.epochs}  # fmt: skip
    result = tune_module.tune(tctx, budget_s=3600, show_progress=False, require_significance=True)
    noisy, steady = result.trials[1], result.trials[2]
    assert noisy.val_recall50 > steady.val_recall50 > result.trials[0].val_recall50
    assert noisy.vs_defaults[1] < 0 < noisy.vs_defaults[2]
    assert steady.vs_defaults[1] > 0
    assert result.top_run == noisy.run and result.best_run == steady.run
    assert result.best == {"objective": "baseline", "temperature": 0.1, "popularity_bias": True,
                           "epochs": SMALL.epochs}  # fmt: skip

    monkeypatch.setattr(tune_module, "NEIGHBOURS", ())
    result = tune_module.tune(tctx, budget_s=3600, show_progress=False, require_significance=True)
    assert result.top_run == noisy.run and result.best_run == result.trials[0].run
    assert result.best["objective"] == "ssmtl"
    table = write_outputs(result, tmp_path / "tuned.yaml")["table"].read_text()
    assert "| 1 | objective=ssmtl **chosen** |" in table
    assert "| {:+.1%} [{:+.1%}, {:+.1%}] |".format(*noisy.vs_defaults) in table
    assert "CI that reaches 0: not chosen" in table


def _per_user_neighbours(table, rows, fanout, rng, exclude=None):
    """The per-user loop ``sample_neighbours`` replaced (the reference for its random stream)."""
    out = np.full((len(rows), fanout), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        if row < 0:
            continue
        friends = table.friend_matrix[row]
        friends = friends[friends != -1]
        if exclude is not None:
            friends = friends[friends != exclude[i]]
        if len(friends) > fanout:
            friends = rng.choice(friends, fanout, replace=False) if rng else friends[:fanout]
        neighbour_rows = table.rows_of(friends) if len(friends) else friends
        out[i, : len(neighbour_rows)] = neighbour_rows
    return out


@pytest.mark.parametrize("fanout", [1, 5, 10, 40])
def test_vectorised_neighbour_sampling_keeps_the_random_stream(ctx, fanout):
    """Same neighbours and the same generator state afterwards as the per-user loop: a seed's
    training batches (and so its cached runs) are unchanged by the vectorisation."""
    r = np.random.default_rng(fanout)
    rows = r.integers(-1, len(ctx.table), 300)
    first = ctx.table.friend_matrix[np.maximum(rows, 0), 0]
    exclude = np.where(r.random(300) < 0.5, first, ctx.table.user_ids[r.integers(0, 7000, 300)])
    for ex in (None, exclude):
        for seed in (None, 7):
            a_rng = None if seed is None else np.random.default_rng(seed)
            b_rng = None if seed is None else np.random.default_rng(seed)
            got = sample_neighbours(ctx.table, rows, fanout, a_rng, exclude=ex)
            want = _per_user_neighbours(ctx.table, rows, fanout, b_rng, exclude=ex)
            np.testing.assert_array_equal(got, want)
            if seed is not None:
                assert a_rng.random() == b_rng.random()
