"""Access control over HTTP: API keys, admin keys, client allowlist, rate limits.

One pure ASGI middleware (``AccessControl``, no ``BaseHTTPMiddleware``: it is on the hot path)
does, for every path but the public ones (``PUBLIC_PATHS``):

1. the client's address, behind trusted proxies (``security/clients.py``), and the allowlist:
   403 ``request_forbidden`` for others;
2. ``Authorization: Bearer <key>`` when API keys are configured: 401 ``invalid_api_key`` as OpenAI
   answers. An admin key is accepted as an API key too. The key is put on ``request.state.api_key``;
3. rate limits per key, or per client address when the API is open (``security/rate_limits.py``):
   429 with ``Retry-After`` and OpenAI's ``type`` ``requests``/``tokens``, code
   ``rate_limit_exceeded``; every answer carries OpenAI's ``x-ratelimit-*`` headers. A request's
   tokens (``request.state.tokens``, set by the routes) are charged when its answer starts.

It is installed only when one of these is configured, so a default server pays nothing.

A key restricted to some models gets 404 ``model_not_found`` for the others, as OpenAI answers
for a model one may not use (``check_model_access``, called by the routes that take a model).
``require_admin`` guards admin routes with the admin keys.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, FastAPI, Request
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from emb_model_provider.api.exceptions import error_response
from emb_model_provider.core.config import Settings
from emb_model_provider.core.errors import (
    AuthenticationFailed,
    ConfigError,
    ModelNotFound,
    PermissionDenied,
)
from emb_model_provider.security.clients import (
    Address,
    Network,
    client_address,
    contains,
    parse_networks,
)
from emb_model_provider.security.keys import (
    ApiKey,
    KeyRing,
    keys_from_list,
    load_keys_file,
)
from emb_model_provider.security.rate_limits import RateLimiter, Refusal, format_duration
from emb_model_provider.services.models import ModelManager

logger = logging.getLogger(__name__)

#: Paths every client reaches without a key, outside the allowlist and the rate limits: probes
#: and load balancers call them, and Prometheus scrapes /metrics (as TEI's and vLLM's are, it is
#: unauthenticated: keep it off untrusted networks, or set EMB_PROVIDER_METRICS=false).
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/health", "/ready", "/metrics"})
#: Path prefixes as public as ``PUBLIC_PATHS``: the web console's page and files (``api/ui.py``),
#: which hold no data; the API calls the page makes carry the key typed into it.
PUBLIC_PREFIXES: tuple[str, ...] = ("/ui/",)

_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
_ADMIN_DISABLED = "Admin endpoints are disabled: set EMB_PROVIDER_ADMIN_KEY_HASHES to enable them."


def is_public_path(path: str, public_paths: Iterable[str] = PUBLIC_PATHS) -> bool:
    return path in public_paths or path.startswith(PUBLIC_PREFIXES) or f"{path}/" in PUBLIC_PREFIXES


@dataclass(frozen=True)
class AccessPolicy:
    api_keys: KeyRing
    admin_keys: KeyRing
    allowlist: tuple[Network, ...]
    trusted_proxies: tuple[Network, ...]
    limiter: RateLimiter

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """The policy the settings describe; ``ConfigError`` names a setting that cannot work."""
        api_keys = _ring("EMB_PROVIDER_API_KEY_HASHES", settings.api_key_hashes)
        if settings.api_keys_file is not None:
            try:
                from_file = load_keys_file(settings.api_keys_file)
                api_keys = KeyRing([*api_keys.keys, *from_file])
            except ValueError as exc:
                raise ConfigError("EMB_PROVIDER_API_KEYS_FILE", str(exc)) from exc
        return cls(
            api_keys=api_keys,
            admin_keys=_ring("EMB_PROVIDER_ADMIN_KEY_HASHES", settings.admin_key_hashes),
            allowlist=_networks("EMB_PROVIDER_CLIENT_ALLOWLIST", settings.client_allowlist),
            trusted_proxies=_networks("EMB_PROVIDER_TRUSTED_PROXIES", settings.trusted_proxies),
            limiter=RateLimiter(
                requests_per_window=settings.rate_limit_rpm,
                tokens_per_window=settings.rate_limit_tpm,
                window_s=settings.rate_limit_window_s,
            ),
        )

    @property
    def needs_middleware(self) -> bool:
        return bool(self.api_keys or self.allowlist or self.trusted_proxies or self.limiter.enabled)

    def log_summary(self) -> None:
        if self.api_keys:
            logger.info("API keys required: %d configured", len(self.api_keys))
        else:
            logger.warning(
                "no API key configured (EMB_PROVIDER_API_KEY_HASHES, EMB_PROVIDER_API_KEYS_FILE): "
                "the API is open to every client that can reach it"
            )
        if self.admin_keys:
            logger.info("admin endpoints enabled: %d admin keys", len(self.admin_keys))
        if self.allowlist:
            logger.info("clients allowed from %s", ", ".join(map(str, self.allowlist)))
        if self.limiter.enabled:
            logger.info(
                "rate limits per %s: %s requests, %s tokens per %s",
                "API key" if self.api_keys else "client address",
                self.limiter.requests_limit or "unlimited",
                self.limiter.tokens_limit or "unlimited",
                format_duration(self.limiter.window_s),
            )


def _ring(setting: str, text: str) -> KeyRing:
    try:
        return KeyRing(keys_from_list(text))
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from exc


def _networks(setting: str, text: str) -> tuple[Network, ...]:
    try:
        return parse_networks(text)
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from exc


def install_access_control(app: FastAPI, settings: Settings) -> AccessPolicy:
    """Put the policy on ``app.state.access``, add the middleware when anything is on, and say
    at start-up what is on (logging is configured only by then: see ``cli.serve``)."""
    policy = AccessPolicy.from_settings(settings)
    app.state.access = policy
    if policy.needs_middleware:
        app.add_middleware(AccessControl, policy=policy)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app_: Starlette) -> AsyncIterator[None]:
        policy.log_summary()
        async with inner(app_):  # main's lifespan keeps its objects itself: no state to pass on
            yield

    app.router.lifespan_context = lifespan
    return policy


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _masked(key: str) -> str:
    # OpenAI echoes a wrong key with its middle hidden; short ones are hidden whole.
    return f"{key[:3]}***{key[-4:]}" if len(key) >= 12 else "***"


class AccessControl:
    """Pure ASGI middleware; see the module doc."""

    def __init__(
        self, app: ASGIApp, policy: AccessPolicy, public_paths: Iterable[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.policy = policy
        self.public_paths = frozenset(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        address = self._client(scope)
        # POST / is TEI's embed route (api/tei.py): it takes a key like any other API call.
        if is_public_path(scope["path"], self.public_paths) and scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if policy.allowlist and (address is None or not contains(policy.allowlist, address)):
            logger.info("refused client %s: not in EMB_PROVIDER_CLIENT_ALLOWLIST", address)
            await error_response(
                403,
                "Requests from your address are not allowed by this server.",
                type_=PermissionDenied.type,
                code="client_not_allowed",
            )(scope, receive, send)
            return
        key: ApiKey | None = None
        if policy.api_keys:
            presented = bearer_token(_header(scope, b"authorization"))
            if presented is not None:
                key = policy.api_keys.match(presented) or policy.admin_keys.match(presented)
            if key is None:
                message = (
                    _MISSING_KEY
                    if presented is None
                    else f"Incorrect API key provided: {_masked(presented)}."
                )
                await error_response(
                    AuthenticationFailed.status_code,
                    message,
                    type_=AuthenticationFailed.type,
                    code=AuthenticationFailed.default_code,
                    headers={"WWW-Authenticate": "Bearer"},
                )(scope, receive, send)
                return
            scope.setdefault("state", {})["api_key"] = key
        if not policy.limiter.enabled:
            await self.app(scope, receive, send)
            return
        caller = f"key:{key.digest.hex()[:16]}" if key else f"ip:{address}"
        refusal = policy.limiter.acquire(caller)
        if refusal is not None:
            await self._too_many(refusal, caller, scope, receive, send)
            return
        await self.app(scope, receive, self._with_limits(scope, send, caller))

    def _client(self, scope: Scope) -> Address | None:
        """The client's address; behind a trusted proxy it replaces ``scope["client"]``, so
        logs further in see the client, as uvicorn's own proxy-headers middleware does."""
        peer = scope.get("client")
        peer_host = peer[0] if peer else None
        forwarded = (
            [
                value.decode("latin-1")
                for name, value in scope["headers"]
                if name == b"x-forwarded-for"
            ]
            if self.policy.trusted_proxies
            else []
        )
        address = client_address(peer_host, forwarded, self.policy.trusted_proxies)
        if address is not None and str(address) != peer_host and self.policy.trusted_proxies:
            scope["client"] = (str(address), 0)
        return address

    def _with_limits(self, scope: Scope, send: Send, caller: str) -> Send:
        limiter = self.policy.limiter

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                tokens = scope.get("state", {}).get("tokens")
                if isinstance(tokens, int):
                    limiter.debit_tokens(caller, tokens)
                message["headers"] = [*message.get("headers", ()), *limiter.headers(caller)]
            await send(message)

        return send_with_limits

    async def _too_many(
        self, refusal: Refusal, caller: str, scope: Scope, receive: Receive, send: Send
    ) -> None:
        limiter = self.policy.limiter
        window = "min" if limiter.window_s == 60 else format_duration(limiter.window_s)
        abbreviation = "RPM" if refusal.kind == "requests" else "TPM"
        message = (
            f"Rate limit reached on {refusal.kind} per {window} ({abbreviation}): "
            f"Limit {refusal.limit}. Please try again in {format_duration(refusal.retry_after_s)}."
        )
        headers = {
            "Retry-After": str(max(1, math.ceil(refusal.retry_after_s))),
            # The OpenAI SDK prefers this one when it retries (openai/_base_client.py).
            "retry-after-ms": str(max(1, math.ceil(refusal.retry_after_s * 1000))),
            **{name.decode(): value.decode() for name, value in limiter.headers(caller)},
        }
        logger.info("rate limit on %s reached by %s", refusal.kind, caller)
        await error_response(
            429, message, type_=refusal.kind, code="rate_limit_exceeded", headers=headers
        )(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def check_model_access(request: Request, model: str) -> None:
    """404 ``model_not_found`` when the request's key may not use ``model`` (as OpenAI answers
    for a model one has no access to); unknown models are 404 anyway."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    if key is None or key.models is None:
        return
    models: ModelManager = request.app.state.models
    if not key.may_use(models.registry.get(model).names):
        raise ModelNotFound(model)


def may_see_model(request: Request, names: Iterable[str]) -> bool:
    """Whether ``GET /v1/models`` shows a model (with ``names``) to the request's key."""
    key: ApiKey | None = getattr(request.state, "api_key", None)
    return key is None or key.may_use(names)


def admin_endpoints_enabled(request: Request) -> bool:
    """Whether an admin key is configured, so that the admin routes can answer at all (else 403
    ``admin_disabled``); /api/status tells the console, which then does not ask them."""
    policy: AccessPolicy | None = getattr(request.app.state, "access", None)
    return policy is not None and bool(policy.admin_keys)


async def require_admin(request: Request) -> ApiKey:
    """Dependency for admin routes: the admin key that authorised the request.

    403 while no admin key is configured (admin routes are off by default); 401 without a
    configured admin key in ``Authorization: Bearer``.
    """
    policy: AccessPolicy | None = getattr(request.app.state, "access", None)
    if policy is None or not policy.admin_keys:
        raise PermissionDenied(_ADMIN_DISABLED, code="admin_disabled")
    presented = bearer_token(request.headers.get("authorization"))
    if presented is None:
        raise AuthenticationFailed(_MISSING_KEY)
    key = policy.admin_keys.match(presented)
    if key is None:
        raise AuthenticationFailed(f"Incorrect admin key provided: {_masked(presented)}.")
    logger.info("admin request %s %s by %s", request.method, request.url.path, key.name)
    return key


AdminDep = Annotated[ApiKey, Depends(require_admin)]
