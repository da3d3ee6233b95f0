"""/v1/batches: create, list, retrieve and cancel Batch API jobs of /v1/embeddings requests.
Thin: parse, ask ``batch_api/service.py``, return; ``batch_api/runner.py`` does the work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse
from starlette.applications import Starlette

from emb_model_provider.api import files
from emb_model_provider.api.exceptions import validation_message
from emb_model_provider.api.files import JobsDep, OwnerDep
from emb_model_provider.batch_api.protocol import BatchList, BatchObject, CreateBatchRequest
from emb_model_provider.batch_api.runner import BatchRunner
from emb_model_provider.batch_api.service import BatchJobs, FileLimits
from emb_model_provider.core import tracing
from emb_model_provider.core.config import Settings
from emb_model_provider.protocol import ErrorResponse
from emb_model_provider.registry import Registry
from emb_model_provider.services.embedding_service import EmbeddingService
from emb_model_provider.services.rerank_service import RerankService

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409)
}


def _batch(batch: BatchObject) -> JSONResponse:
    # Fields without a value are left out: the specification types them as plain integers
    # and strings, and the SDK reads a missing optional field as None.
    return JSONResponse(batch.model_dump(mode="json", exclude_none=True))


@router.post(
    "/v1/batches", response_model=BatchObject, responses=_ERRORS, summary="Create a batch."
)
async def create_batch(body: CreateBatchRequest, jobs: JobsDep, owner: OwnerDep) -> JSONResponse:
    return _batch(await jobs.create_batch(owner, body))


@router.get("/v1/batches", response_model=BatchList, responses=_ERRORS, summary="List batches.")
async def list_batches(
    jobs: JobsDep, owner: OwnerDep, after: str | None = None, limit: int = 20
) -> JSONResponse:
    listed = await jobs.list_batches(owner, limit=limit, after=after)
    return JSONResponse(listed.model_dump(mode="json", exclude_none=True))


@router.get(
    "/v1/batches/{batch_id}", response_model=BatchObject, responses=_ERRORS, summary="Get a batch."
)
async def retrieve_batch(batch_id: str, jobs: JobsDep, owner: OwnerDep) -> JSONResponse:
    return _batch(await jobs.retrieve_batch(owner, batch_id))


@router.post(
    "/v1/batches/{batch_id}/cancel",
    response_model=BatchObject,
    responses=_ERRORS,
    summary="Cancel a batch.",
)
async def cancel_batch(batch_id: str, jobs: JobsDep, owner: OwnerDep) -> JSONResponse:
    return _batch(await jobs.cancel_batch(owner, batch_id))


def install_batch_api(
    app: FastAPI,
    settings: Settings,
    service: EmbeddingService,
    registry: Registry,
    tracer: tracing.AppTracer | None = None,
    *,
    rerank: RerankService | None = None,
) -> BatchJobs:
    """The Files and Batch routes, ``app.state.batch_jobs``, and the job runner in the app's
    lifespan: it starts after the app's own start-up (resuming the jobs a previous process left
    running) and stops before the app's own shutdown closes the models, leaving unfinished jobs
    as they are for the next start."""
    jobs = BatchJobs(
        settings.data_dir,
        FileLimits(
            max_file_bytes=settings.batch_max_file_bytes, max_lines=settings.batch_max_lines
        ),
    )
    runner = BatchRunner(
        jobs,
        service,
        registry,
        describe_invalid=validation_message,  # a bad line reads as the route's 400 would
        max_concurrent_jobs=settings.batch_max_concurrent_jobs,
        line_concurrency=settings.batch_line_concurrency,
        tracer=tracer,
        rerank=rerank,
    )
    app.state.batch_jobs = jobs
    app.include_router(files.router)
    app.include_router(router)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Starlette) -> AsyncIterator[None]:
        async with inner(app_):
            task = asyncio.create_task(runner.run(), name="batch-runner")
            try:
                yield
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await asyncio.to_thread(jobs.close)

    app.router.lifespan_context = lifespan
    return jobs
