"""Whether the server can take traffic: the default model loaded and warmed up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Readiness:
    default_model: str
    ready: bool = False
    #: Why the server is not ready yet (loading, or the load error).
    detail: str = "loading the default model"
