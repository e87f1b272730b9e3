"""Coalescing of concurrent single requests into one batch (dynamic batching without a timer).

Under load, every downstream call costs far more per call than per user: one Feast read, one
Predict and one Milvus search for 8 users cost little more than for one. Requests that arrive
while ``max_in_flight`` batches are already running queue up, and the next free slot takes them
all (up to ``max_batch``) at once. An idle service adds no waiting: a lone request runs at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Q = TypeVar("Q")
R = TypeVar("R")


@dataclass
class _Pending(Generic[Q, R]):
    query: Q
    deadline: float | None
    taken: bool = False
    result: R | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RequestCoalescer(Generic[Q, R]):
    """``submit(query)`` from many threads; ``run_batch(queries, deadline)`` sees them in batches
    and returns one result per query (or raises: every query of that batch gets the error)."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Q], float | None], Sequence[R]],
        max_batch: int = 32,
        max_in_flight: int = 2,
    ) -> None:
        self._run_batch = run_batch
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._running = 0
        self._cond = threading.Condition()
        self._queue: list[_Pending[Q, R]] = []

    def submit(self, query: Q, deadline: float | None = None) -> R:
        item: _Pending[Q, R] = _Pending(query, deadline)
        with self._cond:
            self._queue.append(item)
        # Wait for a free slot unless another request's batch takes ours first; with a slot,
        # run the queue head (FIFO) and repeat until our own request has been taken.
        while True:
            with self._cond:
                while not item.taken and self._running >= self._max_in_flight:
                    self._cond.wait()
                if item.taken:
                    break
                self._running += 1
                batch = self._queue[: self._max_batch]
                del self._queue[: len(batch)]
                for pending in batch:
                    pending.taken = True
                self._cond.notify_all()  # their threads stop waiting for a slot
            try:
                self._execute(batch)
            finally:
                with self._cond:
                    self._running -= 1
                    self._cond.notify_all()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result  # type: ignore[return-value]

    def _execute(self, batch: list[_Pending[Q, R]]) -> None:
        deadlines = [p.deadline for p in batch if p.deadline is not None]
        try:
            results = self._run_batch([p.query for p in batch], min(deadlines, default=None))
            for pending, result in zip(batch, results, strict=True):
                pending.result = result
        except BaseException as exc:  # handed to every waiting request
            for pending in batch:
                pending.error = exc
        finally:
            for pending in batch:
                pending.done.set()
