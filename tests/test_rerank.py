"""Reranking: cross-encoders scored as sentence-transformers' ``CrossEncoder.predict`` scores
them, the task read from the model's files, and the rerank routes of Cohere (v1, v2), Jina, vLLM
and TEI driven by their real clients against a live server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from numpy.testing import assert_allclose
from sentence_transformers import CrossEncoder
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

from benchmarks.families import _tokenizer as family_tokenizer
from benchmarks.families import build
from benchmarks.rerankers import RERANK_FAMILIES, RerankFamily, build_cross_encoder
from emb_model_provider.encoders import decoder_reranker
from emb_model_provider.encoders.base import EncoderInput, LoadOptions
from emb_model_provider.encoders.cross_encoder import CrossEncoderModel, load_cross_encoder
from emb_model_provider.encoders.tasks import detect_task
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings
from tests.test_batch_api import _line, _lines_of, _upload, _wait
from tests.test_tracing import (
    PARENT_ID,
    TRACE_ID,
    OtlpReceiver,
    _of_trace,
    _one,
    _server_span_done,
)
from tests.tiny_text_models import text_models_file

CPU = LoadOptions(device="cpu", dtype="float32")
URL = "/v1/rerank"
#: The tiny models truncate pairs to this many tokens, so that long pairs are cut.
MAX_LENGTH = 40

QUERY = "how do foxes find food in winter"
DOCUMENTS = [
    "Foxes hunt small rodents under the snow, listening for them before they pounce.",
    "The stock market closed higher on Tuesday.",
    "In winter a red fox eats mice, voles and whatever it can scavenge.",
    "Bake the bread for forty minutes.",
    "word " * 80,  # truncated with the query
    "fox",
]


def _pairs(query: str, documents: list[str]) -> list[tuple[str, str]]:
    return [(query, document) for document in documents]


@pytest.fixture(scope="module")
def rerankers(tmp_path_factory: pytest.TempPathFactory) -> dict[RerankFamily, Path]:
    root = tmp_path_factory.mktemp("rerankers")
    return {
        family: build_cross_encoder(family, root / family, max_length=MAX_LENGTH)
        for family in RERANK_FAMILIES
    }


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An NLI-style cross-encoder: three labels, not a reranker."""
    return build_cross_encoder("bert", tmp_path_factory.mktemp("nli") / "nli", num_labels=3)


def _ours(encoder: CrossEncoderModel, pairs: list[tuple[str, str]]) -> tuple[np.ndarray, ...]:
    inputs: list[EncoderInput] = list(pairs)
    logits = encoder.encode(encoder.prepare(inputs, truncate=True))
    return logits, encoder.activate(logits)


# -- the encoder against sentence-transformers --------------------------------------------------


