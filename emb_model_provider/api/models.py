"""GET /v1/models and /v1/models/{model}: OpenAI's Model objects plus gateway extensions."""

from __future__ import annotations

from fastapi import APIRouter, Request

from emb_model_provider.api.auth import check_model_access, may_see_model
from emb_model_provider.api.deps import ModelsDep
from emb_model_provider.encoders.base import PrecisionReport, PromptedEncoder
from emb_model_provider.protocol import ErrorResponse, ModelCard, ModelList, PrecisionCard
from emb_model_provider.registry import ModelSpec
from emb_model_provider.services.models import ModelManager
from emb_model_provider.services.quantize import ranges_source

router = APIRouter()


def _card(spec: ModelSpec, models: ModelManager) -> ModelCard:
    weights = models.registry.weights(spec)  # a prompt-pinned name's base
    loaded = models.loaded(weights.name)
    encoder = loaded.encoder if loaded else None
    prompted = encoder if isinstance(encoder, PromptedEncoder) else None
    task = encoder.task if encoder is not None else models.registry.task(spec)
    dense = task not in ("rerank", "sparse")
    return ModelCard(
        id=spec.name,
        created=spec.created,
        owned_by=spec.owned_by,
        modality=spec.modality,
        dimensions=loaded.dimensions if loaded else spec.dimensions,
        max_dimensions=loaded.encoder.dimensions if loaded else None,
        max_input_tokens=loaded.encoder.max_input_tokens if loaded else spec.max_input_tokens,
        loaded=loaded is not None,
        aliases=list(spec.aliases),
        architecture=getattr(encoder, "architecture", None),
        pooling=_pooling_name(encoder) or weights.pooling,
        prompts=prompted.prompts if prompted else (dict(weights.prompts) or None),
        default_prompt_name=(
            spec.prompt_name
            or (prompted.default_prompt_name if prompted else weights.default_prompt_name)
        ),
        base=spec.base,
        task=task,
        # int8/uint8 ranges are a dense embedding model's (a reranker's scores and sparse weights
        # are not quantised).
        quantization_ranges=ranges_source(weights) if dense else None,
        # Rerankers and sparse models run exact: the fast paths are measured for dense embedders.
        precision=_precision(weights, encoder, models) if dense else None,
    )


def _precision(spec: ModelSpec, encoder: object, models: ModelManager) -> PrecisionCard | None:
    if spec.modality != "text":
        return None
    report = getattr(encoder, "precision", None)
    if not isinstance(report, PrecisionReport):
        return PrecisionCard(requested=models.requested_precision(spec))
    return PrecisionCard(
        requested=report.requested,
        path=report.path,
        min_cosine=report.min_cosine,
        mean_cosine=report.mean_cosine,
        gate=report.gate,
        reason=report.reason,
        cpu_features=list(report.cpu_features) or None,
    )


def _pooling_name(encoder: object) -> str | None:
    pooling = getattr(encoder, "pooling", None)
    name = getattr(pooling, "name", None)
    return name if isinstance(name, str) else None


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request, models: ModelsDep) -> ModelList:
    # A key limited to some models sees only those, as OpenAI lists the models one may use.
    return ModelList(
        data=[_card(spec, models) for spec in models.registry if may_see_model(request, spec.names)]
    )


@router.get(
    "/v1/models/{model:path}", response_model=ModelCard, responses={404: {"model": ErrorResponse}}
)
async def retrieve_model(model: str, request: Request, models: ModelsDep) -> ModelCard:
    check_model_access(request, model)
    return _card(models.registry.get(model), models)
