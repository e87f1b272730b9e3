"""The declared schema and the generic ingestion: a team's own graph (string ids, a string
categorical, string tags, missing numbers, real timestamps), every supported format, errors that
name file, line and column, and the MUSAE graphs through their shipped schema files giving what
the code before
schemas gave."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from own_graph import write_own_graph
from reference_digest import column_digest, digests

from friendrec import contract
from friendrec.config import load_settings
from friendrec.data.canonical import check, load_prepared, prepare, read_meta
from friendrec.errors import (
    DatasetMissingError,
    DataValidationError,
    SchemaError,
    UnknownDatasetError,
)
from friendrec.paths import DatasetPaths
from friendrec.schema import resolve

REFERENCE = Path(__file__).parent / "data" / "musae_reference.json"


@pytest.fixture
def own(tmp_path: Path):
    schema = write_own_graph(tmp_path / "own")
    settings = load_settings(workdir=tmp_path / "work")
    return settings, schema


def test_own_graph_prepares_with_mapped_ids_defaults_and_real_time(own):
    settings, schema = own
    meta = prepare(settings, schema_path=schema)
    paths = DatasetPaths.of(settings, "own_graph")
    data = load_prepared(paths)
    report = json.loads(paths.report.read_text())
    # 240 users in the table + the ghost friend added with defaults.
    assert meta.num_users == 241 and report["users_added_from_friendships"] == 1
    assert (report["self_loops_dropped"], report["duplicates_dropped"]) == (1, 1)
    assert meta.id_type == "string" and meta.timestamps == "column"
    # String ids -> dense ids in sorted order, the mapping stored.
    id_map = pq.read_table(paths.id_map)
    external = id_map.column("external_id").to_pylist()
    assert external == sorted(external) and "ghost-user" in external
    assert id_map.column("user_id").to_pylist() == list(range(241))
    # Missing plays -> the default, counted (every fifth user, plus the ghost).
    assert report["defaults_filled"]["plays"] == 48 + 1
    plays = data.profile[:, list(data.contract.profile_scalar_names).index("plays")]
    assert plays[external.index("user-0000")] == 0.0
    # Real timestamps drive the split: held-out friendships are the newest.
    assert data.created_ts[data.split == 0].max() <= data.created_ts[data.split > 0].min()
    assert meta.train_cutoff_ts == int(data.created_ts[data.split == 0].max())
    assert meta.timeline_start == int(data.created_ts.min())
    # Categoricals share one id space; each user's ids belong to its own features' ranges.
    c = data.contract
    assert [x.name for x in c.categoricals] == ["country", "tags"]
    assert c.vocab_size == sum(x.size for x in c.categoricals)
    ghost = external.index("ghost-user")
    ghost_ids = data.sparse_values[data.sparse_offsets[ghost] : data.sparse_offsets[ghost + 1]]
    assert c.split_sparse_ids(ghost_ids.tolist()) == {
        "country": c.categoricals_by_name["country"].encode("unknown"),
        "tags": [],
    }


def test_contract_encodes_profile_events_new_tag_goes_out_of_vocabulary(own):
    settings, schema = own
    prepare(settings, schema_path=schema)
    c = contract.load(DatasetPaths.of(settings, "own_graph").data_dir)
    tags = c.categoricals_by_name["tags"]
    country = c.categoricals_by_name["country"]
    current = country.encode("FR") + tags.encode(["jazz", "rock"])
    scalars, ids = c.encode_profile({"tags": ["jazz", "brand-new-tag"], "plays": 12}, current)
    assert scalars == {"plays": 12.0}
    assert ids == [*country.encode("FR"), tags.encode(["jazz"])[0], tags.oov_id]
    with pytest.raises(ValueError, match="unknown feature"):
        c.encode_profile({"favourite_colour": "red"})
    with pytest.raises(ValueError, match="expected a list"):
        c.encode_profile({"tags": "jazz"})
    with pytest.raises(ValueError, match="expected a number"):
        c.encode_profile({"plays": "many"})
    # The contract survives its JSON round trip.
    assert contract.Contract.from_dict(json.loads(c.to_json())) == c


def test_check_reports_without_writing(own, tmp_path):
    settings, schema = own
    report = check(settings, schema_path=schema)
    assert report.users == 241 and report.friendships == 961
    assert "timestamps: column 'since'" in "\n".join(report.lines())
    assert not (settings.workdir / "data").exists()


def _edit_schema(schema: Path, **changes) -> Path:
    raw = yaml.safe_load(schema.read_text())
    for dotted, value in changes.items():
        node = raw
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node[int(key)] if key.isdigit() else node[key]
        node[keys[-1]] = value
    schema.write_text(yaml.safe_dump(raw, sort_keys=False))
    return schema


def test_unknown_friend_is_an_error_under_policy_error(own):
    settings, schema = own
    _edit_schema(schema, unknown_users="error")
    with pytest.raises(DataValidationError) as info:
        prepare(settings, schema_path=schema)
    err = info.value
    assert err.path.name == "friendships.csv" and err.column == "b"
    assert "'ghost-user' is not in the users table" in str(err)
    lines = (schema.parent / "friendships.csv").read_text().splitlines()
    assert "ghost-user" in lines[err.line - 1]


def test_jsonl_errors_name_line_and_column(own):
    settings, schema = own
    users = schema.parent / "users.jsonl"
    lines = users.read_text().splitlines()
    record = json.loads(lines[6])
    record["plays"] = "lots"
    lines[6] = json.dumps(record)
    users.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataValidationError) as info:
        prepare(settings, schema_path=schema)
    assert (info.value.line, info.value.column) == (7, "plays")
    assert "users.jsonl:7: column 'plays'" in str(info.value)


def test_unknown_column_names_the_file_and_what_it_has(own):
    settings, schema = own
    _edit_schema(schema, **{"features.1.column": "is_verified"})
    with pytest.raises(DataValidationError, match="is_verified"):
        prepare(settings, schema_path=schema)


def test_parquet_users_and_a_glob_of_friendship_files(own, tmp_path):
    """The same graph given as parquet users (several row groups) and two friendship files."""
    settings, schema = own
    folder = schema.parent
    records = [json.loads(x) for x in (folder / "users.jsonl").read_text().splitlines()]
    table = pa.Table.from_pylist(records)
    pq.write_table(table, folder / "users.parquet", row_group_size=50)
    lines = (folder / "friendships.csv").read_text().splitlines()
    (folder / "part-0.csv").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (folder / "part-1.csv").write_text("\n".join([lines[0], *lines[len(lines) // 2 :]]) + "\n")
    _edit_schema(
        schema,
        **{"users.0.path": "users.parquet", "users.0.format": "parquet"},
        **{"friendships.path": "part-*.csv"},
    )
    jsonl_meta = prepare(load_settings(workdir=tmp_path / "w1"), schema_path=_jsonl_copy(folder))
    meta = prepare(settings, schema_path=schema)
    assert meta.split_sha256 == jsonl_meta.split_sha256
    assert meta.num_users == jsonl_meta.num_users
    # A bad value in row group 2 is located there.
    records[123]["verified"] = "perhaps"
    table = (
        pa.Table.from_pylist(
            records,
            schema=pa.schema([(k, pa.string()) for k in records[0] if k != "tags"]).append(
                pa.field("tags", pa.list_(pa.string()))
            ),
        )
        if False
        else _string_table(records)
    )
    pq.write_table(table, folder / "users.parquet", row_group_size=50)
    with pytest.raises(DataValidationError) as info:
        prepare(settings, schema_path=schema)
    assert "row group 2, row 23" in str(info.value) and info.value.column == "verified"


def _string_table(records: list[dict]) -> pa.Table:
    scalars = {
        k: pa.array([None if r[k] is None else str(r[k]) for r in records])
        for k in ("uid", "plays", "verified", "country")
    }
    return pa.table({**scalars, "tags": pa.array([r["tags"] for r in records])})


def _jsonl_copy(folder: Path) -> Path:
    path = folder / "schema_jsonl.yaml"
    write_own_graph(folder / "copy")
    path.write_text(
        (folder / "copy" / "schema.yaml")
        .read_text()
        .replace("path: users.jsonl", f"path: {folder / 'copy' / 'users.jsonl'}")
        .replace("path: friendships.csv", f"path: {folder / 'copy' / 'friendships.csv'}")
    )
    return path


def test_schema_errors_are_precise(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: x\nfriendships: {path: f.csv, format: xls, src_column: a, dst_column: b}\n"
    )
    with pytest.raises(SchemaError, match=r"friendships\.format"):
        resolve(schema_path=bad)
    bad.write_text(
        "name: x\nfriendships: {path: f.csv, format: csv, src_column: a, dst_column: b}\n"
        "users: [{path: u.csv, format: csv, id_column: id}]\n"
        "features: [{name: degree, kind: numeric}]\n"
    )
    with pytest.raises(SchemaError, match="reserved"):
        resolve(schema_path=bad)
    with pytest.raises(UnknownDatasetError, match="shipped schemas"):
        resolve("reddit")


def test_schema_hash_follows_features_not_paths(own):
    _, schema = own
    first = resolve(schema_path=schema).schema_.schema_hash()
    _edit_schema(schema, **{"users.0.path": "elsewhere/users.jsonl"})
    assert resolve(schema_path=schema).schema_.schema_hash() == first
    _edit_schema(schema, **{"features.3.max_values": 4})
    assert resolve(schema_path=schema).schema_.schema_hash() != first


def test_missing_datasets_folder_says_where_and_how(tmp_path):
    settings = load_settings(workdir=tmp_path / "w", datasets_dir=tmp_path / "nowhere")
    with pytest.raises(DatasetMissingError) as info:
        prepare(settings, "twitch/ENGB")
    text = str(info.value)
    assert str(tmp_path / "nowhere") in text and "friendrec data fetch twitch" in text


def test_synthetic_goes_through_the_generic_path(tmp_path):
    settings = load_settings(workdir=tmp_path / "w")
    meta = prepare(settings, "synthetic:2000")
    data = load_prepared(DatasetPaths.of(settings, "synthetic:2000"))
    names = [c.name for c in data.contract.categoricals]
    assert names == ["country", "interests"]
    assert data.contract.categoricals_by_name["country"].value_type == "string"
    assert meta.num_users == 2000 and meta.schema_hash == data.contract.schema_hash


def test_engb_through_its_schema_matches_the_code_before_schemas(engb_store):
    """Same users, friendships, split and graph features as commit 1ca5f57 produced (digests in
    tests/data/musae_reference.json, written by that code; see tests/reference_digest.py)."""
    reference = json.loads(REFERENCE.read_text())["twitch/ENGB"]
    now = digests(engb_store.workdir, "twitch_engb")
    zeros = column_digest(pa.array(np.zeros(7126, dtype=np.float32)))
    # The old contract stored is_ml_developer (a GitHub column) as zeros for Twitch users.
    assert reference["users"].pop("is_ml_developer") == zeros
    assert now["users"] == reference["users"]
    assert now["friendships"] == reference["friendships"]
    old_graph = dict(reference["user_graph"])
    assert old_graph.pop("nbr_profile_mean[4]") == zeros
    old_graph.pop("nbr_profile_mean")  # 5 wide before, 4 now: compared per column below
    new_graph = dict(now["user_graph"])
    new_graph.pop("nbr_profile_mean")
    # Float means through a log transform: to float32 rounding, which differs between CPUs.
    fingerprints = reference["user_graph_fingerprints"]
    assert set(now["user_graph_fingerprints"]) == set(fingerprints) and len(fingerprints) == 4
    for column, values in now["user_graph_fingerprints"].items():
        np.testing.assert_allclose(values, fingerprints[column], rtol=1e-5, atol=1e-3)
        old_graph.pop(column), new_graph.pop(column)
    assert new_graph == old_graph
    meta = read_meta(DatasetPaths.of(engb_store, "twitch/ENGB"))
    assert meta.split_sha256 == "f7a62ed975a5ad06460c9b3d57a5760fd4ddeb420d347523b954e7a36db0a2ee"