@pytest.mark.parametrize("family", RERANK_FAMILIES)
def test_scores_are_cross_encoder_predict(
    rerankers: dict[RerankFamily, Path], family: RerankFamily
) -> None:
    long_query = " ".join(["winter"] * 30)
    pairs = [*_pairs(QUERY, DOCUMENTS), *_pairs(long_query, DOCUMENTS[:3]), ("a", "b")]
    reference = CrossEncoder(str(rerankers[family]))
    expected = reference.predict(pairs, batch_size=4)
    raw = reference.predict(pairs, batch_size=4, activation_fn=torch.nn.Identity())
    encoder = load_cross_encoder(
        str(rerankers[family]), revision=None, max_input_tokens=None, options=CPU
    )
    assert encoder.max_input_tokens == MAX_LENGTH
    assert encoder.backend == ("length-grouped" if family == "modernbert" else "bert-unpadded")
    logits, scores = _ours(encoder, pairs)
    assert logits.shape == (len(pairs), 1)
    assert_allclose(scores[:, 0], expected, rtol=0, atol=2e-6)
    assert_allclose(logits[:, 0], raw, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.05  # the weights spread the scores: a mistake would show
    # Usage counts the tokens the model processed: the library's truncated pair.
    tokens = [
        len(reference.preprocess([pair])["input_ids"][0])  # type: ignore[index]
        for pair in pairs
    ]
    inputs: list[EncoderInput] = list(pairs)
    assert [item.n_tokens for item in encoder.prepare(inputs, truncate=True)] == tokens
    assert max(tokens) == MAX_LENGTH


@pytest.mark.parametrize("family", ["bert", "xlm-roberta"])
def test_unpadded_forward_equals_the_library_forward(
    rerankers: dict[RerankFamily, Path], family: RerankFamily
) -> None:
    encoder = load_cross_encoder(
        str(rerankers[family]), revision=None, max_input_tokens=None, options=CPU
    )
    unpadded, _ = _ours(encoder, _pairs(QUERY, DOCUMENTS))
    encoder._unpadded = None  # the length-grouped library forward
    grouped, _ = _ours(encoder, _pairs(QUERY, DOCUMENTS))
    assert_allclose(unpadded, grouped, rtol=0, atol=1e-5)


def test_saved_activation_and_labels(tmp_path: Path, classifier: Path) -> None:
    identity = build_cross_encoder("bert", tmp_path / "identity", activation=torch.nn.Identity())
    encoder = load_cross_encoder(str(identity), revision=None, max_input_tokens=None, options=CPU)
    assert encoder.activation == "Identity"
    logits, scores = _ours(encoder, _pairs(QUERY, DOCUMENTS[:3]))
    assert_allclose(scores, logits)
    assert_allclose(
        scores[:, 0], CrossEncoder(str(identity)).predict(_pairs(QUERY, DOCUMENTS[:3])), atol=1e-5
    )
    nli = load_cross_encoder(str(classifier), revision=None, max_input_tokens=None, options=CPU)
    assert (nli.num_labels, nli.activation) == (3, "Identity")
    assert nli.labels == ["label_0", "label_1", "label_2"]
    _, scores = _ours(nli, _pairs(QUERY, DOCUMENTS[:2]))
    expected = CrossEncoder(str(classifier)).predict(_pairs(QUERY, DOCUMENTS[:2]))
    assert_allclose(scores, expected, rtol=0, atol=1e-5)


def test_the_task_is_read_from_the_model_files(
    rerankers: dict[RerankFamily, Path], tmp_path: Path
) -> None:
    cross = rerankers["bert"]
    assert detect_task(cross) == "rerank"
    # Without config_sentence_transformers.json: sentence_bert_config.json's transformer task.
    no_type = Path(shutil.copytree(cross, tmp_path / "no-type"))
    (no_type / "config_sentence_transformers.json").unlink()
    assert detect_task(no_type) == "rerank"
    # A plain transformers checkpoint: its *ForSequenceClassification architecture.
    for name in ("sentence_bert_config.json", "modules.json"):
        (no_type / name).unlink()
    assert detect_task(no_type) == "rerank"
    embedder = build("bert", tmp_path / "embedder", "tiny")
    assert detect_task(embedder) == "embed"


# -- the live server ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(
    rerankers: dict[RerankFamily, Path],
    classifier: Path,
    qwen3_reranker: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    folder = tmp_path_factory.mktemp("models-file")
    models = text_models_file(
        folder / "models.yaml",
        [
            {"name": "ce-bert", "source": str(rerankers["bert"])},
            {"name": "ce-xlmr", "source": str(rerankers["xlm-roberta"])},
            {"name": "ce-modernbert", "source": str(rerankers["modernbert"])},
            {"name": "nli", "source": str(classifier)},
            # A causal LM is a reranker only when the models file says so.
            {
                "name": "qwen3-reranker",
                "source": str(qwen3_reranker),
                "task": "rerank",
                "max_input_tokens": 256,
            },
        ],
    )
    settings = test_settings(models_file=models, max_documents_per_request=8, cache="memory")
    with live_server(settings) as url:
        yield url


@pytest.fixture(scope="module")
def http(server_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=60) as client:
        yield client


def _expected(path: Path, query: str, documents: list[str]) -> np.ndarray:
    scores: np.ndarray = CrossEncoder(str(path)).predict(_pairs(query, documents))
    return scores


def _ranked(scores: np.ndarray) -> list[int]:
    return [int(index) for index in np.argsort(-scores, kind="stable")]


@pytest.mark.parametrize(
    ("name", "family"),
    [("ce-bert", "bert"), ("ce-xlmr", "xlm-roberta"), ("ce-modernbert", "modernbert")],
)
def test_cohere_body_ranks_as_cross_encoder(
    http: httpx.Client,
    rerankers: dict[RerankFamily, Path],
    name: str,
    family: RerankFamily,
) -> None:
    expected = _expected(rerankers[family], QUERY, DOCUMENTS)
    for route in ("/v1/rerank", "/v2/rerank", "/rerank"):
        response = http.post(route, json={"model": name, "query": QUERY, "documents": DOCUMENTS})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == name and body["id"]
        results = body["results"]
        assert [item["index"] for item in results] == _ranked(expected)
        assert all("document" not in item for item in results)  # never "document": null
        assert_allclose(
            [item["relevance_score"] for item in results], expected[_ranked(expected)], atol=2e-6
        )
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > len(DOCUMENTS)
        assert body["meta"]["billed_units"]["search_units"] == 1


def test_top_n_documents_as_objects_and_return_documents(
    http: httpx.Client, rerankers: dict[RerankFamily, Path]
) -> None:
    expected = _expected(rerankers["bert"], QUERY, DOCUMENTS)
    body = http.post(
        "/v1/rerank",
        json={
            "model": "ce-bert",
            "query": QUERY,
            "documents": [{"text": text, "id": index} for index, text in enumerate(DOCUMENTS)],
            "top_n": 2,
            "return_documents": True,
            "rank_fields": ["text"],  # Cohere v1's; ignored
        },
    ).json()
    top = _ranked(expected)[:2]
    assert [item["index"] for item in body["results"]] == top
    assert [item["document"]["text"] for item in body["results"]] == [DOCUMENTS[i] for i in top]
    many = http.post(
        "/v1/rerank", json={"model": "ce-bert", "query": QUERY, "documents": ["a"], "top_n": 5}
    ).json()
    assert len(many["results"]) == 1


def test_tei_body_and_answer(http: httpx.Client, rerankers: dict[RerankFamily, Path]) -> None:
    expected = _expected(rerankers["bert"], QUERY, DOCUMENTS)
    # No model: the models file's first reranker serves it.
    response = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True})
    assert response.status_code == 200, response.text
    ranks = response.json()
    assert isinstance(ranks, list)
    assert [item["index"] for item in ranks] == _ranked(expected)
    assert_allclose([item["score"] for item in ranks], expected[_ranked(expected)], atol=2e-6)
    assert [item["text"] for item in ranks] == [DOCUMENTS[i] for i in _ranked(expected)]
    raw = http.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True})
    logits = CrossEncoder(str(rerankers["bert"])).predict(
        _pairs(QUERY, DOCUMENTS), activation_fn=torch.nn.Identity()
    )
    assert_allclose([item["score"] for item in raw.json()], logits[_ranked(logits)], atol=1e-5)
    assert all("text" not in item for item in raw.json())


