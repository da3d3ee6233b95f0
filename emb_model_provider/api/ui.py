"""The web console at /ui/: plain HTML, CSS and JavaScript shipped inside the package
(``emb_model_provider/ui/``), with no build step and nothing loaded from elsewhere.

The page is public (``api/auth.py`` lets ``/ui`` and ``/ui/...`` through without a key): it holds
no data. Every API call it makes carries the key the operator types into it, kept in the browser
tab's ``sessionStorage`` only. A strict Content-Security-Policy allows scripts, styles and
connections to this origin only, and no inline script or style.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

router = APIRouter(include_in_schema=False)

#: Images are data: URIs (dropped files are read in the browser) and blob: previews.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

#: The files the console is made of and their content types; nothing else is served.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate on every load (cheap: 304 by ETag), so an upgraded server is seen at once.
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def _asset(name: str) -> Asset:
    """The file's bytes, read from the installed package on first use (never at import)."""
    body = resources.files("emb_model_provider").joinpath("ui", name).read_bytes()
    return Asset(body, ASSETS[name], f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _serve(name: str, request: Request) -> Response:
    asset = _asset(name)
    headers = {**_SECURITY_HEADERS, "ETag": asset.etag}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.body, media_type=asset.media_type, headers=headers)


@router.get("/ui")
async def console_redirect() -> RedirectResponse:
    # The page's links are relative to /ui/.
    return RedirectResponse("/ui/", status_code=308)


@router.get("/ui/")
async def console_page(request: Request) -> Response:
    return _serve("index.html", request)


@router.get("/ui/{name}")
async def console_asset(name: str, request: Request) -> Response:
    if name not in ASSETS:
        raise StarletteHTTPException(404)
    return _serve(name, request)
