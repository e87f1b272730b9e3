"""A team's own social graph, made by the tests: string ids, a string categorical, a list of string
tags, a numeric column with missing values, real ISO timestamps, plus the dirt real exports have (a
self loop, a repeated friendship, a friend missing from the users table)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import yaml

COUNTRIES = ("FR", "DE", "BR", "JP", "US", "NG")
TAGS = ("jazz", "rock", "techno", "folk", "metal", "pop", "rap", "soul", "blues", "house")


def write_own_graph(directory: Path, n_users: int = 240, seed: int = 0) -> Path:
    """Write users.jsonl, friendships.csv and schema.yaml; return the schema path.

    Users form communities sharing a country and a tag pool, and befriend within them mostly, so
    a tiny model has something to learn. Every fifth user has no ``plays`` value.
    """
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    community = rng.integers(0, len(COUNTRIES), n_users)
    ids = [f"user-{i:04d}" for i in range(n_users)]
    with (directory / "users.jsonl").open("w") as fh:
        for i, uid in enumerate(ids):
            pool = TAGS[community[i] : community[i] + 4]
            tags = sorted(set(rng.choice(pool, size=rng.integers(1, 4)).tolist()))
            record = {
                "uid": uid,
                "plays": None if i % 5 == 0 else int(rng.integers(0, 5000)),
                "verified": bool(rng.random() < 0.2),
                "country": COUNTRIES[community[i]],
                "tags": tags,
            }
            fh.write(json.dumps(record) + "\n")
    start = datetime(2025, 3, 1, tzinfo=UTC)
    lines = ["a,b,since"]
    seen: set[tuple[int, int]] = set()
    while len(seen) < n_users * 4:
        a = int(rng.integers(n_users))
        same = np.flatnonzero(community == community[a])
        b = int(rng.choice(same)) if rng.random() < 0.8 else int(rng.integers(n_users))
        if a == b or (min(a, b), max(a, b)) in seen:
            continue
        seen.add((min(a, b), max(a, b)))
        when = start + timedelta(minutes=int(rng.integers(0, 60 * 24 * 200)))
        lines.append(f"{ids[a]},{ids[b]},{when.isoformat().replace('+00:00', 'Z')}")
    # The dirt: a self loop, the first friendship repeated later, a friend without a users row.
    lines.append(f"{ids[1]},{ids[1]},2025-04-01T00:00:00Z")
    first = lines[1].split(",")
    lines.append(f"{first[1]},{first[0]},2025-09-01T00:00:00Z")
    lines.append(f"{ids[2]},ghost-user,2025-05-01T00:00:00Z")
    (directory / "friendships.csv").write_text("\n".join(lines) + "\n")
    schema = {
        "name": "own_graph",
        "friendships": {
            "path": "friendships.csv",
            "format": "csv",
            "src_column": "a",
            "dst_column": "b",
            "timestamp_column": "since",
        },
        "users": [{"path": "users.jsonl", "format": "jsonl", "id_column": "uid"}],
        "id_type": "string",
        "unknown_users": "default",
        "features": [
            {"name": "plays", "kind": "numeric", "transform": "log1p", "default": 0},
            {"name": "verified", "kind": "boolean"},
            {"name": "country", "kind": "categorical", "default": "unknown"},
            {"name": "tags", "kind": "multi_categorical", "max_values": 8},
        ],
    }
    path = directory / "schema.yaml"
    path.write_text(yaml.safe_dump(schema, sort_keys=False))
    return path
