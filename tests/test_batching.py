"""The serving process's adaptive batcher, and the worker settings of the served ranker."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from fusionrank.batching import RequestBatcher
from fusionrank.errors import ConfigError
from fusionrank.model_process import ModelProcess
from fusionrank.serving_logic import (
    ServingSettings,
    fusion_threads,
    limit_threads,
    serving_workers,
    torch_threads,
)


class SlowModel:
    """Doubles numbers, one batch at a time; the first batch waits until the test lets it go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if len(self.batches) == 1:
            assert self.release.wait(10)
        if any(item < 0 for item in items):
            raise ValueError(f"negative input in {items}")
        return [2 * item for item in items]


async def _queued(batcher: RequestBatcher, items: list[int]) -> list[asyncio.Task]:
    tasks = [asyncio.ensure_future(batcher.submit(item)) for item in items]
    await asyncio.sleep(0.05)  # every submit has queued (the first batch is still held)
    return tasks


def test_requests_arriving_while_a_batch_runs_form_the_next_batch() -> None:
    model = SlowModel()

    async def scenario() -> list[int]:
        batcher = RequestBatcher(model, max_batch_size=32)
        first = await _queued(batcher, [1])
        rest = await _queued(batcher, [2, 3, 4])
        model.release.set()
        return await asyncio.gather(*first, *rest)

    assert asyncio.run(scenario()) == [2, 4, 6, 8]
    assert model.batches == [[1], [2, 3, 4]]


def test_a_batch_holds_at_most_max_batch_size_requests() -> None:
    model = SlowModel()
    sizes: list[int] = []

    async def scenario() -> list[int]:
        batcher = RequestBatcher(model, max_batch_size=2, on_batch=sizes.append)
        first = await _queued(batcher, [0])
        rest = await _queued(batcher, [1, 2, 3, 4])
        model.release.set()
        return await asyncio.gather(*first, *rest)

    assert asyncio.run(scenario()) == [0, 2, 4, 6, 8]
    assert model.batches == [[0], [1, 2], [3, 4]]
    assert sizes == [1, 2, 2]


def test_a_failing_request_fails_alone() -> None:
    model = SlowModel()

    async def scenario() -> list[object]:
        batcher = RequestBatcher(model, max_batch_size=8)
        first = await _queued(batcher, [1])
        rest = await _queued(batcher, [2, -1, 3])
        model.release.set()
        return await asyncio.gather(*first, *rest, return_exceptions=True)

    one, two, bad, three = asyncio.run(scenario())
    assert (one, two, three) == (2, 4, 6)
    assert isinstance(bad, ValueError)
    assert "negative input in [-1]" in str(bad)
    # the failed batch was run again one request at a time
    assert model.batches == [[1], [2, -1, 3], [2], [-1], [3]]


def test_a_request_whose_caller_has_gone_is_not_computed() -> None:
    model = SlowModel()

    async def scenario() -> list[int]:
        batcher = RequestBatcher(model, max_batch_size=8)
        first = await _queued(batcher, [1])
        gone, kept = await _queued(batcher, [5, 6])
        gone.cancel()
        model.release.set()
        return await asyncio.gather(*first, kept)

    assert asyncio.run(scenario()) == [2, 12]
    assert model.batches == [[1], [6]]


def test_a_wrong_number_of_results_fails_the_batch_with_a_clear_error() -> None:
    async def scenario() -> None:
        batcher = RequestBatcher(lambda items: items[:-1], max_batch_size=4)
        await batcher.submit(1)

    with pytest.raises(RuntimeError, match="a batch of 1 requests gave 0 results"):
        asyncio.run(scenario())
    with pytest.raises(ValueError, match="at least 1"):
        RequestBatcher(lambda items: items, max_batch_size=0)


def doubled_with_pid(items: list[int]) -> list[tuple[int, int]]:
    """A batch function a process pool can name: each item doubled, with the pid of the process."""
    if any(item < 0 for item in items):
        raise ValueError(f"negative input in {items}")
    return [(2 * item, os.getpid()) for item in items]


def test_batches_can_run_in_another_process_and_a_bad_item_still_fails_alone() -> None:
    async def scenario(batcher: RequestBatcher) -> list:
        return await asyncio.gather(*(batcher.submit(item) for item in (1, -1, 3)), return_exceptions=True)

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        one, bad, three = asyncio.run(scenario(RequestBatcher(doubled_with_pid, 8, executor=pool)))
    assert (one[0], three[0]) == (2, 6)
    assert one[1] == three[1] != os.getpid()
    assert isinstance(bad, ValueError)
    assert "negative input in [-1]" in str(bad)


