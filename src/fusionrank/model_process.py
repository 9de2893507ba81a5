"""The served model, loaded in the process that runs it: the worker's own, or a process of its own.

A served request costs Python in two places: BentoML's HTTP handling (about 2.1 ms of CPU a request on
this 2-core CPU, `fusionrank.batching`) and the ranking (about 2.6 ms of Python a request, besides the
native calls that release the GIL). In one process the two take turns on one GIL, and the event loop that
parses the next requests waits while a batch runs its Python, and the batch while the loop parses. With
`FUSIONRANK_MODEL_PROCESS=on` (the default) the worker starts a model process (`ModelProcess`): the worker
keeps the HTTP side, the model process loads the bundle and ranks the batches the worker's
`RequestBatcher` sends it, and each has a core. The worker never loads the model then. BentoML's own way to
split a service in two, a dependent service, would put a second HTTP pass on every request (5.0 ms of CPU
against 2.1 ms, `fusionrank.batching`); here a batch crosses as one pickle through a pipe
(`concurrent.futures.ProcessPoolExecutor`).

The functions below run in whichever process loaded the model (`start`): the model process, or the worker
itself with `FUSIONRANK_MODEL_PROCESS=off`. They are module functions, so that a process pool can name them.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from fusionrank.serving_logic import RankingLogic, RankRequest, RankResponse

_LOGIC: RankingLogic | None = None
# the served ranker's logger (serving/service.py): `bentoml serve` prints its lines with the worker's name
LOG = logging.getLogger("bentoml.fusionrank")


def build_logic(bundle: Path, tag: str) -> RankingLogic:
    """The ranking logic of a bundle with its online store, configured by the FUSIONRANK_* settings."""
    from fusionrank.ranker import Ranker
    from fusionrank.serving_logic import ServingSettings, limit_threads, open_online_store, torch_threads

    threads = torch_threads()
    if threads is not None:
        limit_threads(threads)
    settings = ServingSettings.from_env()
    ranker = Ranker.load(bundle, int8=settings.int8)
    return RankingLogic(ranker, tag, open_online_store(ranker, settings), settings)


def start(bundle: str, tag: str) -> None:
    """Load a bundle (`bundle`: its directory; `tag`: the model version its answers name) in this process."""
    global _LOGIC
    _LOGIC = build_logic(Path(bundle), tag)


def warm_up() -> str | None:
    """Rank one request (`RankingLogic.warm_up`: the error it met, if any), then freeze what is loaded.

    The loaded model and the opened store live as long as the process: frozen, their objects are left out of
    every later garbage collection, whose pause otherwise grows with them (one such pause stalls every
    request in flight)."""
    failed = _logic().warm_up()
    gc.collect()
    gc.freeze()
    return failed


def rank_batch(requests: Sequence[RankRequest]) -> list[RankResponse]:
    """`RankingLogic.rank_batch` with the model this process loaded."""
    return _logic().rank_batch(requests)


def plain_request(request: RankRequest) -> RankRequest:
    """The request as a `RankRequest` itself: BentoML hands an endpoint an instance of a subclass it makes at
    run time, which pickle cannot find by name to send to another process."""
    if type(request) is RankRequest:
        return request
    return RankRequest.model_construct(request.model_fields_set, **request.__dict__)


def _logic() -> RankingLogic:
    if _LOGIC is None:
        raise RuntimeError("no model is loaded in this process (fusionrank.model_process.start)")
    return _LOGIC


class ModelProcess(Executor):
    """One child process that runs `initializer(*initargs)` once, then the calls submitted to it, one at a
    time and in order. A child that dies (killed, out of memory) fails the calls it held with
    `BrokenProcessPool`; the next call starts a new child, which runs the initializer again.

    The child is spawned, not forked: the worker has an event loop and library threads a fork would copy
    in an unknown state."""

    def __init__(self, initializer: Callable[..., Any], initargs: tuple[Any, ...] = ()) -> None:
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._pool = self._new_pool()
        self.restarts = 0

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=self._initializer,
            initargs=self._initargs,
        )

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        with self._lock:
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except BrokenProcessPool:
                self._pool.shutdown(wait=False)
                self._pool = self._new_pool()
                self.restarts += 1
                LOG.warning("the model process had stopped: a new one starts (restart %d)", self.restarts)
                return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
