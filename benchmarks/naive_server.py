"""The peer most hand-written gateways are: FastAPI calling ``model.encode`` once per request.

No batching across requests: each request's inputs go to ``SentenceTransformer.encode`` on
FastAPI's thread pool (a sync route), so concurrent requests run concurrent forwards that share the
CPU. Same wire format as OpenAI (``float`` or ``base64``). Used only by ``benchmarks/run.py``.

    python benchmarks/naive_server.py --model-dir DIR --port 9101
"""

from __future__ import annotations

import argparse
import base64
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from sentence_transformers import SentenceTransformer


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = "all-MiniLM-L6-v2"
    encoding_format: str = "float"


def build_app(model_dir: str) -> FastAPI:
    app = FastAPI()
    model = SentenceTransformer(model_dir, device="cpu")
    model.encode(["warm up"])

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/embeddings")
    def embeddings(request: EmbeddingRequest) -> dict[str, Any]:
        texts = [request.input] if isinstance(request.input, str) else request.input
        vectors = model.encode(texts, batch_size=32, normalize_embeddings=True)
        data = []
        for index, vector in enumerate(np.asarray(vectors, dtype=np.float32)):
            value: Any = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode()
                if request.encoding_format == "base64"
                else vector.tolist()
            )
            data.append({"object": "embedding", "index": index, "embedding": value})
        return {
            "object": "list",
            "data": data,
            "model": request.model,
            "usage": {"prompt_tokens": 0, "total_tokens": 0},
        }

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
