"""Thread pipeline of the stream: reader threads, a round preparer and a batch lookahead.

Design: docs/loader.md, "Reading and the memory budget".

Each rank runs reader threads (TileDB and numpy release the GIL) plus one assembler thread.
Rounds are submitted `prefetch_rounds` ahead but yielded strictly in plan order, so the output
never depends on timing. With `reader_threads=0` everything runs synchronously in the caller.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

P = TypeVar("P")
R = TypeVar("R")

BATCH_LOOKAHEAD = 4  # batches gathered ahead of the consumer


class Metrics:
    """Thread-safe counters and timers; `snapshot()` returns a plain dict."""

    def __init__(self, **static: Any):
        self._lock = threading.Lock()
        self._values: dict[str, Any] = dict(static)

    def add(self, **deltas: float) -> None:
        """Add each value to its counter (creating it at 0)."""
        with self._lock:
            for key, value in deltas.items():
                self._values[key] = self._values.get(key, 0) + value

    def set(self, **values: Any) -> None:
        """Overwrite values."""
        with self._lock:
            self._values.update(values)

    def snapshot(self) -> dict[str, Any]:
        """Return a copy of all counters."""
        with self._lock:
            return dict(self._values)


class RoundPrefetcher:
    """Reader threads for each round's read jobs, one thread that prepares rounds from their
    pieces, and one that gathers batches a few ahead of the consumer (`lookahead`).

    Batches are gathered one at a time rather than a whole round up front: the first batch of a
    round waits for its reads and one gather only, and at most BATCH_LOOKAHEAD gathered batches
    exist beside the prepared rounds.
    """

    def __init__(self, reader_threads: int, prefetch_rounds: int):
        self.reader_threads = reader_threads
        self.prefetch_rounds = prefetch_rounds
        self._io: ThreadPoolExecutor | None = None
        self._asm: ThreadPoolExecutor | None = None
        self._gather: ThreadPoolExecutor | None = None

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor]:
        if self._io is None or self._asm is None or self._gather is None:
            self._io = ThreadPoolExecutor(self.reader_threads, thread_name_prefix="soma-read")
            self._asm = ThreadPoolExecutor(1, thread_name_prefix="round-prepare")
            # Its own thread: a prepare task blocks on its reads and must not stall gathers.
            self._gather = ThreadPoolExecutor(1, thread_name_prefix="batch-gather")
        return self._io, self._asm, self._gather

    def lookahead(self, gather: Callable[[int], R], count: int) -> Iterator[R]:
        """Yield gather(0), ..., gather(count - 1), computing up to BATCH_LOOKAHEAD ahead."""
        if self.reader_threads == 0:
            yield from (gather(i) for i in range(count))
            return
        pool = self._pools()[2]
        pending: deque[Future] = deque(
            pool.submit(gather, i) for i in range(min(BATCH_LOOKAHEAD, count))
        )
        try:
            for nxt in range(BATCH_LOOKAHEAD, count + BATCH_LOOKAHEAD):
                result = pending.popleft().result()
                if nxt < count:
                    pending.append(pool.submit(gather, nxt))
                yield result
        finally:
            for future in pending:  # abandoned iteration
                future.cancel()

    def launch(
        self,
        plan: P,
        jobs: Callable[[P], list[Callable[[], Any]]],
        assemble: Callable[[P, list[Any]], R],
    ) -> Future:
        """Submit a plan's read jobs and its assembly; the future of `assemble(plan, results)`."""
        io, asm, _ = self._pools()
        futures = [io.submit(job) for job in jobs(plan)]
        # The assembler only waits on reader futures already queued: no pool deadlock.
        return asm.submit(lambda: assemble(plan, [f.result() for f in futures]))

    def map_rounds(
        self,
        plans: Iterable[P],
        jobs: Callable[[P], list[Callable[[], Any]]],
        assemble: Callable[[P, list[Any]], R],
        first: Future | None = None,
        then: Callable[[], None] | None = None,
    ) -> Iterator[R]:
        """Yield `assemble(plan, [job() for job in jobs(plan)])` for each plan, in order.

        `first`: a round launched earlier (`launch`), yielded before `plans`. `then()` runs once
        every plan has been launched, while the last rounds are still being read (the stream
        launches the next epoch's first round there).
        """
        if self.reader_threads == 0:
            for plan in plans:
                yield assemble(plan, [job() for job in jobs(plan)])
            return
        pending: deque[Future] = deque([first] if first is not None else [])
        source = iter(plans)
        try:
            for plan in source:
                pending.append(self.launch(plan, jobs, assemble))
                if len(pending) > self.prefetch_rounds:
                    yield pending.popleft().result()
            if then is not None:
                then()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:  # abandoned iteration: drop rounds not yet started
                future.cancel()

    def close(self) -> None:
        """Cancel queued work and wait for the running jobs (at most one per thread).

        Not waiting would leave prefetch reads running after close, taking CPU from whatever
        runs next (a resumed stream's first round would be read beside them, slower).
        """
        for pool in (self._io, self._asm, self._gather):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._io = self._asm = self._gather = None