def test_cached_answers_equal_computed_ones(http: httpx.Client) -> None:
    documents = [f"{text} (cache test)" for text in DOCUMENTS]
    body = {"model": "ce-xlmr", "query": QUERY, "documents": documents}
    first = http.post("/v1/rerank", json=body).json()
    again = http.post("/v1/rerank", json=body).json()
    assert first["results"] == again["results"]
    assert first["usage"] == again["usage"]
    metrics = http.get("/metrics").text
    assert 'emb_provider_inputs_total{model="ce-xlmr",task="rerank"}' in metrics


def test_models_list_each_task(server_url: str) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    tasks = {model.id: getattr(model, "task", None) for model in client.models.list().data}
    assert tasks["ce-bert"] == tasks["ce-modernbert"] == tasks["nli"] == "rerank"
    assert tasks[DEFAULT_MODEL] == "embed"


def _error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    error: dict[str, str] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_bad_requests_are_400s(http: httpx.Client) -> None:
    base = {"model": "ce-bert", "query": QUERY, "documents": DOCUMENTS[:2]}
    for change, param in [
        ({"query": ""}, "query"),
        ({"query": None}, "query"),
        ({"documents": []}, "documents"),
        ({"documents": "one document"}, "documents"),
        ({"documents": [{"title": "no text"}]}, "documents"),
        ({"top_n": 0}, "top_n"),
        ({"documents": ["d"] * 9}, "documents"),  # over max_documents_per_request
    ]:
        body = {key: value for key, value in {**base, **change}.items() if value is not None}
        error = _error(http.post("/v1/rerank", json=body), 400)
        assert error["param"] is not None and error["param"].startswith(param), (change, error)
    missing = {key: value for key, value in base.items() if key != "query"}
    assert _error(http.post("/v2/rerank", json=missing), 400)["param"] == "query"
    assert (
        _error(http.post("/v1/rerank", json={**base, "model": "no-such"}), 404)["code"]
        == "model_not_found"
    )
    too_long = {**base, "documents": ["word " * 80], "truncate": False}
    error = _error(http.post("/rerank", json=too_long), 400)
    assert error["code"] == "context_length_exceeded" and str(MAX_LENGTH) in error["message"]
    assert http.get("/health").status_code == 200