class RefusingExecutor(Executor):
    def submit(self, fn, /, *args, **kwargs):
        raise RuntimeError("the executor is shut down")


def test_an_executor_failure_reaches_every_caller_instead_of_leaving_them_waiting() -> None:
    async def scenario() -> list:
        batcher = RequestBatcher(doubled_with_pid, 8, executor=RefusingExecutor())
        calls = asyncio.gather(*(batcher.submit(item) for item in (1, 2)), return_exceptions=True)
        return await asyncio.wait_for(calls, 10)

    outcomes = asyncio.run(scenario())
    assert [str(outcome) for outcome in outcomes] == ["the executor is shut down"] * 2


_LOADED: list[str] = []


def load_marker(marker: str) -> None:
    _LOADED.append(marker)


def loaded() -> list[str]:
    return list(_LOADED)


def test_the_model_process_loads_once_and_a_dead_one_is_replaced_and_loads_again() -> None:
    process = ModelProcess(load_marker, ("model v1",))
    try:
        first_pid = process.submit(os.getpid).result(timeout=60)
        assert first_pid != os.getpid()
        assert process.submit(loaded).result(timeout=60) == ["model v1"]  # once, not per call
        with pytest.raises(BrokenProcessPool):
            process.submit(os._exit, 3).result(timeout=60)
        # the next call starts a new process, which loads the model again before it runs the call
        assert process.submit(loaded).result(timeout=60) == ["model v1"]
        assert process.submit(os.getpid).result(timeout=60) not in (first_pid, os.getpid())
        assert process.restarts == 1
    finally:
        process.shutdown()


def test_worker_settings(monkeypatch) -> None:
    monkeypatch.setattr("fusionrank.serving_logic._cpu_count", lambda: 2)
    assert serving_workers({}) == 1
    assert serving_workers({"FUSIONRANK_WORKERS": "2"}) == 2
    for bad, message in (("two", "whole number"), ("0", "between 1 and the 2"), ("3", "got 3")):
        with pytest.raises(ConfigError, match=message):
            serving_workers({"FUSIONRANK_WORKERS": bad})
    assert torch_threads({}) == 1
    assert torch_threads({"OMP_NUM_THREADS": "2"}) is None
    # LightGBM's threads: the CPUs shared among the processes running Python (a worker and its model
    # process, or a worker alone)
    assert fusion_threads({}) == 1
    assert fusion_threads({}, model_process=False) == 2
    assert fusion_threads({"FUSIONRANK_WORKERS": "2"}, model_process=False) == 1
    monkeypatch.setattr("fusionrank.serving_logic._cpu_count", lambda: 8)
    assert fusion_threads({"FUSIONRANK_WORKERS": "2"}) == 2
    monkeypatch.setattr("fusionrank.serving_logic._cpu_count", lambda: 1)
    assert fusion_threads({}) == 1
    assert ServingSettings.from_env({}).model_process
    assert not ServingSettings.from_env({"FUSIONRANK_MODEL_PROCESS": "off"}).model_process
    with pytest.raises(ConfigError, match="FUSIONRANK_MODEL_PROCESS must be on or off"):
        ServingSettings.from_env({"FUSIONRANK_MODEL_PROCESS": "maybe"})
    assert ServingSettings.from_env({}).fusion_threads is None
    assert ServingSettings.from_env({"FUSIONRANK_FUSION_THREADS": "3"}).fusion_threads == 3
    for bad, message in (("three", "not a number"), ("0", "at least 1")):
        with pytest.raises(ConfigError, match=message):
            ServingSettings.from_env({"FUSIONRANK_FUSION_THREADS": bad})


def test_the_cpu_count_honours_a_container_quota(tmp_path) -> None:
    from fusionrank.serving_logic import _cpu_count

    unlimited = _cpu_count(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert _cpu_count(quota) == unlimited
    quota.write_text("100000 100000\n")  # one CPU
    assert _cpu_count(quota) == 1
    quota.write_text("50000 100000\n")  # half a CPU still runs one worker
    assert _cpu_count(quota) == 1


def test_limit_threads_caps_torch_and_blas() -> None:
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    with threadpool_limits():  # restores the BLAS limits on leaving
        try:
            limit_threads(1)
            assert torch.get_num_threads() == 1
            blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
            assert blas
            assert all(pool["num_threads"] == 1 for pool in blas)
        finally:
            torch.set_num_threads(before)
