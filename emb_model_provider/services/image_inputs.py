"""Image inputs to bytes: inline data URIs and base64 decoded, URLs fetched concurrently through
the SSRF-safe fetcher. Errors name the input that failed (its index or id). A traced request
gets a span per URL with its host, never its query (it may hold a signature or a token).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind

from emb_model_provider.core import tracing
from emb_model_provider.core.errors import InvalidRequest, UpstreamFailed
from emb_model_provider.inputs.images import (
    ImageInputError,
    InlineImage,
    UrlImage,
    parse_image_reference,
)
from emb_model_provider.security.fetch import FetchError, ImageFetcher

#: Concurrent URL fetches per request.
_FETCHES_PER_REQUEST = 16


class ImageLoader:
    def __init__(self, fetcher: ImageFetcher, *, max_bytes: int) -> None:
        self._fetcher = fetcher
        self._max_bytes = max_bytes

    async def load(self, values: Sequence[str | bytes], labels: Sequence[str]) -> list[bytes]:
        """The bytes of each image; ``labels`` name the inputs in errors (``input[3]``, an id).

        A value is an http(s) URL, a data URI or base64 text, or the image's bytes (uploads)."""
        refs: list[UrlImage | InlineImage] = []
        for value, label in zip(values, labels, strict=True):
            if isinstance(value, bytes):
                refs.append(InlineImage(data=value, media_type=None, kind="base64"))
                continue
            try:
                refs.append(parse_image_reference(value, max_bytes=self._max_bytes))
            except ImageInputError as exc:
                raise InvalidRequest(
                    f"{label}: {exc.message}", param="input", code=exc.code
                ) from exc
        limit = asyncio.Semaphore(_FETCHES_PER_REQUEST)

        async def one(ref: UrlImage | InlineImage, label: str) -> bytes:
            if isinstance(ref, InlineImage):
                return ref.data
            async with limit:
                with tracing.span(
                    "image.fetch", _url_attributes(ref.url), kind=SpanKind.CLIENT
                ) as current:
                    try:
                        data = await self._fetcher.fetch(ref.url)
                    except FetchError as exc:
                        kind = InvalidRequest if exc.status == 400 else UpstreamFailed
                        raise kind(f"{label}: {exc.message}", param="input", code=exc.code) from exc
                    if current is not None:
                        current.set_attribute("http.response.body.size", len(data))
                    return data

        tasks = [
            asyncio.ensure_future(one(ref, label)) for ref, label in zip(refs, labels, strict=True)
        ]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one failure: the other fetches need not go on
                task.cancel()

    async def aclose(self) -> None:
        await self._fetcher.aclose()


def _url_attributes(url: str) -> tracing.Attributes | None:
    """Host, port, scheme and the URL without credentials, query or fragment; ``None`` (no work)
    when the request is not traced."""
    if not tracing.active():
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # not a port: the fetcher refuses the URL, the span still names the host
        return {"server.address": host, "url.scheme": parts.scheme}
    shown = f"[{host}]" if ":" in host else host
    return {
        "server.address": host,
        "server.port": port,
        "url.scheme": parts.scheme,
        "url.full": f"{parts.scheme}://{shown}:{port}{parts.path}",
    }
