"""/v1/files: upload, list, retrieve, download and delete files (OpenAI's Files API, for the
Batch API's input and output files). Thin: parse, ask ``batch_api/service.py``, return."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from emb_model_provider.batch_api.protocol import FileDeleted, FileList, FileObject
from emb_model_provider.batch_api.service import BatchJobs, Owner
from emb_model_provider.core.errors import InvalidRequest
from emb_model_provider.protocol import ErrorResponse
from emb_model_provider.security.keys import ApiKey

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409)
}


async def _jobs(request: Request) -> BatchJobs:
    jobs: BatchJobs = request.app.state.batch_jobs
    return jobs


async def _owner(request: Request) -> Owner:
    """The caller, as the store knows them: the digest of their API key (never the key), or
    ``""`` when the API is open. Files and batches are private to it. (``async``, like those of
    ``api/deps.py``: no thread-pool hop.)"""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None:
        return Owner("")
    return Owner(key.digest.hex(), key.models)


JobsDep = Annotated[BatchJobs, Depends(_jobs)]
OwnerDep = Annotated[Owner, Depends(_owner)]


def _expires_after(form_anchor: object, form_seconds: object) -> int | None:
    if form_anchor is None and form_seconds is None:
        return None
    if form_anchor != "created_at":
        raise InvalidRequest(
            "Invalid value for 'expires_after[anchor]': the only anchor is 'created_at'.",
            param="expires_after",
        )
    if not isinstance(form_seconds, str) or not form_seconds.strip().isdigit():
        raise InvalidRequest(
            "Invalid value for 'expires_after[seconds]': a whole number of seconds is needed.",
            param="expires_after",
        )
    return int(form_seconds)


#: The form the route reads itself (so that its errors are OpenAI's), for the API docs.
_UPLOAD_FORM = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["batch"]},
                        "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                        "expires_after[seconds]": {"type": "integer"},
                    },
                }
            }
        },
    }
}


@router.post(
    "/v1/files",
    response_model=FileObject,
    responses=_ERRORS,
    summary="Upload a file.",
    openapi_extra=_UPLOAD_FORM,
)
async def create_file(request: Request, jobs: JobsDep, owner: OwnerDep) -> FileObject:
    # multipart/form-data with ``file`` and ``purpose``, as the OpenAI SDK sends it; Starlette
    # spools the file to disk past 1 MiB, and the service copies it into the store.
    try:
        form = await request.form(max_files=1, max_fields=8)
    except AssertionError as exc:  # Starlette's way of saying python-multipart is missing
        raise InvalidRequest(str(exc)) from exc
    except Exception as exc:  # a body that is not multipart, or a malformed one
        raise InvalidRequest(
            f"Could not read the upload: send multipart/form-data with 'file' and 'purpose' "
            f"({exc}).",
        ) from exc
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("Missing required parameter: 'file'.", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("Missing required parameter: 'purpose'.", param="purpose")
        expires_after_s = _expires_after(
            form.get("expires_after[anchor]"), form.get("expires_after[seconds]")
        )
        return await jobs.upload(
            owner,
            filename=upload.filename or "upload.jsonl",
            purpose=purpose,
            source=upload.file,
            expires_after_s=expires_after_s,
        )
    finally:
        await form.close()


@router.get("/v1/files", response_model=FileList, responses=_ERRORS, summary="List files.")
async def list_files(
    jobs: JobsDep,
    owner: OwnerDep,
    *,
    purpose: str | None = None,
    limit: int = 10_000,
    order: str = "desc",
    after: str | None = None,
) -> FileList:
    return await jobs.list_files(owner, purpose=purpose, limit=limit, order=order, after=after)


@router.get(
    "/v1/files/{file_id}", response_model=FileObject, responses=_ERRORS, summary="Get a file."
)
async def retrieve_file(file_id: str, jobs: JobsDep, owner: OwnerDep) -> FileObject:
    return await jobs.retrieve_file(owner, file_id)


@router.get("/v1/files/{file_id}/content", responses=_ERRORS, summary="Get the contents of a file.")
async def file_content(file_id: str, jobs: JobsDep, owner: OwnerDep) -> FileResponse:
    path = await jobs.file_content(owner, file_id)
    # Read in a worker thread by Starlette, a chunk at a time: files may be hundreds of MB.
    return FileResponse(path, media_type="application/octet-stream")


@router.delete(
    "/v1/files/{file_id}", response_model=FileDeleted, responses=_ERRORS, summary="Delete a file."
)
async def delete_file(file_id: str, jobs: JobsDep, owner: OwnerDep) -> FileDeleted:
    return await jobs.delete_file(owner, file_id)