def test_models_are_served_only_as_their_task(http: httpx.Client) -> None:
    error = _error(
        http.post("/v1/rerank", json={"model": DEFAULT_MODEL, "query": "q", "documents": ["d"]}),
        400,
    )
    assert error["param"] == "model" and "embedding model" in error["message"]
    error = _error(http.post("/v1/embeddings", json={"model": "ce-bert", "input": "x"}), 400)
    assert "reranker" in error["message"] and "/v1/rerank" in error["message"]
    error = _error(
        http.post("/v1/rerank", json={"model": "nli", "query": "q", "documents": ["d"]}), 400
    )
    assert error["code"] == "not_a_reranker" and "3 labels" in error["message"]
    assert "label_0" in error["message"]


# -- real clients -------------------------------------------------------------------------------


def test_cohere_sdk_v1_and_v2(server_url: str, rerankers: dict[RerankFamily, Path]) -> None:
    import cohere

    expected = _expected(rerankers["bert"], QUERY, DOCUMENTS)
    top = _ranked(expected)[:3]
    v1 = cohere.Client(api_key="unused", base_url=server_url)
    reply = v1.rerank(
        model="ce-bert", query=QUERY, documents=DOCUMENTS, top_n=3, return_documents=True
    )
    assert [item.index for item in reply.results] == top
    assert_allclose([item.relevance_score for item in reply.results], expected[top], atol=2e-6)
    assert [item.document.text for item in reply.results if item.document] == [
        DOCUMENTS[i] for i in top
    ]
    assert reply.meta is not None and reply.meta.billed_units is not None
    v2 = cohere.ClientV2(api_key="unused", base_url=server_url)
    reply2 = v2.rerank(model="ce-bert", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [item.index for item in reply2.results] == top
    with pytest.raises(cohere.errors.BadRequestError):
        v2.rerank(model=DEFAULT_MODEL, query=QUERY, documents=DOCUMENTS)


@pytest.mark.parametrize(
    ("provider", "suffix"),
    [
        ("cohere", ""),
        ("infinity", ""),
        ("hosted_vllm", ""),
        ("hosted_vllm", "/v1"),
        ("huggingface", ""),
        ("jina_ai", ""),
    ],
)
def test_litellm_rerank(
    server_url: str,
    rerankers: dict[RerankFamily, Path],
    monkeypatch: pytest.MonkeyPatch,
    provider: str,
    suffix: str,
) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    # TEI's body names no model: the models file's first reranker serves it.
    family: RerankFamily = "bert" if provider == "huggingface" else "xlm-roberta"
    expected = _expected(rerankers[family], QUERY, DOCUMENTS)
    top = _ranked(expected)[:3]
    # LiteLLM's infinity provider reads Infinity's documents, bare strings, where Cohere, Jina
    # and vLLM answer {"text": ...}: it is used without return_documents.
    documents = provider != "infinity"
    response = litellm.rerank(
        model=f"{provider}/ce-xlmr",
        query=QUERY,
        documents=DOCUMENTS,
        top_n=3,
        return_documents=documents,
        api_base=f"{server_url}{suffix}",
        api_key="unused",
    )
    results = response.results or []
    assert [item["index"] for item in results] == top
    assert_allclose([item["relevance_score"] for item in results], expected[top], atol=2e-6)
    if documents:
        assert [item["document"]["text"] for item in results] == [DOCUMENTS[i] for i in top]
    else:
        assert all("document" not in item for item in results)


# -- the Batch API ------------------------------------------------------------------------------


def test_batch_api_runs_rerank_lines(server_url: str, rerankers: dict[RerankFamily, Path]) -> None:
    client = openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0)
    lines = [
        _line("ok", {"model": "ce-bert", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}, URL),
        _line("bad", {"model": "ce-bert", "query": "", "documents": DOCUMENTS}, URL),
        _line("embedder", {"model": DEFAULT_MODEL, "query": "q", "documents": ["d"]}, URL),
    ]
    batch = client.batches.create(
        input_file_id=_upload(client, lines),
        endpoint=URL,  # not in the SDK's Literal of OpenAI's endpoints; sent as is
        completion_window="24h",
    )
    done = _wait(client, batch.id)
    assert done.status == "completed", done.errors
    out = {line["custom_id"]: line["response"] for line in _lines_of(client, done.output_file_id)}
    errors = {line["custom_id"]: line["response"] for line in _lines_of(client, done.error_file_id)}
    expected = _expected(rerankers["bert"], QUERY, DOCUMENTS)
    assert [item["index"] for item in out["ok"]["body"]["results"]] == _ranked(expected)[:2]
    assert errors["bad"]["status_code"] == 400
    assert errors["embedder"]["body"]["error"]["param"] == "model"
    # Embedding lines in a rerank batch are refused at validation, by line.
    wrong = client.batches.create(
        input_file_id=_upload(client, [_line("e", {"model": DEFAULT_MODEL, "input": "x"})]),
        endpoint=URL,
        completion_window="24h",
    )
    failed = _wait(client, wrong.id)
    assert failed.status == "failed" and failed.errors and failed.errors.data
    assert failed.errors.data[0].code == "invalid_url"


