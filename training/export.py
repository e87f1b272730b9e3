"""`friendrec export`: the user tower as a SavedModel in the TF Serving layout.

``<base>/<model_name>/<version>/`` holds ``saved_model.pb``, ``variables/``,
``assets.extra/tf_serving_warmup_requests`` (PredictRequests TF Serving replays before a version
takes traffic) and ``model_card.json``. The ``serving_default`` signature takes the named raw inputs
that Feast returns for a user and its sampled friends (``training.features.tower_inputs``) and
returns ``embedding``; the profile transform (the dataset contract's, as constants), the
standardisation and the out-of-vocabulary mapping all live inside the graph. The profile inputs are
as wide as the contract has profile scalars.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from training.features import InputSpec
from training.tower import UserTower

SIGNATURE = "serving_default"
# Layer-by-layer inference over a whole population (the index build): every user's layer-1
# state once (NODE_STATES), then each user's index vector from its friends' states (READOUT).
NODE_STATES = "node_states"
READOUT = "readout"
STATE = "state"  # NODE_STATES' output
OUTPUT = "embedding"  # the index vector (what Milvus stores)
QUERY_OUTPUT = "query_embedding"  # the vector a search is made with (tower.py: the two forms)
WARMUP_FILE = "tf_serving_warmup_requests"
MODEL_CARD = "model_card.json"


def node_signature(spec: InputSpec, profile_width: int) -> dict[str, tuple[list[int], tf.DType]]:
    """One node's inputs (its feature row): name -> (shape without the batch axis, dtype)."""
    p = int(profile_width)
    return {
        "user_id": ([], tf.int64),
        "profile": ([p], tf.float32),
        "sparse_ids": ([spec.sparse_len], tf.int64),
        "nbr_ids": ([spec.nbr_len], tf.int64),
        "nbr_weights": ([spec.nbr_len], tf.float32),
        "nbr_profile": ([p], tf.float32),
        "degree": ([], tf.int64),
        "friend_ids": ([spec.friend_len], tf.int64),
    }


def input_signature(spec: InputSpec, profile_width: int) -> dict[str, tf.TensorSpec]:
    """The serving inputs: the user's own features (``self_*``), its ``fanout`` friends'
    (``friend_*``, a fanout axis after the batch axis) and ``friend_mask``; ``profile`` and
    ``nbr_profile`` are ``profile_width`` wide (the contract's profile scalars)."""
    out = {}
    for key, (shape, dtype) in node_signature(spec, profile_width).items():
        out[f"self_{key}"] = tf.TensorSpec([None, *shape], dtype, name=f"self_{key}")
        out[f"friend_{key}"] = tf.TensorSpec(
            [None, spec.fanout, *shape], dtype, name=f"friend_{key}"
        )
    out["friend_mask"] = tf.TensorSpec([None, spec.fanout], tf.float32, name="friend_mask")
    return out


class ServingModule(tf.Module):
    """What TF Serving loads: the tower and its inference signatures, nothing of the training
    heads. ``serving_default`` embeds users from their own and their friends' rows (a query);
    ``node_states`` and ``readout`` are the same function split in its two layers, for a job
    that embeds a whole population (each user's layer 1 once instead of 1 + fanout times)."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower
        signature = input_signature(tower.spec, tower.profile_width)
        node = {
            k: tf.TensorSpec([None, *shape], dtype, name=k)
            for k, (shape, dtype) in node_signature(tower.spec, tower.profile_width).items()
        }
        hidden = tower.layer1.units
        layers = {
            "h_self": tf.TensorSpec([None, hidden], tf.float32, name="h_self"),
            "friend_states": tf.TensorSpec(
                [None, tower.spec.fanout, hidden], tf.float32, name="friend_states"
            ),
            "friend_mask": tf.TensorSpec([None, tower.spec.fanout], tf.float32, name="friend_mask"),
            "self_degree": tf.TensorSpec([None], tf.int64, name="self_degree"),
        }

        @tf.function(input_signature=[signature])
        def serve(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            unit = self.tower.embed(inputs, training=False)
            return {
                OUTPUT: self.tower.candidate_vectors(unit, inputs),
                QUERY_OUTPUT: self.tower.query_vectors(unit),
            }

        @tf.function(input_signature=[node])
        def node_states(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {STATE: self.tower.node_states(inputs)}

        @tf.function(input_signature=[layers])
        def readout(inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            unit = self.tower.readout(
                inputs["h_self"], inputs["friend_states"], inputs["friend_mask"]
            )
            return {OUTPUT: self.tower.candidate_vectors(unit, inputs)}

        self.serve = serve
        self.node_states = node_states
        self.readout = readout

    def signatures(self) -> dict[str, Any]:
        return {SIGNATURE: self.serve, NODE_STATES: self.node_states, READOUT: self.readout}


def next_version(model_root: Path) -> int:
    versions = [int(p.name) for p in model_root.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def warmup_log(inputs: dict[str, np.ndarray], model_name: str) -> bytes:
    """One PredictionLog record (TFRecord payload) for assets.extra."""
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE)
    )
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request)
    )
    return log.SerializeToString()


def export_tower(
    tower: UserTower,
    base_path: Path,
    model_name: str,
    warmup_inputs: dict[str, np.ndarray],
    model_card: dict[str, Any],
    version: int | None = None,
) -> Path:
    """Write a new version atomically (staged, then renamed: TF Serving never sees half a model)."""
    model_root = base_path / model_name
    model_root.mkdir(parents=True, exist_ok=True)
    version = version or next_version(model_root)
    target = model_root / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists; versions are immutable")
    staging = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=model_root))
    try:
        module = ServingModule(tower)
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        extra = staging / "assets.extra"
        extra.mkdir()
        with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
            writer.write(warmup_log(warmup_inputs, model_name))
        card = {
            **model_card,
            "model_name": model_name,
            "version": version,
            "signature": SIGNATURE,
            "output": OUTPUT,
            "query_output": QUERY_OUTPUT,
            "layerwise_signatures": [NODE_STATES, READOUT],
            "dim": tower.output_dim,
            "popularity_bias": tower.popularity_bias,
            "inputs": {
                k: {"dtype": v.dtype.name, "shape": v.shape.as_list()}
                for k, v in input_signature(tower.spec, tower.profile_width).items()
            },
            "exported_at": datetime.now(UTC).isoformat(),
        }
        (staging / MODEL_CARD).write_text(json.dumps(card, indent=2, default=str))
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_signature(version_dir: Path):
    """The exported serving function (as TF Serving would run it)."""
    return tf.saved_model.load(str(version_dir)).signatures[SIGNATURE]
