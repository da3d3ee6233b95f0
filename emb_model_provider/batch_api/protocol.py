"""OpenAI wire models of the Files and Batch APIs (pydantic only; the floor api and services share).

Field names, statuses and shapes follow OpenAI's OpenAPI specification (``OpenAIFile``,
``ListFilesResponse``, ``DeleteFileResponse``, ``CreateBatchRequest``, ``Batch``, ``BatchError``,
``BatchRequestCounts``, ``ListBatchesResponse``). Optional fields that have no value are left
out of the JSON rather than sent as ``null``: the specification types them as plain integers
and strings (``output_file_id``, ``completed_at``, ...), and the OpenAI SDK reads a missing
optional field as ``None``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr

BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
#: Statuses a batch never leaves.
TERMINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
FilePurpose = Literal["batch", "batch_output"]
#: The endpoints this server runs in batches (OpenAI's one, and reranking), and the one
#: completion window OpenAI offers.
BATCH_ENDPOINT = "/v1/embeddings"
RERANK_ENDPOINT = "/v1/rerank"
BATCH_ENDPOINTS: tuple[str, ...] = (BATCH_ENDPOINT, RERANK_ENDPOINT)
COMPLETION_WINDOW = "24h"
COMPLETION_WINDOW_S = 24 * 3600
#: Files with purpose ``batch`` expire after 30 days unless the upload says otherwise (OpenAI's
#: default, ``FileExpirationAfter``); output and error files too.
DEFAULT_FILE_TTL_S = 30 * 24 * 3600
MIN_FILE_TTL_S = 3600
MAX_FILE_TTL_S = 30 * 24 * 3600


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: FilePurpose
    #: Deprecated by OpenAI but required by its specification; a stored file is ``processed``.
    status: Literal["uploaded", "processed", "error"] = "processed"


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class ExpiresAfter(BaseModel):
    """``output_expires_after`` of a batch (``BatchFileExpirationAfter``)."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: Annotated[int, Field(ge=MIN_FILE_TTL_S, le=MAX_FILE_TTL_S)]


Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class CreateBatchRequest(BaseModel):
    # Unknown fields are accepted, as on /v1/embeddings (newer SDKs send more).
    model_config = ConfigDict(extra="allow")

    input_file_id: StrictStr
    endpoint: StrictStr
    completion_window: StrictStr
    metadata: Annotated[Metadata, Field(max_length=16)] | None = None
    output_expires_after: ExpiresAfter | None = None


class BatchError(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchError]


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class BatchObject(BaseModel):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = None
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts
    metadata: dict[str, str] | None = None


class BatchList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


def render_output_line(
    line_id: str, custom_id: str, *, status_code: int, request_id: str, body: bytes
) -> bytes:
    """One line of an output or error file for a request that ran (OpenAI's batch output
    format): ``body`` is the endpoint's JSON answer, the embeddings or an error body, as is."""
    return b"".join(
        (
            b'{"id":',
            orjson.dumps(line_id),
            b',"custom_id":',
            orjson.dumps(custom_id),
            b',"response":{"status_code":',
            str(status_code).encode("ascii"),
            b',"request_id":',
            orjson.dumps(request_id),
            b',"body":',
            body,
            b'},"error":null}',
        )
    )


def render_unrun_line(line_id: str, custom_id: str, *, code: str, message: str) -> bytes:
    """A line of the error file for a request that never ran (batch expired or cancelled)."""
    return orjson.dumps(
        {
            "id": line_id,
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def render_error_body(message: str, *, type_: str, param: str | None, code: str | None) -> bytes:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": error})
