"""The fusionrank ranker as one BentoML service.

POST /rank        one request (query and/or user_id, optional candidates, k); adaptively batched in the
                  worker (`fusionrank.batching.RequestBatcher`): the requests that arrive while a batch runs
                  form the next one. Batch sizes: the `fusionrank_rank_batch_size` histogram.
POST /rank_batch  a list of requests in, a list of rankings out; BentoML's own adaptive batching merges
                  the lists of concurrent callers.
GET /healthz /readyz /livez /metrics come with BentoML.

Worker processes: FUSIONRANK_WORKERS (default 1), read when this module is imported. Each worker starts a
model process of its own that loads the model and ranks the worker's batches, while the worker handles HTTP
(`fusionrank.model_process`; FUSIONRANK_MODEL_PROCESS=off loads and runs the model in the worker). The model
runs torch and BLAS with one thread (unless OMP_NUM_THREADS says otherwise: see `torch_threads`).

The model is declared at class scope, so a Bento built from this file carries it. Which model: the `model`
argument (`bentoml build|serve --arg model=fusionrank-ranker:<version>`; `fusionrank.packaging` pins the
exact tag), else the newest `fusionrank-ranker`. Deployment settings come from FUSIONRANK_* variables, read
when the service starts (`fusionrank.serving_logic.ServingSettings`).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import bentoml
from bentoml.exceptions import ServiceUnavailable
from pydantic import BaseModel

from fusionrank.packaging import BUNDLE_DIR
from fusionrank.serving_logic import RankRequest, RankResponse, serving_workers

# Requests one batch may hold, and how long the batcher may hold a request. The batcher answers 503 to a
# request it expects to wait longer than MAX_LATENCY_MS (see STACK-NOTES): at 10 s, one in 60 requests was
# refused with MiniLM on a loaded 2-core CPU. Past the request timeout waiting is pointless: the same 60 s.
MAX_BATCH_SIZE = 32
REQUEST_TIMEOUT_S = 60
MAX_LATENCY_MS = REQUEST_TIMEOUT_S * 1000


class ServiceArgs(BaseModel):
    model: str = "fusionrank-ranker:latest"


ARGS = bentoml.use_arguments(ServiceArgs)
# under BentoML's logger, whose INFO lines `bentoml serve` prints with the worker's name (a module logger's
# INFO lines it drops)
LOG = logging.getLogger("bentoml.fusionrank")
WORKERS = serving_workers(os.environ)


@bentoml.service(
    name="fusionrank",
    workers=WORKERS,
    traffic={"timeout": REQUEST_TIMEOUT_S},
)
class FusionRanker:
    """Ranks products for a query and/or a user with the fused BERT + traditional-signal model."""

    bundle = bentoml.models.BentoModel(ARGS.model)

    def __init__(self) -> None:
        from prometheus_client import Histogram

        from fusionrank import model_process
        from fusionrank.batching import RequestBatcher
        from fusionrank.serving_logic import ServingSettings

        settings = ServingSettings.from_env()
        load = (str(Path(self.bundle.path) / BUNDLE_DIR), str(self.bundle.tag))
        started = time.perf_counter()
        # Where the model runs, one call at a time and in order, for both endpoints: a process of its own, or
        # (FUSIONRANK_MODEL_PROCESS=off) one thread of this worker.
        self._model: Executor
        if settings.model_process:
            self._model = model_process.ModelProcess(model_process.start, load)
            try:
                failed = self._model.submit(model_process.warm_up).result()
            except BrokenProcessPool as exc:
                raise RuntimeError(
                    f"the model process could not load {self.bundle.tag} (its error is logged above)"
                ) from exc
            LOG.info("the model runs in process %d", self._model.submit(os.getpid).result())
        else:
            self._model = ThreadPoolExecutor(1, thread_name_prefix="fusionrank-model")
            model_process.start(*load)
            failed = model_process.warm_up()
        # before BentoML reports the worker ready: its first callers must not wait for the store to open
        if failed:
            LOG.warning("the warm-up request failed (serving anyway): %s", failed)
        else:
            LOG.info("model loaded and warm-up request ranked in %.2f s", time.perf_counter() - started)
        # created here, in the worker, after BentoML has set up the multiprocess metrics directory
        sizes = Histogram(
            "fusionrank_rank_batch_size",
            "Requests per model call of POST /rank (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        # Without adaptive batching, one request at a time runs the model, as a plain synchronous endpoint
        # would.
        self._batcher = RequestBatcher(
            model_process.rank_batch,
            MAX_BATCH_SIZE if settings.adaptive_batching else 1,
            on_batch=sizes.observe,
            executor=self._model,
        )
        # the worker's own long-lived objects (BentoML's app, the schemas) out of later collections too, as
        # `model_process.warm_up` did for the model where it loaded it
        gc.collect()
        gc.freeze()

    @bentoml.on_shutdown
    def _stop_model(self) -> None:
        self._model.shutdown(cancel_futures=True)

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def rank_batch(self, requests: list[RankRequest]) -> list[RankResponse]:
        """Rank several requests in one model call."""
        from fusionrank import model_process

        plain = [model_process.plain_request(request) for request in requests]
        try:
            return self._model.submit(model_process.rank_batch, plain).result()
        except BrokenProcessPool as exc:
            raise _model_process_stopped() from exc

    @bentoml.api
    async def rank(self, request: RankRequest, /) -> RankResponse:
        """Rank products for one request."""
        from fusionrank import model_process

        try:
            return await self._batcher.submit(model_process.plain_request(request))
        except BrokenProcessPool as exc:
            raise _model_process_stopped() from exc


def _model_process_stopped() -> ServiceUnavailable:
    LOG.error("the model process stopped while it ranked a batch; the next batch starts a new one")
    return ServiceUnavailable(
        "the model process stopped while it ranked this request; it is being started again: retry"
    )


def _schema_once(spec: type) -> None:
    """Compute an output spec's JSON schema once: BentoML rebuilds a list output's schema on every call (on
    the server to name the media type, in its client to parse the answer), which cost a call to /rank_batch
    an eighth of a worker's CPU under load."""
    schema = spec.model_json_schema()
    compute = spec.model_json_schema

    def model_json_schema(*args: object, **kwargs: object) -> dict:
        return dict(schema) if not args and not kwargs else compute(*args, **kwargs)

    spec.model_json_schema = staticmethod(model_json_schema)  # the same on the class and its instances


_schema_once(FusionRanker.apis["rank_batch"].output_spec)
