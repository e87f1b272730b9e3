"""Request coalescing: concurrent single requests are answered in batches, each gets its own
answer, errors reach every request of the failed batch, and a lone request never waits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from serving.batching import RequestCoalescer


def test_concurrent_requests_share_batches_and_get_their_own_answers():
    sizes: list[int] = []

    def run(queries, deadline):
        sizes.append(len(queries))
        time.sleep(0.02)  # a slow dependency: requests pile up behind the running batches
        return [q * 10 for q in queries]

    coalescer = RequestCoalescer(run, max_batch=8, max_in_flight=1)
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(coalescer.submit, range(64)))
    assert results == [q * 10 for q in range(64)]
    assert sum(sizes) == 64 and max(sizes) <= 8
    assert len(sizes) < 32  # most requests rode along in someone else's batch


def test_a_lone_request_runs_at_once():
    coalescer = RequestCoalescer(lambda qs, d: list(qs), max_batch=8)
    start = time.perf_counter()
    assert coalescer.submit(7) == 7
    assert time.perf_counter() - start < 0.01


def test_errors_reach_every_request_of_the_batch_and_deadlines_are_the_earliest():
    seen_deadlines: list[float | None] = []
    gate = threading.Event()

    def run(queries, deadline):
        seen_deadlines.append(deadline)
        gate.wait(5)
        if any(q < 0 for q in queries):
            raise ValueError("poison")
        return list(queries)

    coalescer = RequestCoalescer(run, max_batch=8, max_in_flight=1)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(coalescer.submit, 1, 100.0)  # occupies the only slot
        time.sleep(0.05)
        rest = [pool.submit(coalescer.submit, q, d) for q, d in ((-1, 50.0), (2, 70.0))]
        time.sleep(0.05)
        gate.set()
        assert first.result() == 1
        for future in rest:
            with pytest.raises(ValueError, match="poison"):
                future.result()
    assert seen_deadlines == [100.0, 50.0]
