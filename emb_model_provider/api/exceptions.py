"""The one mapping from exceptions to OpenAI's error body and status code.

``{"error": {"message", "type", "param", "code"}}`` for every failure, FastAPI's own included:
a body that does not validate is OpenAI's 400 ``invalid_request_error`` (never FastAPI's 422
``{"detail": ...}``), with ``param`` taken from the pydantic location.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from emb_model_provider.api.error_shapes import error_body, shape_of
from emb_model_provider.core.errors import ProviderError

logger = logging.getLogger(__name__)

_INPUT_SHAPES = (
    "a non-empty string, an array of non-empty strings, an array of integers (token ids) or an "
    "array of non-empty arrays of integers"
)


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    request: Request | None = None,
) -> JSONResponse:
    """OpenAI's error body, or on a route of another wire format that format's
    (``api/error_shapes.py``)."""
    shape = shape_of(request.method, request.url.path) if request is not None else "openai"
    # A message may quote what the client sent (an unknown model's name); a lone surrogate in it
    # would fail the response's UTF-8 encoding and turn the error into a 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    request_id = getattr(request.state, "request_id", None) if request is not None else None
    body = error_body(
        shape, status, message, type_=type_, param=param, code=code, request_id=request_id
    )
    return JSONResponse(body, status_code=status, headers=headers)


def _provider_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProviderError)
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return error_response(
        exc.status_code,
        exc.message,
        type_=exc.type,
        param=exc.param,
        code=exc.code,
        headers=headers,
        request=request,
    )


def _path(loc: Sequence[Any]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif not text:
            text = str(part)
        elif part.startswith(("list[", "str", "int", "function-")) or "[" in part:
            continue  # pydantic names the union member it tried; users did not write those
        else:
            text += f".{part}"
    return text


def _body_loc(error: dict[str, Any]) -> list[Any]:
    loc = list(error.get("loc", ()))
    return loc[1:] if loc and loc[0] == "body" else loc


_EMPTY = {"string_too_short": "string", "too_short": "array"}


def _only_emptiness(errors: Sequence[dict[str, Any]]) -> tuple[str, str] | None:
    """Where ``input`` is empty, if some shape of the union fails only for emptiness.

    pydantic reports every member of the ``input`` union (``loc[1]`` names the member); the one
    that fails only because something is empty is the shape the client meant (``["a", ""]`` is
    an array of strings with an empty one; ``["a", []]`` is no shape at all).
    """
    members: dict[str, list[dict[str, Any]]] = {}
    for error in errors:
        loc = _body_loc(error)
        if len(loc) >= 2 and loc[0] == "input":
            members.setdefault(str(loc[1]), []).append(error)
    for failures in members.values():
        if all(failure.get("type") in _EMPTY for failure in failures):
            first = failures[0]
            return _path(["input", *_body_loc(first)[2:]]), _EMPTY[str(first["type"])]
    return None


def validation_message(errors: Sequence[dict[str, Any]]) -> tuple[str, str | None]:
    """A readable message and the ``param`` for a failed request body."""
    first = errors[0]
    loc = _body_loc(first)
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", "invalid")
        return (
            "We could not parse the JSON body of your request. The API expects a JSON payload, "
            f"but what was sent was not valid JSON ({reason}).",
            None,
        )
    if first.get("type") == "value_error" and not loc:  # a model validator's own words
        return (f"{str(first.get('msg', 'invalid')).removeprefix('Value error, ')}.", None)
    if not loc:
        return ("The request body must be a JSON object with 'model' and 'input'.", None)
    for error in errors:  # a string that is no text, whichever union member reported it
        if error.get("type") == "string_unicode":
            at = _body_loc(error)
            return (
                f"Invalid value for '{_path(at)}': the text is not valid Unicode (it holds a "
                "lone surrogate, such as the JSON escape \\ud800 unpaired); send well-formed "
                "UTF-8 text.",
                str(at[0]),
            )
    param = str(loc[0])
    if first.get("type") == "missing":
        return (f"Missing required parameter: '{param}'.", param)
    if param == "input":
        empty = _only_emptiness(errors)
        if empty is not None:
            where, what = empty
            return (f"Invalid value for '{where}': it cannot be an empty {what}.", param)
        return (f"Invalid type for 'input': expected {_INPUT_SHAPES}.", param)
    return (f"Invalid value for '{_path(loc)}': {first.get('msg', 'invalid')}.", param)


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    message, param = validation_message(list(exc.errors()))
    return error_response(400, message, type_="invalid_request_error", param=param, request=request)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(
        exc.status_code,
        message,
        type_="invalid_request_error",
        headers=dict(exc.headers) if exc.headers else None,
        request=request,
    )


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Set by api/middleware.py; this handler runs outside it (in FastAPI's ServerErrorMiddleware),
    # so it also puts the id on the response itself.
    request_id = str(getattr(request.state, "request_id", "") or uuid.uuid4().hex)
    logger.error(
        "unhandled error in %s %s (request %s)",
        request.method,
        request.url.path,
        request_id,
        exc_info=exc,
    )
    return error_response(
        500,
        f"The server had an error while processing your request (request id {request_id}).",
        type_="server_error",
        code="internal_error",
        headers={"X-Request-ID": request_id},
        request=request,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProviderError, _provider_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
