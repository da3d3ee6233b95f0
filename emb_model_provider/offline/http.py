"""The HTTP engine: the same job sent to a running server's ``/v1/embeddings`` (for machines
without the model), ``batch_size`` inputs per request and ``concurrency`` requests in flight.

Requests ask for base64 (little-endian float32, what the OpenAI SDK asks for); a sparse (SPLADE)
model's for floats, its vectors coming as ``{"indices", "values"}``. A 400 for a
request of several inputs is split in halves until the bad input is alone, so one bad input
becomes one line in the errors file and the rest of its request is still embedded. 429, 5xx and
transport errors are retried with backoff (``Retry-After`` when the server sends one); a server
that keeps failing stops the job, and a rerun resumes from the finished chunks.
"""

from __future__ import annotations

import base64
import io
import mimetypes
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from emb_model_provider.core.vectors import Vectors
from emb_model_provider.offline.base import BulkError, ChunkResult, empty_vectors
from emb_model_provider.offline.records import ModelKind, Record
from emb_model_provider.services.sparse import SparseVector

_RETRIES = 6
#: One input on the wire: a text, an image reference, or ``{"image": ...}`` (multimodal models).
WireInput = str | dict[str, str]
#: One vector from the server: dense, or a sparse model's (indices, values).
Row = Vectors | SparseVector
_MAX_BACKOFF_S = 30.0


