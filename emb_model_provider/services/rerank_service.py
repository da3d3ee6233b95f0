"""POST /v1/rerank, /v2/rerank and /rerank without HTTP or torch: the reranker, the request's
limits, the shared path of every task (``EmbeddingService.run``: cache, tokenisation, token
limits, the dynamic batcher), then the scores ranked.

A request is one query and its documents; each (query, document) pair is one input of the
batcher, so pairs of many requests share forward passes, sorted by length, with the same token
budget and model thread as embeddings. Traced requests get a ``rerank.check_inputs`` and a
``rerank.tokenize`` span beside the cache's and the batcher's.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import numpy as np

from emb_model_provider.core import tracing
from emb_model_provider.core.errors import InvalidRequest
from emb_model_provider.core.kinds import TruncationSide
from emb_model_provider.encoders.base import Encoder, EncoderInput, RerankEncoder
from emb_model_provider.protocol import RerankRequest, render_rerank
from emb_model_provider.registry import ModelSpec, Registry
from emb_model_provider.services.embedding_service import EmbeddingService, Reply, vllm_token_cap


@dataclass(frozen=True)
class RerankLimits:
    max_documents_per_request: int
    #: The reranker for requests naming none; None: the registry's first reranker.
    default_model: str | None = None


@dataclass(frozen=True)
class Ranked:
    """(index, score) pairs, best first, cut to ``top_n``; and what the request cost."""

    model: str
    ranked: list[tuple[int, float]]
    prompt_tokens: int


class RerankService:
    def __init__(
        self, embeddings: EmbeddingService, registry: Registry, limits: RerankLimits
    ) -> None:
        self._embeddings = embeddings
        self._registry = registry
        self._limits = limits

    def model_for(self, name: str | None) -> ModelSpec:
        """The model a request names, or the server's reranker when it names none."""
        if name is not None:
            return self._registry.get(name)
        if self._limits.default_model is not None:
            return self._registry.get(self._limits.default_model)
        spec = self._registry.first("rerank")
        if spec is None:
            raise InvalidRequest(
                "No reranker is configured: name one in `model`, or set EMB_PROVIDER_RERANK_MODEL.",
                param="model",
            )
        return spec

    async def create(self, request: RerankRequest, *, background: bool = False) -> Reply:
        """The answer to one rerank request: Cohere's body, or TEI's array for TEI's body."""
        with tracing.leaf("rerank.check_inputs"):
            spec = self.model_for(request.model)
            documents = request.document_texts()
        result = await self.rerank(
            spec,
            request.query,
            documents,
            top_n=request.top_n,
            raw_scores=request.raw_scores,
            truncate=request.truncate,
            truncation_side=request.truncation_side(),
            background=background,
            truncate_prompt_tokens=request.truncate_prompt_tokens,
        )
        body = render_rerank(
            result.ranked,
            request_id=uuid.uuid4().hex,
            model=result.model,
            documents=documents if request.wants_documents() else None,
            prompt_tokens=result.prompt_tokens,
            n_documents=len(documents),
            tei=request.tei,
        )
        return Reply(body, result.model, len(documents), result.prompt_tokens)

    async def rerank(
        self,
        spec: ModelSpec,
        query: str,
        documents: list[str],
        *,
        top_n: int | None = None,
        raw_scores: bool = False,
        truncate: bool | None = None,
        background: bool = False,
        truncation_side: TruncationSide | None = None,
        truncate_prompt_tokens: int | None = None,
    ) -> Ranked:
        """Score each (query, document) pair with ``spec``'s reranker and rank them;
        ``truncate_prompt_tokens`` (vLLM's) caps each pair."""
        limit = self._limits.max_documents_per_request
        if len(documents) > limit:
            raise InvalidRequest(
                f"Too many documents: {len(documents)} were sent, at most {limit} are allowed "
                "in one request.",
                param="documents",
            )
        pairs: list[EncoderInput] = [(query, document) for document in documents]
        if truncate_prompt_tokens is not None:
            truncate, cap = vllm_token_cap(truncate_prompt_tokens)
        else:
            cap = None
        computed = await self._embeddings.run(
            spec,
            pairs,
            task="rerank",
            background=background,
            truncate=truncate,
            truncation_side=truncation_side,
            max_tokens=cap,
            check=lambda encoder: _one_label(spec, encoder),
        )
        logits = computed.rows
        encoder = computed.encoder
        if raw_scores or not isinstance(encoder, RerankEncoder):
            scores = logits[:, 0]
        else:
            scores = encoder.activate(logits)[:, 0]
        # Best first; equal scores keep the documents' order (a stable sort of the negation).
        order = np.argsort(-scores, kind="stable")[: top_n or len(documents)]
        ranked = [(int(index), float(scores[index])) for index in order]
        return Ranked(spec.name, ranked, computed.prompt_tokens)


def _one_label(spec: ModelSpec, encoder: Encoder) -> None:
    """A classifier with several labels (NLI: contradiction, entailment, neutral) gives no single
    relevance score: it is not a reranker."""
    if isinstance(encoder, RerankEncoder) and encoder.num_labels != 1:
        labels = getattr(encoder, "labels", None) or []
        named = f" ({', '.join(str(label) for label in labels)})" if labels else ""
        raise InvalidRequest(
            f"The model `{spec.name}` is a classifier with {encoder.num_labels} labels{named}, "
            "not a reranker: a reranker gives one relevance score per document.",
            param="model",
            code="not_a_reranker",
        )
