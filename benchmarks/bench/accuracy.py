"""How close a server's vectors are to float32 ``SentenceTransformer.encode`` of the same model:
least and mean cosine over the corpus, and the agreement of the top-10 nearest neighbours of 100
queries (corpus texts, spread over it) searched over the whole corpus."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import numpy as np

#: Inputs per request when the corpus is fetched.
_CHUNK = 64
QUERIES = 100
TOP_K = 10


#: float32 reference vectors by (model directory, corpus size): computed once per run, however
#: many servers are compared with them.
_REFERENCES: dict[tuple[str, int], np.ndarray] = {}


def measure_accuracy(base: str, model: str, model_dir: str, corpus: list[str]) -> dict[str, Any]:
    reference = _reference(model_dir, corpus)
    served = _fetch(base, model, corpus)
    cosines = np.sum(reference * served, axis=1)
    picks = np.linspace(0, len(corpus) - 1, min(QUERIES, len(corpus))).astype(int)
    agree = 0
    for index in picks:
        top_ref = set(np.argsort(-(reference @ reference[index]))[:TOP_K].tolist())
        top_got = set(np.argsort(-(served @ served[index]))[:TOP_K].tolist())
        agree += len(top_ref & top_got)
    with httpx.Client(timeout=60) as client:
        card = client.get(f"{base}/v1/models/{model}").json()
    return {
        "min_cosine": float(cosines.min()),
        "mean_cosine": float(cosines.mean()),
        "top10_agreement": agree / (len(picks) * TOP_K),
        "precision": card.get("precision"),
    }


def _reference(model_dir: str, corpus: list[str]) -> np.ndarray:
    key = (model_dir, len(corpus))
    if key not in _REFERENCES:
        from sentence_transformers import SentenceTransformer

        _REFERENCES[key] = SentenceTransformer(model_dir, device="cpu").encode(
            corpus, batch_size=32, normalize_embeddings=True
        )
    return _REFERENCES[key]


def _fetch(base: str, model: str, corpus: list[str]) -> np.ndarray:
    parts = []
    with httpx.Client(timeout=600) as client:
        for start in range(0, len(corpus), _CHUNK):
            response = client.post(
                f"{base}/v1/embeddings",
                json={
                    "model": model,
                    "input": corpus[start : start + _CHUNK],
                    "encoding_format": "base64",
                },
            )
            response.raise_for_status()
            for item in response.json()["data"]:
                parts.append(np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4"))
    vectors = np.stack(parts).astype(np.float32)
    normalised: np.ndarray = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normalised