# -- decoder rerankers (Qwen3-Reranker style) ---------------------------------------------------


def tiny_qwen3_reranker(path: Path) -> Path:
    """A tiny random Qwen3ForCausalLM with the bundled vocabulary ("yes" and "no" in it)."""
    torch.manual_seed(0)
    config = Qwen3Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=30522,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=102,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    Qwen3ForCausalLM(config).eval().save_pretrained(path)
    family_tokenizer("qwen3", lowercase=True).save_pretrained(path)
    return path


def _transformers_yes_probability(
    path: Path, pairs: list[tuple[str, str]], max_length: int, truncation_side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """The model card's computation with transformers: the template, the tokenizer's
    longest-first truncation of the pair's text (from ``truncation_side``), the full causal LM,
    softmax over [no, yes] of the last position; and the logit difference."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokenizer.truncation_side = truncation_side
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    prefix = tokenizer.encode(decoder_reranker.PREFIX, add_special_tokens=False)
    suffix = tokenizer.encode(decoder_reranker.SUFFIX, add_special_tokens=False)
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    texts = [decoder_reranker.pair_text(query, document) for query, document in pairs]
    encoded = tokenizer(
        texts,
        padding=False,
        truncation="longest_first",
        max_length=max_length - len(prefix) - len(suffix),
        add_special_tokens=False,
    )
    probabilities, differences = [], []
    with torch.inference_mode():
        for ids in encoded["input_ids"]:
            logits = model(input_ids=torch.tensor([prefix + ids + suffix])).logits[0, -1]
            pair = torch.stack([logits[no], logits[yes]])
            probabilities.append(float(torch.log_softmax(pair, dim=0)[1].exp()))
            differences.append(float(logits[yes] - logits[no]))
    return np.array(probabilities), np.array(differences)


@pytest.fixture(scope="module")
def qwen3_reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen3_reranker(tmp_path_factory.mktemp("qwen3-reranker") / "model")


def test_decoder_reranker_is_the_yes_no_computation(qwen3_reranker: Path) -> None:
    assert detect_task(qwen3_reranker) == "embed"  # only the models file makes it a reranker
    encoder = decoder_reranker.load_decoder_reranker(
        str(qwen3_reranker), revision=None, max_input_tokens=256, options=CPU
    )
    long_query = " ".join(["winter"] * 250)
    pairs = [*_pairs(QUERY, DOCUMENTS), (long_query, DOCUMENTS[0])]
    expected, differences = _transformers_yes_probability(qwen3_reranker, pairs, 256)
    inputs: list[EncoderInput] = list(pairs)
    logits = encoder.encode(encoder.prepare(inputs, truncate=True))
    assert_allclose(logits[:, 0], differences, rtol=0, atol=1e-4)
    assert_allclose(encoder.activate(logits)[:, 0], expected, rtol=0, atol=1e-5)
    assert np.ptp(expected) > 0.01
    assert max(item.n_tokens for item in encoder.prepare(inputs, truncate=True)) == 256


def test_decoder_reranker_on_the_rerank_route(http: httpx.Client, qwen3_reranker: Path) -> None:
    expected, _ = _transformers_yes_probability(qwen3_reranker, _pairs(QUERY, DOCUMENTS), 256)
    body = http.post(
        "/v1/rerank", json={"model": "qwen3-reranker", "query": QUERY, "documents": DOCUMENTS}
    ).json()
    results = body["results"]
    assert [item["index"] for item in results] == _ranked(expected)
    assert_allclose(
        [item["relevance_score"] for item in results], expected[_ranked(expected)], atol=1e-5
    )


# -- traces and concurrency ---------------------------------------------------------------------


def test_rerank_requests_are_traced(rerankers: dict[RerankFamily, Path], tmp_path: Path) -> None:
    models = text_models_file(
        tmp_path / "models.yaml", [{"name": "ce-bert", "source": str(rerankers["bert"])}]
    )
    with OtlpReceiver() as receiver, pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
        env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
        env.delenv("OTEL_TRACES_SAMPLER", raising=False)
        settings = test_settings(models_file=models, cache="memory")
        with live_server(settings) as url:
            response = httpx.post(
                f"{url}/v1/rerank",
                json={"model": "ce-bert", "query": QUERY, "documents": DOCUMENTS[:3]},
                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
                timeout=60,
            )
            assert response.status_code == 200
            spans = _of_trace(TRACE_ID)(
                receiver.wait_for("server span", _server_span_done(TRACE_ID, "/v1/rerank"))
            )
    server = _one(spans, "POST /v1/rerank")
    assert server.parent_id == PARENT_ID
    assert server.attributes["gen_ai.request.model"] == "ce-bert"
    tokens = response.json()["usage"]["prompt_tokens"]
    assert server.attributes["gen_ai.usage.input_tokens"] == tokens
    for name in ("rerank.check_inputs", "cache.lookup", "rerank.tokenize", "batcher.queue_wait"):
        assert _one(spans, name).parent_id == server.span_id
    assert _one(spans, "rerank.tokenize").attributes["emb.inputs"] == 3


def test_concurrent_requests_share_batches_and_keep_their_answers(
    http: httpx.Client, rerankers: dict[RerankFamily, Path]
) -> None:
    """Pairs of many clients are merged into the model's batches; each request still gets its
    own documents' scores, in its order."""
    queries = [f"{QUERY} {index}" for index in range(8)]
    reference = CrossEncoder(str(rerankers["modernbert"]))

    def one(query: str) -> list[tuple[int, float]]:
        body = http.post(
            "/v1/rerank", json={"model": "ce-modernbert", "query": query, "documents": DOCUMENTS}
        ).json()
        return [(item["index"], item["relevance_score"]) for item in body["results"]]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, queries))
    for query, answer in zip(queries, answers, strict=True):
        expected = reference.predict(_pairs(query, DOCUMENTS))
        assert [index for index, _ in answer] == _ranked(expected)
        assert_allclose([score for _, score in answer], expected[_ranked(expected)], atol=2e-6)
