"""Dataset ingest, validation errors, timestamps and the split, on real and hand-made files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from musae_files import write_twitch

from friendrec.config import load_settings
from friendrec.data.canonical import SPLITS, load_prepared, prepare, read_meta
from friendrec.errors import DataValidationError, UnknownDatasetError
from friendrec.paths import DatasetPaths
from friendrec.schema import SHIPPED_SCHEMAS_DIR


def test_engb_ingest_counts(settings):
    meta = prepare(settings, "twitch/ENGB")
    assert (meta.num_users, meta.num_friendships) == (7126, 35324)
    paths = DatasetPaths.of(settings, "twitch/ENGB")
    users = pq.read_table(paths.users)
    friendships = pq.read_table(paths.friendships)
    assert users.num_rows == 7126 and friendships.num_rows == 35324
    assert users.column("user_id").to_pylist() == list(range(7126))
    data = load_prepared(paths)
    assert np.all(data.src < data.dst)
    # Real profile values come through: ENGB users have positive account ages and some views.
    assert data.profile[:, 0].min() > 0 and data.profile[:, 1].max() > 1000
    assert set(np.unique(data.profile[:, 2])) == {0.0, 1.0}
    # Every ENGB user has between 1 and 155 sparse ids (README of the datasets).
    lengths = np.diff(data.sparse_offsets)
    assert lengths.min() >= 1 and lengths.max() == 155


def test_twitch_fr_repeated_accounts_keep_later_row(settings):
    meta = prepare(settings, "twitch/FR")
    assert meta.num_users == 6549  # 6,551 target rows, two accounts repeated
    paths = DatasetPaths.of(settings, "twitch/FR")
    report = json.loads(paths.report.read_text())
    assert report["duplicate_user_rows"] == 2


def test_github_ingest(settings):
    meta = prepare(settings, "github")
    assert (meta.num_users, meta.num_friendships, meta.vocab_size) == (37700, 289003, 4005)


def test_split_is_seeded_temporal_and_85_5_10(settings):
    meta = prepare(settings, "twitch/ENGB")
    n = meta.num_friendships
    assert meta.split_counts == {
        "train": n - round(0.05 * n) - round(0.10 * n),
        "val": round(0.05 * n),
        "test": round(0.10 * n),
    }
    data = load_prepared(DatasetPaths.of(settings, "twitch/ENGB"))
    train_ts = data.created_ts[data.split == 0]
    held_ts = data.created_ts[data.split > 0]
    assert train_ts.max() == meta.train_cutoff_ts
    assert held_ts.min() >= meta.train_cutoff_ts  # held-out friendships are the newest
    assert data.created_ts.min() >= meta.timeline_start
    # Same seed, same split; another seed, another split.
    again = prepare(settings, "twitch/ENGB")
    assert again.split_sha256 == meta.split_sha256
    other = prepare(load_settings(workdir=settings.workdir / "o", data={"seed": 7}), "twitch/ENGB")
    assert other.split_sha256 != meta.split_sha256


def _twitch_schema(tmp_path: Path, datasets: Path, language: str = "XX") -> Path:
    """The shipped Twitch schema pointed at hand-made files of one language."""
    schema = yaml.safe_load((SHIPPED_SCHEMAS_DIR / "twitch.yaml").read_text())
    schema.pop("variants")
    schema["name"] = f"twitch_{language.lower()}"
    text = yaml.safe_dump(schema).replace("{variant}", language)
    path = tmp_path / "twitch_xx.yaml"
    path.write_text(text.replace("{datasets_dir}", str(datasets)))
    return path


def _expect_error(tmp_path: Path, fragment: str, file_suffix: str, line: int | None, **files):
    datasets = tmp_path / "datasets"
    write_twitch(datasets, "XX", **files)
    settings = load_settings(workdir=tmp_path / "work", datasets_dir=datasets)
    schema = _twitch_schema(tmp_path, datasets)
    with pytest.raises(DataValidationError) as info:
        prepare(settings, schema_path=schema)
    err = info.value
    assert fragment in str(err)
    assert err.path.name.endswith(file_suffix)
    assert err.line == line
    assert f"XX{file_suffix}" in str(err)
    # Nothing half-written is left behind.
    assert not DatasetPaths.of(settings, "twitch_xx").data_dir.exists()
    return err


GOOD_FEATURES = {0: [1], 1: [2], 2: [3], 3: [1, 2]}


@pytest.mark.parametrize(
    ("edges", "fragment", "line"),
    [
        ("from,to\n0,1\n1,x\n", "'x' is not an integer", 3),
        ("from,to\n0,1\n1,2,3\n", "expected 2 fields", 3),
        ("from,to\n0,1\n1,9\n", "user 9 is not in the users table", 3),
        ("from,to\n0,1\n-1,2\n", "negative user id", 3),
    ],
)
def test_malformed_edges_name_file_and_line(tmp_path, edges, fragment, line):
    _expect_error(
        tmp_path, fragment, "_edges.csv", line, edges=edges, features=GOOD_FEATURES, num_users=4
    )


def test_self_loops_and_duplicates_are_counted_and_dropped(tmp_path):
    datasets = tmp_path / "datasets"
    edges = "from,to\n0,1\n2,2\n1,2\n1,0\n"
    write_twitch(datasets, "XX", edges=edges, features=GOOD_FEATURES, num_users=4)
    settings = load_settings(workdir=tmp_path / "work", datasets_dir=datasets)
    meta = prepare(settings, schema_path=_twitch_schema(tmp_path, datasets))
    assert meta.num_friendships == 2
    report = json.loads(DatasetPaths.of(settings, "twitch_xx").report.read_text())
    assert (report["self_loops_dropped"], report["duplicates_dropped"]) == (1, 1)
    data = load_prepared(DatasetPaths.of(settings, "twitch_xx"))
    assert sorted(zip(data.src.tolist(), data.dst.tolist(), strict=True)) == [(0, 1), (1, 2)]


def test_malformed_features_json(tmp_path):
    _expect_error(
        tmp_path,
        "invalid JSON",
        "_features.json",
        2,
        edges=[(0, 1)],
        features='{"0": [1],\n "1": [2,, 3]}',
    )
    err = _expect_error(
        tmp_path / "b",
        "value 5000 is outside [0, 3170)",
        "_features.json",
        None,
        edges=[(0, 1)],
        features={0: [1], 1: [5000]},
    )
    assert err.column == "features"
    _expect_error(
        tmp_path / "c",
        "user 7 is not in the first users source",
        "_features.json",
        None,
        edges=[(0, 1)],
        features={0: [1], 7: [2]},
    )


def test_malformed_target(tmp_path):
    rows = ["1000,10,True,5,False,0", "1001,10,maybe,5,False,1"]
    err = _expect_error(
        tmp_path,
        "expected a boolean",
        "_target.csv",
        3,
        edges=[(0, 1)],
        features={0: [1], 1: [2]},
        target=rows,
    )
    assert err.column == "mature" and "column 'mature'" in str(err)
    rows = ["1000,ten,True,5,False,0", "1001,10,True,5,False,1"]
    err = _expect_error(
        tmp_path / "b",
        "expected a number, got 'ten'",
        "_target.csv",
        2,
        edges=[(0, 1)],
        features={0: [1], 1: [2]},
        target=rows,
    )
    assert err.column == "days"


def test_failed_prepare_keeps_previous_good_layout(tmp_path):
    datasets = tmp_path / "datasets"
    write_twitch(datasets, "XX", edges=[(0, 1), (1, 2)], features={0: [1], 1: [2], 2: [3]})
    settings = load_settings(workdir=tmp_path / "work", datasets_dir=datasets)
    schema = _twitch_schema(tmp_path, datasets)
    good = prepare(settings, schema_path=schema)
    write_twitch(datasets, "XX", edges="from,to\n0,1\n1,x\n", features={0: [1]}, num_users=3)
    with pytest.raises(DataValidationError):
        prepare(settings, schema_path=schema)
    paths = DatasetPaths.of(settings, "twitch_xx")
    assert read_meta(paths) == good
    assert pq.read_table(paths.friendships).num_rows == 2
    leftovers = [p.name for p in paths.data_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_unknown_dataset_names(settings):
    for name in ("twitch/XX", "reddit", "synthetic:abc", "synthetic:1"):
        with pytest.raises(UnknownDatasetError):
            prepare(settings, name)


def test_splits_constant_matches_meta(settings):
    meta = prepare(settings, "twitch/PTBR")
    assert list(meta.split_counts) == list(SPLITS)
    assert sum(meta.split_counts.values()) == meta.num_friendships == 31299