class _Refused(Exception):
    """A 400 for the request: some input in it is bad."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class HttpEmbedder:
    def __init__(
        self,
        url: str,
        *,
        model: str,
        dimensions: int | None,
        batch_size: int,
        concurrency: int,
        api_key: str | None,
        timeout_s: float = 300.0,
        max_image_bytes: int = 20 * 1024 * 1024,
    ) -> None:
        base = url.rstrip("/")
        self._base = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=concurrency),
            trust_env=False,
        )
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="embed-http")
        self._batch_size = batch_size
        self._max_image_bytes = max_image_bytes
        info = self._model_info(model)
        self.model = str(info.get("id") or model)
        modality = info.get("modality", "text")
        self.kind: ModelKind = modality if modality in ("image", "multimodal") else "text"
        task = info.get("task")
        if task == "rerank":
            raise BulkError(
                f"{self.model} is a reranker; the embed command writes the vectors of embedding "
                "and sparse (SPLADE) models only"
            )
        #: A SPLADE model: its vectors come as {"indices", "values"} (JSON floats only).
        self.sparse = task == "sparse"
        # The full size (known once the server has loaded the model) bounds --dimensions; the
        # default size is what the server returns without it.
        full = info.get("max_dimensions")
        self._dimensions: int | None = None  # the probe asks for the default size
        if not isinstance(full, int):
            # A models-file entry the server has not loaded yet: one input loads it, and its
            # answer tells a sparse model (a task read only at load) from a dense one.
            probe = self._probe()
            self.sparse = isinstance(probe, SparseVector)
            info = self._model_info(model)
            full = info.get("max_dimensions")
            if not isinstance(full, int):
                full = None if isinstance(probe, SparseVector) else int(probe.shape[0])
        native = info.get("dimensions")
        native = native if isinstance(native, int) else full
        self._dimensions = dimensions
        if self.sparse:
            # ``dimensions`` is a top-k, unbounded as on the server; the vocabulary's size is
            # where the indices fall.
            if full is None:
                raise BulkError(f"{self.model}: the server does not say its vocabulary's size")
            self.dimensions = full
            default_k = native if native is not None and native < full else None
            self.top_k: int | None = dimensions or default_k
            return
        self.top_k = None
        if dimensions is not None and full is not None and not 1 <= dimensions <= full:
            raise BulkError(
                f"--dimensions {dimensions}: {self.model} has {full} dimensions; "
                f"ask for 1 to {full}"
            )
        self.dimensions = dimensions or int(str(native))

    def _model_info(self, model: str) -> dict[str, Any]:
        return self._get(f"{self._base}/models/{model}")

    def _probe(self) -> Vectors | SparseVector:
        if self.kind == "image":
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (127, 127, 127)).save(buffer, format="PNG")
            probe = f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}"
        else:
            probe = "dimensions"
        try:  # as JSON floats, which a sparse model answers too
            vectors, _ = self._send([probe], encoding_format="float")
        except _Refused as exc:
            raise BulkError(f"{self.model}: the server refused a probe input: {exc}") from exc
        return vectors[0]

    def _get(self, url: str) -> dict[str, Any]:
        try:
            response = self._client.get(url)
        except httpx.HTTPError as exc:
            raise BulkError(f"cannot reach {url}: {exc}") from exc
        if response.status_code != 200:
            raise BulkError(f"{url} answered {response.status_code}: {_message(response)}")
        body: dict[str, Any] = response.json()
        return body

    def embed(self, records: Sequence[Record]) -> ChunkResult:
        errors: dict[int, str] = {}
        values: dict[int, WireInput] = {}
        for index, record in enumerate(records):
            if record.error is not None:
                errors[index] = record.error
            elif self.kind not in (record.kind, "multimodal"):
                errors[index] = f"a {record.kind} input, but the model takes {self.kind}"
            elif record.kind == "text":
                values[index] = record.value
            else:
                value = self._wire_value(record.value)
                if isinstance(value, _Refused):
                    errors[index] = value.message
                elif self.kind == "multimodal":  # a plain URL string would be text
                    values[index] = {"image": value}
                else:
                    values[index] = value
        indices = sorted(values)
        groups = [
            indices[start : start + self._batch_size]
            for start in range(0, len(indices), self._batch_size)
        ]
        vectors: dict[int, Row] = {}
        tokens = 0
        for group_vectors, group_tokens, group_errors in self._pool.map(
            lambda group: self._send_isolating(group, values), groups
        ):
            vectors.update(group_vectors)
            tokens += group_tokens
            errors.update(group_errors)
        kept = sorted(vectors)
        rows = [vectors[index] for index in kept]
        pairs = [row for row in rows if isinstance(row, SparseVector)]
        if self.sparse and len(pairs) != len(rows):
            raise BulkError(f"{self.model} answered dense vectors where sparse ones were expected")
        return ChunkResult(
            ids=[records[index].id for index in kept],
            vectors=pairs if self.sparse else _stack(rows, self.dimensions),
            tokens=tokens,
            errors=[(records[index].id, errors[index]) for index in sorted(errors)],
        )

    def _wire_value(self, value: str) -> str | _Refused:
        """Local image paths become data URIs; URLs and data URIs go as they are."""
        if value.lower().startswith(("http://", "https://", "data:")):
            return value
        path = Path(value)
        try:
            size = path.stat().st_size
            if size > self._max_image_bytes:
                return _Refused(f"{size} bytes, over the limit of {self._max_image_bytes}")
            data = path.read_bytes()
        except OSError as exc:
            return _Refused(f"cannot read the image: {exc.strerror or exc}")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"

    def _send_isolating(
        self, group: list[int], values: dict[int, WireInput]
    ) -> tuple[dict[int, Row], int, dict[int, str]]:
        """Embed ``group``; on a 400, halve it until each bad input is alone."""
        try:
            vectors, tokens = self._send([values[index] for index in group])
            return dict(zip(group, vectors, strict=True)), tokens, {}
        except _Refused as exc:
            if len(group) == 1:
                return {}, 0, {group[0]: exc.message}
        middle = len(group) // 2
        left = self._send_isolating(group[:middle], values)
        right = self._send_isolating(group[middle:], values)
        return {**left[0], **right[0]}, left[1] + right[1], {**left[2], **right[2]}

    def _send(
        self, inputs: Sequence[WireInput], *, encoding_format: str | None = None
    ) -> tuple[list[Row], int]:
        # Sparse vectors are JSON numbers only (the server refuses base64 for them).
        encoding_format = encoding_format or ("float" if self.sparse else "base64")
        body: dict[str, Any] = {
            "model": self.model,
            "input": inputs,
            "encoding_format": encoding_format,
        }
        if self._dimensions is not None:
            body["dimensions"] = self._dimensions
        url = f"{self._base}/embeddings"
        last = ""
        for attempt in range(_RETRIES):
            wait_s = min(_MAX_BACKOFF_S, 0.5 * 2**attempt)
            try:
                response = self._client.post(url, json=body)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if response.status_code == 200:
                    return _decode(response.json(), len(inputs))
                if response.status_code == 400:
                    raise _Refused(_message(response))
                if response.status_code not in (408, 409, 429) and response.status_code < 500:
                    raise BulkError(f"{url} answered {response.status_code}: {_message(response)}")
                last = f"{response.status_code}: {_message(response)}"
                wait_s = _retry_after(response, wait_s)
            time.sleep(wait_s)  # backoff before a retry, as the OpenAI SDK does
        raise BulkError(f"{url} failed {_RETRIES} times, last {last}")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._client.close()


def _stack(rows: list[Row], dimensions: int) -> Vectors:
    dense = [row for row in rows if not isinstance(row, SparseVector)]
    if len(dense) != len(rows):
        raise BulkError("the server answered sparse vectors where dense ones were expected")
    if not dense:
        return empty_vectors(dimensions)
    stacked: Vectors = np.stack(dense).astype(np.float32)
    return stacked


def _decode(body: dict[str, Any], count: int) -> tuple[list[Row], int]:
    items = sorted(body["data"], key=lambda item: int(item["index"]))
    if len(items) != count:
        raise BulkError(f"the server answered {len(items)} vectors for {count} inputs")
    vectors: list[Row] = []
    for item in items:
        embedding = item["embedding"]
        if isinstance(embedding, dict):  # a sparse model's {"indices", "values"}
            vectors.append(
                SparseVector(
                    np.asarray(embedding["indices"], dtype=np.int64),
                    np.asarray(embedding["values"], dtype=np.float32),
                )
            )
        elif isinstance(embedding, str):
            vectors.append(np.frombuffer(base64.b64decode(embedding), dtype="<f4").copy())
        else:
            vectors.append(np.asarray(embedding, dtype=np.float32))
    usage = body.get("usage") or {}
    return vectors, int(usage.get("prompt_tokens", 0))


def _message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
        message = error.get("message") if isinstance(error, dict) else None
    except ValueError:
        message = None
    text = str(message or response.text[:300])
    return " ".join(text.split())


def _retry_after(response: httpx.Response, default_s: float) -> float:
    try:
        return min(_MAX_BACKOFF_S, max(0.0, float(response.headers.get("retry-after", ""))))
    except ValueError:
        return default_s
