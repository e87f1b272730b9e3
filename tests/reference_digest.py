"""Digests of the prepared layout and the graph features, to compare this code's output on the
MUSAE graphs with the output of the code before schemas existed (``musae_reference.json``).

The reference was written by running commit 1ca5f57 (the last commit before the declared schema):

    git worktree add /tmp/old 1ca5f57 && cd /tmp/old
    FRIENDREC_WORKDIR=/tmp/old_work friendrec data prepare --dataset twitch/ENGB
    FRIENDREC_WORKDIR=/tmp/old_work friendrec features build --dataset twitch/ENGB
    python tests/reference_digest.py /tmp/old_work twitch/ENGB > tests/data/musae_reference.json

(run from the new checkout for the last line).

The neighbours' profile means are floats computed through a log transform, whose last bit
differs between CPUs: on a machine without AVX-512 two of their exact digests differed. They are
compared by ``float_fingerprint`` to a relative 1e-5 instead. Their fingerprints
(``user_graph_fingerprints``) were added later, from this code's output on that machine, whose
every exact digest besides those two matched 1ca5f57's: this code had matched all of them
exactly on the machine that wrote the reference.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

FILES = {
    "users": ("data", "users.parquet"),
    "friendships": ("data", "friendships.parquet"),
    "user_graph": ("features", "user_graph.parquet"),
}


def column_digest(column: pa.ChunkedArray | pa.Array) -> str:
    """sha256 of a column's values (lists: lengths then flat values), independent of chunking
    and of parquet encoding."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.DictionaryArray):
        array = array.dictionary_decode()
    digest = hashlib.sha256()
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.asarray(array.value_lengths().fill_null(0).to_numpy(zero_copy_only=False))
        digest.update(lengths.astype(np.int64).tobytes())
        array = array.flatten()
    if pa.types.is_timestamp(array.type):
        array = array.cast(pa.int64())
    if pa.types.is_string(array.type):
        digest.update("\x00".join(array.to_pylist()).encode())
    else:
        digest.update(np.ascontiguousarray(array.to_numpy(zero_copy_only=False)).tobytes())
    return digest.hexdigest()


def float_fingerprint(values: np.ndarray) -> list[float]:
    """A float column's sum, sum of squares and three fixed random projections, in float64: equal
    to a relative 1e-5 where two machines compute the column to float32 rounding (a transcendental
    such as log1p may differ in its last bit between CPUs' SIMD paths), unequal where a value,
    a row or the order differs."""
    x = np.asarray(values, dtype=np.float64)
    weights = np.random.default_rng(0).standard_normal((3, len(x)))
    return [float(x.sum()), float((x * x).sum()), *map(float, weights @ x)]


def nbr_profile_columns(column: pa.ChunkedArray) -> np.ndarray:
    """The fixed-width nbr_profile_mean lists as a float32 matrix [n, P]."""
    array = column.combine_chunks()
    flat = np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return flat.reshape(len(array), -1)


def digests(workdir: Path, slug: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, (folder, file) in FILES.items():
        path = workdir / folder / slug / file
        if not path.is_file():
            continue
        table = pq.read_table(path)
        if name == "user_graph":
            # One row per user of the latest snapshot (the build writes one snapshot here).
            out[name] = {c: column_digest(table.column(c)) for c in table.column_names}
            matrix = nbr_profile_columns(table.column("nbr_profile_mean"))
            out["user_graph_fingerprints"] = {}
            for j in range(matrix.shape[1]):
                out[name][f"nbr_profile_mean[{j}]"] = column_digest(pa.array(matrix[:, j]))
                out["user_graph_fingerprints"][f"nbr_profile_mean[{j}]"] = float_fingerprint(
                    matrix[:, j]
                )
        else:
            out[name] = {c: column_digest(table.column(c)) for c in table.column_names}
    return out


if __name__ == "__main__":
    root, dataset = Path(sys.argv[1]), sys.argv[2]
    slug = dataset.replace("/", "_").lower()
    json.dump({dataset: digests(root, slug)}, sys.stdout, indent=1, sort_keys=True)
