"""Adaptive batching inside the serving process: the requests that arrive while a batch runs form the next.

BentoML 1.4 batches a public endpoint's calls only when it awaits a batchable endpoint of the same service,
and that call goes through BentoML's HTTP client into its own ASGI app: the request is serialized, routed,
validated and parsed a second time. On this 2-core CPU that path cost 5.0 ms of CPU per request against
2.1 ms for a direct call, with a no-op model (200 vs 477 requests/s, 10 clients). `RequestBatcher` batches
the parsed requests in the worker instead, and runs each batch in a thread or in the worker's model process
(`fusionrank.model_process`, which receives the batch pickled):

- the first request to arrive while the model is idle runs at once, alone (no waiting for company: on a CPU
  a batch costs about the sum of its requests, so a wait would add latency and save nothing);
- requests that arrive while a batch runs queue up, and run together, up to `max_batch_size`, as the next
  batch. The batch size follows the load: 1 when the server is idle, larger under load.

A batch that fails is run again one request at a time, so one bad request fails alone. A request whose
caller has gone (its future cancelled) before its batch starts is left out.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class RequestBatcher(Generic[T, R]):
    """Runs `run_batch(items) -> results` (same length, same order) on batches of submitted items, one
    batch at a time, in a worker thread, or in `executor` (a process pool: `run_batch` must then be a
    module-level function); `on_batch(size)` is told each batch's size (for a metric)."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        max_batch_size: int,
        on_batch: Callable[[int], None] | None = None,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._executor = executor
        self._queue: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._draining: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        """The result for `item`, computed in a batch with the items queued beside it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._queue.append((item, future))
        if self._draining is None or self._draining.done():
            self._draining = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self._queue:
            jobs = []
            while self._queue and len(jobs) < self.max_batch_size:
                item, future = self._queue.popleft()
                if not future.done():  # its caller has gone: nothing to compute
                    jobs.append((item, future))
            if not jobs:
                continue
            if self._on_batch is not None:
                self._on_batch(len(jobs))
            items = [item for item, _ in jobs]
            try:
                outcomes = await asyncio.get_running_loop().run_in_executor(
                    self._executor, run_isolated, self._run_batch, items
                )
            except Exception as exc:  # the executor failed, not a request: every caller hears of it
                outcomes = [(False, exc)] * len(jobs)
            for (_, future), (ok, value) in zip(jobs, outcomes, strict=True):
                if future.done():
                    continue
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)


def run_isolated(run_batch: Callable[[list[T]], Sequence[R]], items: list[T]) -> list[tuple[bool, object]]:
    """Each item's (True, result) or (False, exception): a failed batch is retried item by item."""
    try:
        results = list(run_batch(items))
    except Exception as exc:  # handed to the callers' futures
        if len(items) == 1:
            return [(False, exc)]
        return [outcome for item in items for outcome in run_isolated(run_batch, [item])]
    if len(results) != len(items):
        error = RuntimeError(f"a batch of {len(items)} requests gave {len(results)} results")
        return [(False, error)] * len(items)
    return [(True, result) for result in results]
