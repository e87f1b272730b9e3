"""The shared settings: defaults, YAML file, environment, validation; the Feast config template."""

from __future__ import annotations

import pytest
import yaml
from contracts import tagged, twitch_like
from pydantic import ValidationError

from friendrec.config import PROJECT_ROOT, load_settings
from friendrec.feast_store import render_config
from friendrec.paths import DatasetPaths, dataset_slug


def test_defaults_live_inside_the_repo_and_read_shared_datasets(monkeypatch):
    for var in ("FRIENDREC_WORKDIR", "FRIENDREC_DATASETS_DIR", "FRIENDREC_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    settings = load_settings()
    assert settings.workdir == PROJECT_ROOT / ".friendrec"
    assert settings.datasets_dir == (PROJECT_ROOT.parent / "shared" / "datasets").resolve()
    assert settings.features.online_store == "sqlite"


def test_file_then_environment_precedence(tmp_path, monkeypatch):
    config = tmp_path / "friendrec.yaml"
    config.write_text(
        yaml.safe_dump({"workdir": str(tmp_path / "w"), "data": {"seed": 5, "test_fraction": 0.2}})
    )
    monkeypatch.setenv("FRIENDREC_CONFIG", str(config))
    monkeypatch.setenv("FRIENDREC_DATA__SEED", "9")
    settings = load_settings()
    assert settings.workdir == tmp_path / "w"
    assert settings.data.test_fraction == 0.2  # from the file
    assert settings.data.seed == 9  # the environment wins over the file
    assert load_settings(data={"seed": 1}).data.seed == 1  # explicit overrides win over both
    # "null" unsets an optional setting (documented runs rely on it).
    assert load_settings().training.cca_id_drop == 0.0
    monkeypatch.setenv("FRIENDREC_TRAINING__CCA_ID_DROP", "null")
    assert load_settings().training.cca_id_drop is None


def test_invalid_settings_are_rejected(monkeypatch, tmp_path):
    with pytest.raises(ValidationError, match="val_fraction"):
        load_settings(data={"val_fraction": 0.5, "test_fraction": 0.5})
    with pytest.raises(ValidationError):
        load_settings(features={"online_store": "cassandra"})
    with pytest.raises(ValidationError):
        load_settings(no_such_setting=1)
    ranker = load_settings().serving.blend_ranker
    with pytest.raises(ValidationError, match=r"blend_k0 no longer exist.*serving.blend_ranker"):
        load_settings(serving={"blend_k0": 20.0})  # a settings file from before the fitted blend
    with pytest.raises(ValidationError, match=r"blend_weights no longer exist.*friendrec tune"):
        load_settings(serving={"blend_weights": {"0": [0.0] * 7}})  # the linear blend's
    with pytest.raises(ValidationError, match=r"fitted on features \['embedding'\].*rerun"):
        load_settings(serving={"blend_ranker": {**ranker, "features": ["embedding"]}})
    first = ranker["layers"][0]
    narrow = {
        **ranker,
        "layers": [{**first, "weight": first["weight"][:-1]}, *ranker["layers"][1:]],
    }
    with pytest.raises(ValidationError, match=r"layer 0 must map 10 inputs"):
        load_settings(serving={"blend_ranker": narrow})
    with pytest.raises(ValidationError, match="finite"):
        load_settings(serving={"blend_ranker": {**ranker, "mean": [float("nan")] * 10}})
    with pytest.raises(ValidationError, match="reads_vectors must be a boolean"):
        load_settings(serving={"blend_ranker": {**ranker, "reads_vectors": "no"}})
    # Without the Milvus get the blend is given a bound, not a ranker fitted on true products.
    assert ranker["reads_vectors"] is True
    no_reads = load_settings(serving={"blend_reads_vectors": False}).serving.blend_ranker
    assert no_reads["reads_vectors"] is False and no_reads["layers"] != ranker["layers"]
    with pytest.raises(ValidationError, match=r"fitted on the vectors' inner products.*tune"):
        load_settings(serving={"blend_reads_vectors": False, "blend_ranker": ranker})
    # A ranker that reads none may be served where reads are allowed (tune's source fallback).
    assert load_settings(serving={"blend_ranker": no_reads}).serving.blend_ranker == no_reads
    legacy = {k: v for k, v in ranker.items() if k != "reads_vectors"}  # files before the choice
    assert load_settings(serving={"blend_ranker": legacy}).serving.blend_ranker == ranker
    monkeypatch.setenv("FRIENDREC_CONFIG", str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match=r"missing\.yaml"):
        load_settings()


def test_feature_store_yaml_template_renders_per_dataset(settings):
    paths = DatasetPaths.of(settings, "synthetic:1000")
    rendered = render_config(settings, paths)
    assert rendered == {
        "project": "friendrec_synthetic_1000",
        "registry": str(settings.workdir / "feast" / "synthetic_1000" / "registry.db"),
        "provider": "local",
        "offline_store": {"type": "duckdb"},
        "online_store": {
            "type": "friendrec.feast_sqlite.FriendrecSqliteOnlineStore",
            "path": str(settings.workdir / "feast" / "synthetic_1000" / "online.db"),
        },
        "entity_key_serialization_version": 3,
        "batch_engine": {
            "type": "friendrec.feast_write.FriendrecLocalComputeEngine",
            "partition_rows": 100_000,
        },
    }


def test_dataset_slugs_are_feast_safe():
    assert dataset_slug("twitch/ENGB") == "twitch_engb"
    assert dataset_slug("synthetic:100000") == "synthetic_100000"
    assert dataset_slug("github") == "github"


@pytest.mark.parametrize("make", [twitch_like, tagged])
def test_contract_is_self_consistent(make):
    c = make()
    names = [f.name for f in c.all_features]
    assert len(names) == len(set(names))
    assert len(c.nbr_profile_mean.default) == len(c.profile_scalars)
    refs = c.feature_refs()
    assert len(refs) == len(names) and refs[0] == f"user_profile:{c.profile_scalar_names[0]}"
    assert c.serving_service.endswith(c.schema_hash) and c.training_service != c.serving_service
    with pytest.raises(ValueError):
        c.transform_profile([[1.0] * (len(c.profile_scalars) + 1)])


def test_contract_transforms_clip_log_and_standardise():
    raw = [[0.0, 9.0, 1.0, 0.0]]
    assert twitch_like().transform_profile(raw)[0].tolist() == pytest.approx(
        [0.0, 2.302585, 1.0, 0.0]
    )
    # plays: clipped to [0, 100], then (x - 20) / 10; verified: as it is.
    got = tagged().transform_profile([[-5.0, 1.0], [250.0, 0.0], [35.0, 1.0]])
    assert got.ravel().tolist() == pytest.approx([-2.0, 1.0, 8.0, 0.0, 1.5, 1.0])


def test_json_logs_carry_structured_fields():
    import json
    import logging

    from friendrec.logs import JsonFormatter

    record = logging.LogRecord(
        "friendrec.serving.access", logging.INFO, __file__, 1, "%s OK", ("Recommend",), None
    )
    record.fields = {"request_id": "abc", "stage_ms": {"feast": 1.5}}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "Recommend OK" and entry["level"] == "INFO"
    assert entry["logger"] == "friendrec.serving.access"
    assert entry["request_id"] == "abc" and entry["stage_ms"] == {"feast": 1.5}


def test_readme_states_the_metrics_bind_defaults_the_code_has():
    """README's settings table once said 127.0.0.1 while the code bound 0.0.0.0."""
    import re

    from conftest import REPO_ROOT

    row = next(
        line
        for line in (REPO_ROOT / "README.md").read_text().splitlines()
        if "`streaming.metrics_port`, `metrics_host`" in line
    )
    documented = re.findall(r"`([0-9.]+)`", row.split("|")[3])
    cfg = load_settings().streaming
    assert documented == [cfg.metrics_host]
    prod = (REPO_ROOT / "infra" / "config" / "production.yaml").read_text()
    assert "metrics_host: 0.0.0.0" in prod  # containers are scraped from outside
