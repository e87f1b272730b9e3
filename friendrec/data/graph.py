"""In-memory graph types shared by the dataset readers, the split and the feature jobs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa


@dataclass
class RawGraph:
    """A validated undirected graph with user features, before timestamps and the split.

    The synthetic generator returns one (profile columns in ``synthetic.SCALARS`` order) and writes
    it as tables that the generic ingestion (``friendrec.data.ingest``) reads back. Sparse ids
    are CSR-style: user ``i`` owns
    ``sparse_values[sparse_offsets[i]:sparse_offsets[i + 1]]``.
    """

    name: str
    user_ids: np.ndarray  # int64 [n], unique
    profile: np.ndarray  # float32 [n, P], raw scalars (synthetic.SCALARS order)
    sparse_offsets: np.ndarray  # int64 [n + 1]
    sparse_values: np.ndarray  # int64 [nnz], each < vocab_size
    src: np.ndarray  # int64 [E] user ids with src < dst; pairs unique, no self loops
    dst: np.ndarray  # int64 [E]
    vocab_size: int
    sources: dict[str, str] = field(default_factory=dict)  # provenance: file -> sha256

    @property
    def num_users(self) -> int:
        return int(self.user_ids.shape[0])

    @property
    def num_friendships(self) -> int:
        return int(self.src.shape[0])

    def check(self) -> None:
        """Cheap structural invariants; readers validate content with precise errors first."""
        n = self.num_users
        if self.profile.ndim != 2 or self.profile.shape[0] != n:
            raise ValueError(f"profile shape {self.profile.shape} != ({n}, P)")
        if self.sparse_offsets.shape != (n + 1,):
            raise ValueError("sparse_offsets must have n + 1 entries")
        if self.src.shape != self.dst.shape:
            raise ValueError("src and dst differ in length")
        if np.any(self.src >= self.dst):
            raise ValueError("edges must be canonical (src < dst)")


def sparse_list_array(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    """CSR offsets/values -> an Arrow list<int64> column without a Python loop."""
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)),
        pa.array(values.astype(np.int64)),
    )


def list_array_to_csr(column: pa.ChunkedArray | pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """An Arrow list<int64> column -> (offsets int64 [n+1], values int64 [nnz])."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = column.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(column) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return offsets, values


@dataclass
class Adjacency:
    """Symmetric CSR adjacency over dense user indices 0..n-1 (the training graph)."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int64 [2E], neighbours sorted within each row

    @classmethod
    def from_edges(cls, num_users: int, src_idx: np.ndarray, dst_idx: np.ndarray) -> Adjacency:
        rows = np.concatenate([src_idx, dst_idx]).astype(np.int64)
        cols = np.concatenate([dst_idx, src_idx]).astype(np.int64)
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        indptr = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=num_users), out=indptr[1:])
        return cls(indptr=indptr, indices=cols)

    @property
    def degree(self) -> np.ndarray:
        return np.diff(self.indptr)

    def neighbours(self, i: int) -> np.ndarray:
        return self.indices[self.indptr[i] : self.indptr[i + 1]]
