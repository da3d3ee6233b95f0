"""The real LiteLLM proxy (``python -m litellm.proxy.proxy_cli --config``) in front of a live
server of ours: its ``/rerank`` scored as ``CrossEncoder.predict`` scores, its ``/v1/embeddings``
as ``SentenceTransformer.encode`` encodes. The config is the one docs/integrations.md shows."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from numpy.testing import assert_allclose
from sentence_transformers import CrossEncoder, SentenceTransformer

from benchmarks.rerankers import build_cross_encoder
from tests.conftest import DEFAULT_MODEL
from tests.live import free_port, live_server, test_settings, wait_until_ok
from tests.tiny_text_models import text_models_file

pytestmark = pytest.mark.slow

#: The proxy's own key (it refuses to start without one); clients of the proxy send it.
PROXY_KEY = "sk-emb-provider-test"
QUERY = "how do foxes find food in winter"
DOCUMENTS = [
    "Foxes hunt small rodents under the snow, listening for them before they pounce.",
    "The stock market closed higher on Tuesday.",
    "In winter a red fox eats mice, voles and whatever it can scavenge.",
    "Bake the bread for forty minutes.",
    "fox",
]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "A vector database stores embeddings."]
#: Importing the proxy and its routes takes tens of seconds on a loaded two-core machine.
PROXY_START_DEADLINE_S = 300


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_cross_encoder("bert", tmp_path_factory.mktemp("reranker") / "bert", max_length=40)


@pytest.fixture(scope="module")
def server_url(reranker: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    models = text_models_file(
        tmp_path_factory.mktemp("models-file") / "models.yaml",
        [{"name": "ms-marco-MiniLM-L6-v2", "source": str(reranker)}],
    )
    with live_server(test_settings(models_file=models)) as url:
        yield url


DOCS = Path(__file__).resolve().parent.parent / "docs" / "integrations.md"
#: Where docs/integrations.md's examples have the server.
DOCS_URL = "http://127.0.0.1:9000"


def proxy_config(server_url: str) -> dict[str, Any]:
    """docs/integrations.md's proxy configs (embeddings, then reranking) in one file, as the docs
    tell readers to combine them, with the server at ``server_url``."""
    text = DOCS.read_text(encoding="utf-8").replace(DOCS_URL, server_url)
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.DOTALL)
    configs = [yaml.safe_load(block) for block in blocks if "model_list:" in block]
    assert len(configs) == 2, "docs/integrations.md: the embeddings and rerank proxy configs"
    embeddings, rerank = configs
    # The rerank model uses the cohere provider: the proxy's /rerank sends Cohere's body to
    # {api_base}/v1/rerank and reads Cohere's answer, both of which we speak (documents come back
    # as {"text": ...}, which LiteLLM's infinity provider would not read).
    assert rerank["model_list"][0]["litellm_params"]["model"].startswith("cohere/")
    config: dict[str, Any] = {**embeddings}
    config["model_list"] = [*embeddings["model_list"], *rerank["model_list"]]
    return config


@pytest.fixture(scope="module")
def proxy_url(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("litellm-proxy")
    config = folder / "config.yaml"
    config.write_text(yaml.safe_dump(proxy_config(server_url)), encoding="utf-8")
    env = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    env.update(
        {
            # The cost map it ships, not GitHub's; no database (DATABASE_URL unset above).
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_MASTER_KEY": PROXY_KEY,
            "EMB_API_KEY": "unused",
            "NO_PROXY": "127.0.0.1",
        }
    )
    port = free_port()
    log = folder / "proxy.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "litellm.proxy.proxy_cli", "--config", str(config)),
                *("--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=folder,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until_ok(
                f"{url}/health/liveliness",
                deadline_s=PROXY_START_DEADLINE_S,
                alive=lambda: None if process.poll() is None else f"exit {process.returncode}",
                interval_s=0.2,
            )
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{log.read_text(errors='replace')[-4000:]}") from exc
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


@pytest.fixture(scope="module")
def proxy(proxy_url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {PROXY_KEY}"}
    with httpx.Client(base_url=proxy_url, headers=headers, timeout=120) as client:
        yield client


def test_proxy_rerank_ranks_as_cross_encoder(proxy: httpx.Client, reranker: Path) -> None:
    expected: np.ndarray = CrossEncoder(str(reranker)).predict(
        [(QUERY, document) for document in DOCUMENTS]
    )
    top = [int(index) for index in np.argsort(-expected, kind="stable")][:3]
    response = proxy.post(
        "/rerank",
        json={
            "model": "reranker",
            "query": QUERY,
            "documents": DOCUMENTS,
            "top_n": 3,
            "return_documents": True,
        },
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [item["index"] for item in results] == top
    assert_allclose([item["relevance_score"] for item in results], expected[top], atol=2e-6)
    assert [item["document"]["text"] for item in results] == [DOCUMENTS[i] for i in top]


def test_proxy_embeddings_match_sentence_transformers(
    proxy: httpx.Client, reference: SentenceTransformer
) -> None:
    response = proxy.post(
        "/v1/embeddings",
        json={"model": DEFAULT_MODEL, "input": TEXTS, "encoding_format": "float"},
    )
    assert response.status_code == 200, response.text
    data = sorted(response.json()["data"], key=lambda item: item["index"])
    got = np.asarray([item["embedding"] for item in data], dtype=np.float64)
    expected = reference.encode(TEXTS, normalize_embeddings=True).astype(np.float64)
    assert got.shape == expected.shape
    cosines = np.sum(got * expected, axis=1) / np.linalg.norm(got, axis=1)
    assert cosines.min() >= 0.99999
