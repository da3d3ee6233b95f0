"""The one error tree of the server, free of HTTP frameworks.

Every failure a client can see is a ``ProviderError``; ``api/exceptions.py`` maps it once to
OpenAI's error body ``{"error": {"message", "type", "param", "code"}}`` and a status code. The
status codes are the ones the OpenAI SDK maps to its exception classes (``openai/_client.py``:
400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, >=500
InternalServerError).
"""

from __future__ import annotations


class ProviderError(Exception):
    status_code: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after_s = retry_after_s


class InvalidRequest(ProviderError):
    status_code = 400
    type = "invalid_request_error"


class BadInput(InvalidRequest):
    """One input of a request is unusable; ``index`` says which, so callers can name it."""

    def __init__(self, index: int, reason: str, *, code: str | None = None) -> None:
        super().__init__(f"input[{index}]: {reason}", param="input", code=code)
        self.index = index
        self.reason = reason


class ContextLengthExceeded(InvalidRequest):
    """An input longer than the model's context with truncation off, in OpenAI's words (the
    message the OpenAI API gives for the same case; clients match on the code)."""

    default_code = "context_length_exceeded"

    def __init__(self, limit: int, n_tokens: int, *, param: str = "input") -> None:
        super().__init__(
            f"This model's maximum context length is {limit} tokens, however you requested "
            f"{n_tokens} tokens ({n_tokens} in your prompt; 0 for the completion). Please reduce "
            "your prompt; or completion length.",
            param=param,
        )
        self.limit = limit
        self.n_tokens = n_tokens


class ModelNotFound(ProviderError):
    status_code = 404
    type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
        )


class UpstreamFailed(ProviderError):
    """A remote server the client pointed us at (an image URL) failed or did not answer."""

    status_code = 502
    type = "invalid_request_error"
    default_code = "image_fetch_failed"


class Overloaded(ProviderError):
    """The bounded queue is full: the client should back off and retry."""

    status_code = 429
    type = "rate_limit_error"
    default_code = "server_overloaded"


class NotReady(ProviderError):
    status_code = 503
    type = "server_error"
    default_code = "not_ready"


class ModelLoadFailed(ProviderError):
    """A registered model could not be loaded; the server keeps serving the others."""

    status_code = 503
    type = "server_error"
    default_code = "model_load_failed"


class Internal(ProviderError):
    status_code = 500
    type = "server_error"
    default_code = "internal_error"


class AuthenticationFailed(ProviderError):
    """No API key, or one that is not configured (OpenAI: 401, ``invalid_api_key``)."""

    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(ProviderError):
    """The caller is known but may not do this (a client address, admin routes switched off)."""

    status_code = 403
    type = "request_forbidden"  # OpenAI's type for its 403 answers


class ConfigError(Exception):
    """A setting that cannot work; raised at start-up and reported as one line."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message
