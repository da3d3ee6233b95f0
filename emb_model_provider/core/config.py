"""Settings: the only place that reads the environment (``EMB_PROVIDER_*`` or a ``.env`` file).

``main.create_app`` takes a ``Settings`` and passes plain values down; tests build ``Settings(...)``
directly. Validators refuse values that cannot work, so a bad setting fails at start-up with one
line that names it (see ``cli.py``), not at the first request.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from emb_model_provider.core.kinds import DType as ModelDType
from emb_model_provider.core.kinds import Precision

ENV_PREFIX = "EMB_PROVIDER_"
DEFAULT_MODEL = "all-MiniLM-L6-v2"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
TracingMode = Literal["auto", "on", "off"]
DType = Literal["auto"] | ModelDType

_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_ORIGIN_RE = re.compile(r"^(\*|https?://[^/\s]+)$")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
CacheBackendName = Literal["memory", "redis", "off"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 to listen on all.")
    port: int = Field(9000, ge=1, le=65535, description="TCP port.")
    log_level: LogLevel = Field("info", description="debug | info | warning | error | critical.")
    device: str = Field(
        "auto", description="auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps."
    )
    dtype: DType = Field(
        "auto",
        description="auto = float16 on CUDA, float32 elsewhere; or float32/float16/bfloat16.",
    )
    precision: Precision = Field(
        "exact",
        description=(
            "Text models whose models-file entry names none: exact = float32, the reference "
            "library's vectors; fast = the fastest path this CPU runs (OpenVINO bfloat16, ...) "
            "that passes the accuracy gate at load (least cosine to float32 >= min_cosine), "
            "else float32."
        ),
    )
    default_model: str = Field(DEFAULT_MODEL, description="Loaded and warmed up at start-up.")
    models_file: Path | None = Field(None, description="YAML file adding or overriding models.")
    max_batch_size: int = Field(32, ge=1, le=4096, description="Inputs per forward pass.")
    max_batch_tokens: int = Field(
        16384,
        ge=1,
        description="Padded tokens (longest x count) per forward pass; caps memory on long inputs.",
    )
    max_inputs_per_request: int = Field(
        2048, ge=1, description="Inputs in one request (OpenAI: 2048)."
    )
    max_tokens_per_request: int = Field(
        300_000, ge=1, description="Tokens summed over one request's inputs (OpenAI: 300000)."
    )
    max_queue_inputs: int = Field(
        16384,
        ge=1,
        description="Inputs waiting per model; beyond it requests get 429 with Retry-After.",
    )
    background_batch_size: int = Field(
        8,
        ge=1,
        le=4096,
        description=(
            "Inputs per forward pass for Batch API jobs, which run only while no online input "
            "waits: an online request arriving behind a job waits for one such batch at most."
        ),
    )
    truncate: bool = Field(
        True, description="Truncate inputs longer than the model's limit (false: 400 instead)."
    )
    # -- reranking --
    max_documents_per_request: int = Field(
        1000, ge=1, description="Documents in one rerank request (one query-document pair each)."
    )
    rerank_model: str | None = Field(
        None,
        description=(
            "The reranker that serves rerank requests naming no model (TEI's body); unset: the "
            "first reranker of the models file."
        ),
    )
    hf_token: SecretStr | None = Field(None, description="Hugging Face token for gated models.")
    cache_dir: Path | None = Field(None, description="Hugging Face hub cache directory.")
    warmup: bool = Field(True, description="Run a warm-up batch when a model loads.")
    trust_remote_code: bool = Field(
        False,
        description=(
            "Run the Python code a model directory ships (config auto_map), for models-file "
            "entries that do not set trust_remote_code; it runs with the server's rights."
        ),
    )
    # -- model lifecycle --
    model_idle_unload_s: float = Field(
        0, ge=0, description="Unload a model unused for this many seconds; 0 keeps models loaded."
    )
    max_loaded_models: int = Field(
        0, ge=0, description="Most models loaded at once (least recently used go first); 0: any."
    )
    max_loaded_memory_mb: int = Field(
        0, ge=0, description="Most MB of model weights loaded at once; 0: no limit."
    )
    pin_default_model: bool = Field(
        True, description="The default model is never unloaded by idleness or eviction."
    )
    allow_image_urls: bool = Field(
        True, description="Fetch http(s) image URLs (false: only inline base64 images)."
    )
    url_allowlist: str = Field(
        "",
        description=(
            "Comma-separated CIDRs and host names that image URLs may reach although they are "
            "loopback, private or link-local (refused by default)."
        ),
    )
    max_image_bytes: int = Field(
        20 * 1024 * 1024, ge=1, description="Largest image, fetched or inline, in bytes."
    )
    max_image_pixels: int = Field(
        40_000_000, ge=1, description="Largest decoded image (width x height): bomb guard."
    )
    max_url_timeout: float = Field(
        20.0, gt=0, description="Seconds for one image URL: DNS, connect, redirects, body."
    )
    max_url_redirects: int = Field(3, ge=0, description="Redirects followed per image URL.")
    num_threads: int = Field(
        0, ge=0, description="torch intra-op threads on CPU; 0 keeps torch's default."
    )
    # -- result cache (services/cache.py) --
    cache: CacheBackendName = Field(
        "memory",
        description=(
            "Embedding result cache: memory (an LRU in this process) | redis (shared by "
            "replicas, EMB_PROVIDER_CACHE_URL) | off."
        ),
    )
    cache_max_bytes: int = Field(
        256 * 1024 * 1024,
        ge=1,
        description="memory cache: most bytes held (vectors, keys and per-entry overhead).",
    )
    cache_max_entries: int = Field(
        0, ge=0, description="memory cache: most entries held; 0: only the byte bound."
    )
    cache_url: SecretStr | None = Field(
        None, description="redis cache: redis://[:password@]host:port/db (or rediss://, unix://)."
    )
    cache_ttl_s: int = Field(
        7 * 86400, ge=0, description="redis cache: seconds an entry lives; 0: no expiry."
    )
    cache_prefix: str = Field(
        "emb:",
        description="redis cache: prefix of every key, one per deployment sharing a Redis.",
    )
    cache_timeout_s: float = Field(
        0.25,
        gt=0,
        description=(
            "redis cache: seconds to wait for Redis; past it the vectors are computed and Redis "
            "is skipped, with back-off, until it answers again."
        ),
    )

    # -- operations: logs, metrics, HTTP limits (api/middleware.py) --
    log_format: LogFormat = Field(
        "text", description="text (one line per record) | json (one JSON object per line)."
    )
    access_log: bool = Field(
        True, description="One access-log line per request (uvicorn's own is then off)."
    )
    metrics: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    tracing: TracingMode = Field(
        "auto",
        description=(
            "OpenTelemetry traces over OTLP/HTTP: auto (on when OTEL_EXPORTER_OTLP_ENDPOINT or "
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set) | on | off. The standard OTEL_* "
            "variables (endpoint, headers, OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER) configure "
            "the export; see docs/operations.md."
        ),
    )
    # The OpenTelemetry SDK reads these itself; Settings reads them only to turn tracing on.
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT", "otel_exporter_otlp_endpoint"),
        description=(
            "Standard OpenTelemetry variable (no EMB_PROVIDER_ prefix): the OTLP/HTTP base URL, "
            "traces go to <url>/v1/traces. Set, it turns tracing on (EMB_PROVIDER_TRACING=auto)."
        ),
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "otel_exporter_otlp_traces_endpoint"
        ),
        description=(
            "Standard OpenTelemetry variable (no EMB_PROVIDER_ prefix): the full URL traces are "
            "sent to. Set, it turns tracing on (EMB_PROVIDER_TRACING=auto)."
        ),
    )
    cors_origins: str = Field(
        "", description="Comma-separated origins (https://app.example, or *); empty: CORS off."
    )
    gzip_min_bytes: int = Field(
        65536,
        ge=0,
        description="Gzip responses at least this large when the client accepts it; 0: off.",
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024, ge=1, description="Largest request body in bytes (413 beyond)."
    )
    request_timeout_s: float = Field(
        120.0, ge=0, description="Seconds a request may take before a 504; 0: no limit."
    )
    keep_alive_s: int = Field(
        75,
        ge=1,
        description=(
            "Seconds an idle keep-alive connection stays open. Longer than clients' own pool "
            "expiry (httpx and the OpenAI SDK: 5 s), so the client closes first and never sends "
            "on a connection the server is closing."
        ),
    )
    shutdown_timeout_s: int = Field(
        30,
        ge=1,
        description=(
            "Seconds the server keeps answering the requests in flight after SIGTERM/SIGINT "
            "before it cancels the rest and exits. Keep it below the orchestrator's grace period "
            "(Kubernetes terminationGracePeriodSeconds, docker stop's timeout)."
        ),
    )

    # -- access control (api/auth.py); every one is off by default --
    api_key_hashes: str = Field(
        "",
        description=(
            "Comma-separated sha256:<hex> hashes of the API keys clients send as "
            "`Authorization: Bearer <key>` (`emb-model-provider hash-key` makes one). "
            "No key here nor in EMB_PROVIDER_API_KEYS_FILE: the API is open."
        ),
    )
    api_keys_file: Path | None = Field(
        None, description="YAML file of key hashes, each with an optional name and models list."
    )
    admin_key_hashes: str = Field(
        "",
        description="Comma-separated sha256:<hex> hashes of admin keys; none: admin routes off.",
    )
    rate_limit_rpm: int = Field(
        0, ge=0, description="Requests per minute per API key (per client IP when open); 0: off."
    )
    rate_limit_tpm: int = Field(
        0, ge=0, description="Tokens per minute per API key (per client IP when open); 0: off."
    )
    rate_limit_window_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Seconds the rate limits refill over; 60 makes them per minute (tests: less).",
    )
    client_allowlist: str = Field(
        "", description="Comma-separated CIDRs that may call the API; empty: every address."
    )
    trusted_proxies: str = Field(
        "",
        description=(
            "Comma-separated CIDRs of reverse proxies whose X-Forwarded-For is believed "
            "(the right-most address not in this set is the client)."
        ),
    )
    # -- Batch API (batch_api/service.py, batch_api/runner.py) --
    data_dir: Path = Field(
        Path("data"),
        description=(
            "Folder of the Batch API's store (SQLite and files), relative to the working "
            "directory unless absolute; created on first use. Jobs resume from it after a restart."
        ),
    )
    batch_max_file_bytes: int = Field(
        200 * 1024 * 1024, ge=1, description="Largest batch input file in bytes (OpenAI: 200 MB)."
    )
    batch_max_lines: int = Field(
        50_000, ge=1, description="Most requests (lines) in one batch input file (OpenAI: 50000)."
    )
    batch_max_concurrent_jobs: int = Field(
        2, ge=1, description="Batch jobs running at once; others wait (status validating)."
    )
    batch_line_concurrency: int = Field(
        16,
        ge=1,
        description=(
            "Lines of one batch job in flight at once. It bounds the background batches an "
            "online request may wait for: lower favours online latency, higher job throughput."
        ),
    )

    @field_validator("device")
    @classmethod
    def _device_shape(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE_RE.match(value):
            raise ValueError("must be auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("max_queue_inputs")
    @classmethod
    def _queue_holds_a_request(cls, value: int, info: ValidationInfo) -> int:
        per_request = info.data.get("max_inputs_per_request")
        if per_request is not None and value < per_request:
            # A request larger than the whole queue could never be accepted, retry as it might.
            raise ValueError(
                f"must be at least EMB_PROVIDER_MAX_INPUTS_PER_REQUEST ({per_request})"
            )
        return value

    @field_validator("cache_url")
    @classmethod
    def _cache_url_shape(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(_REDIS_SCHEMES):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if value is None and info.data.get("cache") == "redis":
            raise ValueError("EMB_PROVIDER_CACHE=redis needs it")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("models_file", "api_keys_file")
    @classmethod
    def _models_file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"file not found: {value}")
        return value

    @field_validator("default_model")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @field_validator("cors_origins")
    @classmethod
    def _origins_shape(cls, value: str) -> str:
        for origin in (entry.strip() for entry in value.split(",")):
            if origin and not _ORIGIN_RE.match(origin):
                # Browsers send Origin as scheme://host[:port]; a path or slash never matches.
                raise ValueError(f"{origin!r} is not * nor scheme://host[:port]")
        return value

    def cors_origin_list(self) -> tuple[str, ...]:
        return tuple(entry.strip() for entry in self.cors_origins.split(",") if entry.strip())

    def url_allowlist_entries(self) -> tuple[str, ...]:
        return tuple(entry.strip() for entry in self.url_allowlist.split(",") if entry.strip())

    def hf_token_value(self) -> str | None:
        return self.hf_token.get_secret_value() if self.hf_token else None

    def tracing_enabled(self) -> bool:
        if self.tracing == "auto":
            return bool(self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint)
        return self.tracing == "on"


def env_name(field: str) -> str:
    """The variable a field is read from: ``EMB_PROVIDER_<FIELD>``, or the standard name a field
    borrows (``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
    alias = (
        Settings.model_fields[field].validation_alias if field in Settings.model_fields else None
    )
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    return f"{ENV_PREFIX}{field.upper()}"
