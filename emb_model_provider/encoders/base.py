"""What every encoder family offers the batcher and the service; no torch here.

An encoder works in two stages (after Infinity's prepare / forward / finish split):
``prepare`` runs on a worker pool per request (tokenise or decode: CPU work that releases the GIL),
and ``encode`` runs in the model's batcher thread on a batch merged from many requests (collate,
forward under ``torch.inference_mode()``, pool, normalise, to numpy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from emb_model_provider.core.kinds import (
    FastBackend,
    Modality,
    Precision,
    PrepareThread,
    Task,
    TruncationSide,
)
from emb_model_provider.core.vectors import Vectors

__all__ = [
    "Encoder",
    "EncoderInput",
    "LoadOptions",
    "PrecisionReport",
    "PreparedInput",
    "RerankEncoder",
    "RoutedEncoder",
    "SideTruncating",
    "TextPair",
    "TokenCapping",
    "Vectors",
]

#: A (query, document) pair, what a reranker scores.
TextPair = tuple[str, str]
#: One input of any task: a text, an image's bytes, or a text pair. Each encoder takes the kinds
#: its task needs and refuses the others with ``BadInput``.
EncoderInput = str | bytes | TextPair

#: The path ``precision: exact`` serves, and ``fast`` falls back to.
EXACT_PATH = "torch-float32"


@dataclass(frozen=True, slots=True)
class PreparedInput:
    """One input ready for the batcher: an encoder-specific payload and its token count."""

    payload: object
    #: Tokens the encoder processes for this input, special tokens included: usage and the
    #: batcher's padded-token budget both count these.
    n_tokens: int


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """Plain values an encoder loader needs (encoders never see ``Settings``)."""

    device: str
    dtype: str
    hf_token: str | None = None
    cache_dir: str | None = None
    num_threads: int = 0
    #: Largest image, in pixels, that is decoded (guards against decompression bombs).
    max_image_pixels: int = 40_000_000
    #: Run code a model directory ships (``auto_map``); off, such a model fails to load.
    trust_remote_code: bool = False
    #: ``exact``: float32 torch; ``fast``: the fastest path that passes the accuracy gate.
    precision: Precision = "exact"
    #: The accuracy gate: a fast path is kept only if its least cosine to float32 over the
    #: calibration texts is at least this.
    min_cosine: float = 0.99
    #: Pins of the fast path (expert): its runtime, and its dtype (None: the best the CPU has).
    fast_backend: FastBackend | None = None
    fast_dtype: str | None = None
    #: Where fast-path exports and gate decisions are kept; None: beside the hub cache.
    export_dir: str | None = None


@dataclass(frozen=True, slots=True)
class PrecisionReport:
    """What ``precision`` chose for a loaded model and the accuracy it measured."""

    requested: Precision
    #: What serves: ``torch-float32`` (exact, or a refused fast path) or a fast path such as
    #: ``openvino-bfloat16``.
    path: str
    #: Least and mean cosine of the chosen path's vectors to float32 over the calibration texts
    #: (1.0 for float32 itself); None when nothing was measured (``exact``).
    min_cosine: float | None = None
    mean_cosine: float | None = None
    #: The gate the path had to pass.
    gate: float | None = None
    #: Why a fast path was not taken (None when it was, or when none was asked for).
    reason: str | None = None
    #: CPU features the path relies on (e.g. ``avx512_bf16``).
    cpu_features: tuple[str, ...] = ()


class Encoder(Protocol):
    modality: Modality
    #: What the model serves; the routes of another task refuse it.
    task: Task
    #: Length of the vectors ``encode`` returns (a reranker's: its number of labels).
    dimensions: int
    #: Longest input, in tokens, the model takes (text: sentence-transformers ``max_seq_length``).
    max_input_tokens: int
    #: What the model runs on, e.g. ``"cpu (float32)"``; for logs and /v1/models.
    placement: str
    #: Bytes of weights held on the device (eviction limits and the admin listing).
    memory_bytes: int

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        """Tokenise texts (``str``) or pairs (``TextPair``), or decode and preprocess images
        (``bytes``); thread-safe, called off the event loop. With ``truncate``, over-long texts
        are cut from ``truncation_side`` (None: the model's own; images ignore it). Raises
        ``BadInput`` naming the input that is unusable."""
        ...

    def encode(self, batch: Sequence[PreparedInput]) -> Vectors:
        """Pooled vectors for ``batch``, float32, shape (len(batch), dimensions), not normalised:
        the service normalises, once, after taking the ``dimensions`` prefix."""
        ...

    def warmup(self) -> None:
        """Run the model once so that the first request does not pay for lazy initialisation."""
        ...

    def close(self) -> None:
        """Free the weights; the encoder is not used afterwards."""
        ...


@runtime_checkable
class ImagePreparing(Protocol):
    """An encoder that takes images, and says on which thread they are decoded and
    preprocessed (its ``prepare`` for images)."""

    image_prepare_thread: PrepareThread


@runtime_checkable
class PromptedEncoder(Protocol):
    """An encoder whose texts may be prefixed with a named prompt (sentence-transformers'
    ``prompts``, e.g. ``{"query": "query: "}``)."""

    #: Prompt name -> text; the model's saved prompts and the models file's.
    prompts: dict[str, str]
    #: The prompt a request that names none gets; None: no prompt.
    default_prompt_name: str | None

    def prompt_text(self, name: str | None) -> str | None:
        """The text for ``name`` (None: the default); ``KeyError`` for an unknown name."""
        ...

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        truncation_side: TruncationSide | None = None,
    ) -> list[PreparedInput]:
        """``Encoder.prepare`` with ``prompt`` prepended to every text (and truncated with it)."""
        ...


@runtime_checkable
class RoutedEncoder(Protocol):
    """An encoder with a module route per task (sentence-transformers' ``Router``: an
    inference-free SPLADE's static ``query`` route and transformer ``document`` route). The
    route follows the request's prompt name as ``encode_query`` / ``encode_document`` follow
    their task; the prompt text is still prepended as for any prompted encoder."""

    def route(self, prompt_name: str | None) -> str | None:
        """The route a request naming ``prompt_name`` takes (None: the model has no routes);
        ``ValueError`` when the model has none for it."""
        ...

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        prompt: str | None = None,
        route: str | None = None,
    ) -> list[PreparedInput]:
        """``PromptedEncoder.prepare`` for ``route`` (None: the route of no task)."""
        ...


@runtime_checkable
class SideTruncating(Protocol):
    """An encoder of texts that may be cut from either side (``truncation_side``)."""

    #: The side over-long texts are cut from when a request names none: the model's
    #: tokenizer's saved ``truncation_side``.
    truncation_side: TruncationSide


@runtime_checkable
class TokenCapping(Protocol):
    """An encoder of texts whose ``prepare`` takes a request's ``max_tokens`` (a cap below the
    model's limit; ``encoders/truncation.py``)."""

    def prepare(
        self,
        inputs: Sequence[EncoderInput],
        *,
        truncate: bool,
        truncation_side: TruncationSide | None = None,
        max_tokens: int | None = None,
    ) -> list[PreparedInput]: ...

    token_caps: Literal[True]
    #: Tokens the tokenizer adds to every text (a reranker's: to every pair); a cap must be
    #: above it.
    special_tokens: int


@runtime_checkable
class RerankEncoder(Protocol):
    """A reranker: ``encode`` returns one row of logits per pair (``dimensions`` = labels)."""

    task: Task
    #: The classifier's labels; a reranker has one (a relevance score).
    num_labels: int
    #: The activation the model saved (``"Sigmoid"``, ``"Identity"``, ...), for /v1/models.
    activation: str

    def activate(self, logits: Vectors) -> Vectors:
        """The model's activation on ``logits`` (what ``CrossEncoder.predict`` returns)."""
        ...


@runtime_checkable
class LatentSparseEncoder(Protocol):
    """A sparse encoder whose rows (what the batcher merges and the result cache holds) are
    latents that each request's top-k makes into its vectors: a CSR model, whose top-k is its
    autoencoder's, so that a larger k gives more non-zero terms. ``dimensions``: the latents'."""

    task: Task
    dimensions: int
    #: The top-k a request that names none gets (the model's saved ``max_active_dims``).
    max_active_dims: int

    def sparsify(self, rows: Vectors, k: int | None) -> Vectors:
        """``rows`` as the model's vectors with top-``k`` (None: ``max_active_dims``): the
        others zero. ``k`` is at most ``dimensions``."""
        ...
