"""Error bodies by route: each ecosystem's clients parse their own shape, so the routes that speak
another wire format answer errors in it. The status codes are the same everywhere
(``api/exceptions.py`` maps exceptions to them once); only the body differs.

- OpenAI (every route not listed): ``{"error": {"message", "type", "param", "code"}}``.
- Cohere (``cohere`` SDK): ``{"id", "message"}``; the SDK raises ``BadRequestError`` and the
  like with this body, our message in ``body["message"]``.
- TEI (text-embeddings-inference; huggingface_hub's ``InferenceClient`` reads ``error``):
  ``{"error", "error_type"}``, ``error_type`` one of TEI's ``Validation``, ``Overloaded``,
  ``Unhealthy``, ``Backend``.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

ErrorShape = Literal["openai", "cohere", "tei"]

#: POST routes in another wire format -> the error shape their clients parse.
ROUTE_SHAPES: dict[str, ErrorShape] = {
    "/v1/embed": "cohere",
    "/v2/embed": "cohere",
    "/embed": "tei",
    "/embed_sparse": "tei",
    "/": "tei",  # POST /: TEI's root route, what InferenceClient(base_url=...) calls
}

_TEI_TYPES = {
    400: "Validation",
    404: "Validation",
    413: "Validation",
    429: "Overloaded",
    503: "Unhealthy",
}


def shape_of(method: str, path: str) -> ErrorShape:
    return ROUTE_SHAPES.get(path, "openai") if method == "POST" else "openai"


def error_body(
    shape: ErrorShape,
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None,
    code: str | None,
    request_id: str | None = None,
) -> dict[str, Any]:
    if shape == "cohere":
        return {"id": request_id or uuid.uuid4().hex, "message": message}
    if shape == "tei":
        return {"error": message, "error_type": _TEI_TYPES.get(status, "Backend")}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
