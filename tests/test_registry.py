"""The model registry and the models file on a live server: local folders (absolute, relative to
the file), tiny random BERT models against sentence-transformers, the hub cache, lazy loading, and
models that cannot be loaded. The hub is a local socket that never answers, so nothing leaves
127.0.0.1 and an unreachable hub is the worst case: packets that go unanswered.
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import huggingface_hub.constants
import numpy as np
import openai
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoTokenizer, BertConfig, BertModel

from emb_model_provider.core.errors import ConfigError
from emb_model_provider.main import create_app
from emb_model_provider.registry import Registry
from tests.conftest import BUNDLED_DIR, DEFAULT_MODEL
from tests.live import live_server, test_settings

TINY_SEQ_LENGTH = 64
TINY_HIDDEN = 32
HUB_REPO = "tiny-org/tiny-hub"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
LONG = " ".join(f"token{i} and words" for i in range(120))  # far over 64 (and 256) tokens
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "a",
    "ünïcödé: 日本語のテキスト, emojis 🙂🚀, Ελληνικά",
    LONG,
    "Short.",
]
MODELS_LOGGER = "emb_model_provider.services.models"


# -- fixtures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    #: A plain transformers checkpoint (BertModel + the bundled tokenizer).
    transformer_dir: Path
    #: The same weights saved by sentence-transformers (Transformer, mean Pooling, Normalize).
    sentence_dir: Path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A random 2-layer BERT (hidden size 32) saved as a sentence-transformers model."""
    root = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_DIR))
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=TINY_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    transformer_dir = root / "transformer"
    BertModel(config).save_pretrained(str(transformer_dir))
    tokenizer.save_pretrained(str(transformer_dir))
    sentence_dir = root / "sentence"
    _sentence_model(transformer_dir, "mean", normalize=True).save(str(sentence_dir))
    return TinyModel(transformer_dir, sentence_dir)


def _sentence_model(transformer_dir: Path, pooling: str, *, normalize: bool) -> SentenceTransformer:
    modules = [
        Transformer(str(transformer_dir), max_seq_length=TINY_SEQ_LENGTH),
        Pooling(TINY_HIDDEN, pooling),
    ]
    return SentenceTransformer(
        modules=[*modules, Normalize()] if normalize else modules, device="cpu"
    )


class SilentHub:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: what a client sees
    of a hub whose replies are dropped. Counts the connections, so that a test can tell whether
    anything asked the hub at all."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._connections: list[socket.socket] = []
        self._lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                self._connections.append(connection)

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for connection in self._connections:
                connection.close()


@pytest.fixture(scope="module")
def silent_hub() -> Iterator[SilentHub]:
    """huggingface_hub's endpoint (``HF_ENDPOINT``, read when the library is imported) pointed at
    the silent hub for this module, so that no test here can reach the real hub."""
    hub = SilentHub()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        yield hub
    hub.close()


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    """A hub cache holding HUB_REPO as huggingface_hub lays it out: ``refs/main`` names a commit
    whose files are under ``snapshots/<commit>/``; all-MiniLM-L12-v2 is not in it."""
    cache = tmp_path_factory.mktemp("hub-cache")
    repo = cache / ("models--" + HUB_REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(HUB_COMMIT, encoding="utf-8")
    shutil.copytree(tiny_model.sentence_dir, repo / "snapshots" / HUB_COMMIT)
    return cache


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory, tiny_model: TinyModel) -> Path:
    folder = tmp_path_factory.mktemp("models-file")
    (folder / "bundled-link").symlink_to(BUNDLED_DIR, target_is_directory=True)
    (folder / "tiny-beside").symlink_to(tiny_model.sentence_dir.parent, target_is_directory=True)
    tiny = tiny_model.sentence_dir
    path = folder / "models.yaml"
    path.write_text(
        f"""
models:
  - name: my-minilm
    source: {BUNDLED_DIR}
    aliases: [team/minilm, minilm]
    dimensions: 384
    max_input_tokens: 256
    owned_by: team
  - name: rel-minilm
    source: ./bundled-link          # relative to this file's folder
  - name: bf16-minilm
    source: {BUNDLED_DIR}
    dtype: bfloat16
  - name: fp16-minilm
    source: {BUNDLED_DIR}
    dtype: float16
  - name: tiny
    source: {tiny}
  - name: tiny-rel
    source: tiny-beside/{tiny.name}  # relative without ./, beside this file
  - name: tiny-cls
    source: {tiny}
    pooling: cls
  - name: tiny-max
    source: {tiny}
    pooling: max
  - name: tiny-unnormalized
    source: {tiny}
    normalize: false
  - name: tiny-lazy
    source: {tiny}
  - name: tiny-hub
    source: {HUB_REPO}
  - name: missing-dir
    source: ./no-such-folder
  - name: bad-id
    source: not a/valid hub/id
  - name: pictures
    source: {tiny}
    modality: image
""",
        encoding="utf-8",
    )
    return path


@dataclass(frozen=True)
class Server:
    url: str
    http: httpx.Client
    sdk: openai.OpenAI


@pytest.fixture(scope="module")
def server(models_file: Path, hub_cache: Path, silent_hub: SilentHub) -> Iterator[Server]:
    settings = test_settings(models_file=models_file, cache_dir=hub_cache)
    with (
        live_server(settings) as url,
        httpx.Client(base_url=url, timeout=120) as http,
        openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=120) as sdk,
    ):
        yield Server(url, http, sdk)


# -- helpers --------------------------------------------------------------------------------------


def _vectors(response: openai.types.CreateEmbeddingResponse) -> np.ndarray:
    assert [item.index for item in response.data] == list(range(len(response.data)))
    return np.vstack([np.asarray(item.embedding, dtype=np.float32) for item in response.data])


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    cosine = np.sum(ours * ref, axis=1) / (
        np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1)
    )
    assert cosine.min() >= 0.99999, cosine
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)


def _card(server: Server, name: str) -> dict[str, object]:
    listing = server.http.get("/v1/models")
    assert listing.status_code == 200
    cards = {card["id"]: card for card in listing.json()["data"]}
    assert name in cards, sorted(cards)
    card: dict[str, object] = cards[name]
    return card


def _embed(server: Server, model: str, texts: list[str]) -> openai.types.CreateEmbeddingResponse:
    return server.sdk.embeddings.create(model=model, input=texts, encoding_format="float")


def _expected_tokens(reference: SentenceTransformer, texts: list[str]) -> int:
    features = reference.tokenizer(texts, truncation=True, max_length=reference.max_seq_length)
    return sum(len(ids) for ids in features["input_ids"])


def _assert_default_still_serves(server: Server) -> None:
    assert server.http.get("/ready").status_code == 200
    response = _embed(server, DEFAULT_MODEL, ["still serving"])
    assert _vectors(response).shape == (1, 384)


# -- local folders ---------------------------------------------------------------------------------


def test_models_file_entry_is_listed_with_its_fields(server: Server) -> None:
    card = _card(server, "my-minilm")
    assert card["object"] == "model"
    assert card["modality"] == "text"
    assert card["dimensions"] == 384
    assert card["max_input_tokens"] == 256
    assert card["owned_by"] == "team"
    assert card["aliases"] == ["team/minilm", "minilm"]
    for name in ("my-minilm", "team/minilm", "minilm"):
        retrieved = server.http.get(f"/v1/models/{name}")
        assert retrieved.status_code == 200, retrieved.text
        assert retrieved.json()["id"] == "my-minilm"
    assert server.sdk.models.retrieve("team/minilm").id == "my-minilm"
    # The built-in models stay listed next to the file's.
    assert _card(server, DEFAULT_MODEL)["modality"] == "text"


def test_local_model_matches_the_default_model_and_sentence_transformers(
    server: Server, reference: SentenceTransformer
) -> None:
    ours = _vectors(_embed(server, "minilm", TEXTS))
    default = _vectors(_embed(server, DEFAULT_MODEL, TEXTS))
    np.testing.assert_allclose(ours, default, atol=1e-6)
    _assert_close(ours, reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True))


def test_a_model_can_run_in_its_own_dtype(server: Server, reference: SentenceTransformer) -> None:
    """``dtype: bfloat16`` in the models file: that model runs in bfloat16 (its vectors are not
    the float32 ones, but within cosine 0.999 of them) while the others stay float32."""
    ours = _vectors(_embed(server, "bf16-minilm", TEXTS))
    default = _vectors(_embed(server, DEFAULT_MODEL, TEXTS))
    ref = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(ours - default).max() > 1e-4  # not float32
    assert np.sum(ours * ref, axis=1).min() >= 0.999
    _assert_close(default, ref)


def test_float16_on_the_cpu_fails_with_the_reason(server: Server) -> None:
    if torch.cuda.is_available():
        pytest.skip("this server would run on CUDA, where float16 is allowed")
    assert "float16 is not supported on the CPU" in _load_error(server, "fp16-minilm")
    _assert_default_still_serves(server)


def test_relative_path_loads_on_first_use(server: Server, reference: SentenceTransformer) -> None:
    before = _card(server, "rel-minilm")
    # Nothing said in the file and nothing loaded: the card says what it does not know yet.
    assert (before["loaded"], before["dimensions"], before["max_input_tokens"]) == (
        False,
        None,
        None,
    )
    response = _embed(server, "rel-minilm", TEXTS)
    assert response.model == "rel-minilm"
    _assert_close(
        _vectors(response),
        reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True),
    )
    after = _card(server, "rel-minilm")
    assert (after["loaded"], after["dimensions"], after["max_input_tokens"]) == (True, 384, 256)


def test_relative_paths_are_taken_from_the_models_file_folder(models_file: Path) -> None:
    registry = Registry.from_settings(models_file)
    assert registry.get("rel-minilm").source == str(BUNDLED_DIR.resolve())
    tiny_rel = Path(registry.get("tiny-rel").source)
    assert tiny_rel.is_absolute()
    assert tiny_rel.is_dir()
    assert registry.get("tiny-hub").source == HUB_REPO  # a hub id stays one


# -- tiny random models against sentence-transformers -------------------------------------------


#: model name -> (pooling, normalize) of the sentence-transformers model it must match.
TINY_VARIANTS: dict[str, tuple[str, bool]] = {
    "tiny": ("mean", True),
    "tiny-rel": ("mean", True),
    "tiny-cls": ("cls", True),
    "tiny-max": ("max", True),
    "tiny-unnormalized": ("mean", False),
}


@pytest.mark.parametrize("model", sorted(TINY_VARIANTS))
def test_tiny_model_matches_sentence_transformers(
    server: Server, tiny_model: TinyModel, model: str
) -> None:
    pooling, normalize = TINY_VARIANTS[model]
    if model in ("tiny", "tiny-rel"):
        # The saved directory itself, as sentence-transformers reads it.
        reference = SentenceTransformer(str(tiny_model.sentence_dir), device="cpu")
    else:
        reference = _sentence_model(tiny_model.transformer_dir, pooling, normalize=normalize)
    assert reference.max_seq_length == TINY_SEQ_LENGTH
    expected = reference.encode(TEXTS, convert_to_numpy=True)

    response = _embed(server, model, TEXTS)
    ours = _vectors(response)
    assert ours.shape == (len(TEXTS), TINY_HIDDEN)
    _assert_close(ours, expected)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    else:
        assert not np.allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-3)
    # Usage counts the model's tokens, [CLS] and [SEP] included, after truncation to 64.
    tokens = _expected_tokens(reference, TEXTS)
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokens
    single = _embed(server, model, [LONG])
    assert single.usage.prompt_tokens == TINY_SEQ_LENGTH
    _assert_close(_vectors(single), reference.encode([LONG], convert_to_numpy=True))
    card = _card(server, model)
    assert (card["loaded"], card["dimensions"], card["max_input_tokens"]) == (
        True,
        TINY_HIDDEN,
        TINY_SEQ_LENGTH,
    )


def test_hub_id_loads_from_the_hub_cache_without_network(
    server: Server, tiny_model: TinyModel, silent_hub: SilentHub
) -> None:
    assert _card(server, "tiny-hub")["loaded"] is False
    connections = silent_hub.connections
    response = _embed(server, "tiny-hub", TEXTS)
    assert silent_hub.connections == connections, "the cached model was looked up on the hub"
    reference = SentenceTransformer(str(tiny_model.sentence_dir), device="cpu")
    _assert_close(_vectors(response), reference.encode(TEXTS, convert_to_numpy=True))
    assert _card(server, "tiny-hub")["loaded"] is True


# -- lazy loading ---------------------------------------------------------------------------------


def test_concurrent_first_requests_load_the_model_once(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    assert _card(server, "tiny-lazy")["loaded"] is False
    clients = 16
    barrier = threading.Barrier(clients)

    def one(i: int) -> np.ndarray:
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0) as own:
            barrier.wait(timeout=60)  # all 16 ask before any answer can come
            return _vectors(own.embeddings.create(model="tiny-lazy", input=f"lazy {i % 2}"))[0]

    with (
        caplog.at_level(logging.INFO, logger=MODELS_LOGGER),
        ThreadPoolExecutor(max_workers=clients) as pool,
    ):
        got = list(pool.map(one, range(clients)))
    loads = [
        record
        for record in caplog.records
        if record.name == MODELS_LOGGER
        and record.msg.startswith("loading model")
        and isinstance(record.args, tuple)
        and record.args[0] == "tiny-lazy"
    ]
    assert len(loads) == 1, [record.getMessage() for record in loads]
    for i, vector in enumerate(got):
        np.testing.assert_allclose(vector, got[i % 2], atol=1e-6)
    assert _card(server, "tiny-lazy")["loaded"] is True


# -- models that cannot be served ----------------------------------------------------------------


def _error_message(error: openai.APIStatusError) -> str:
    # The SDK's ``error.message`` is prefixed with "Error code: ..."; the body is the server's.
    assert isinstance(error.body, dict), error.body
    message = error.body["message"]
    assert isinstance(message, str)
    return message


def _load_error(server: Server, model: str) -> str:
    """The message of the 503 that a request for ``model`` gets."""
    with pytest.raises(openai.InternalServerError) as caught:
        _embed(server, model, ["hello"])
    error = caught.value
    assert error.status_code == 503
    assert error.code == "model_load_failed"
    assert error.type == "server_error"
    assert error.param == "model"
    message = _error_message(error)
    assert message.startswith(f"The model `{model}` could not be loaded: ")
    return message


def test_missing_local_directory_fails_with_the_reason(server: Server) -> None:
    message = _load_error(server, "missing-dir")
    assert "no-such-folder does not exist" in message
    assert _card(server, "missing-dir")["loaded"] is False
    _assert_default_still_serves(server)
    # A later request tries again, and fails the same way.
    assert "does not exist" in _load_error(server, "missing-dir")
    _assert_default_still_serves(server)


def test_source_that_is_neither_a_folder_nor_a_hub_id_fails_with_the_reason(
    server: Server, silent_hub: SilentHub
) -> None:
    connections = silent_hub.connections
    message = _load_error(server, "bad-id")
    assert "not a/valid hub/id is neither a local directory nor a hub id" in message
    assert silent_hub.connections == connections
    _assert_default_still_serves(server)


def test_hub_model_that_is_not_cached_fails_when_the_hub_is_unreachable(
    server: Server, silent_hub: SilentHub, record_property: Callable[[str, object], None]
) -> None:
    connections = silent_hub.connections
    started = time.monotonic()
    message = _load_error(server, "all-MiniLM-L12-v2")
    took_s = time.monotonic() - started
    record_property("unreachable_hub_load_failure_s", round(took_s, 2))
    assert silent_hub.connections > connections  # it did ask (the silent hub), and gave up
    assert "not in the hub cache and the hub cannot be reached" in message
    assert "EMB_PROVIDER_CACHE_DIR" in message
    assert _card(server, "all-MiniLM-L12-v2")["loaded"] is False
    _assert_default_still_serves(server)


def test_image_model_entry_is_refused_clearly(server: Server) -> None:
    card = _card(server, "pictures")
    assert (card["modality"], card["loaded"]) == ("image", False)
    with pytest.raises(openai.APIStatusError) as caught:
        _embed(server, "pictures", ["a photo of a cat"])
    message = _error_message(caught.value)
    assert 400 <= caught.value.status_code < 600
    assert "`pictures`" in message
    assert "image" in message
    _assert_default_still_serves(server)


# -- invalid models files and settings -----------------------------------------------------------

BAD_MODELS_FILES: dict[str, tuple[str, str]] = {
    # case -> (file content, a fragment the message must hold)
    "bad yaml": ("models: [\n  - name: x\n", "cannot read"),
    "empty file": ("", "models:"),
    "no models key": ("model:\n  - name: x\n    source: /tmp\n", "models: Field required"),
    "not a mapping": ("- name: x\n  source: /tmp\n", "models:"),
    "typo in a key": (
        "models:\n  - name: x\n    source: /tmp\n    max_input_token: 5\n",
        "models.0.max_input_token: Extra inputs are not permitted",
    ),
    "misspelt source": ("models:\n  - name: x\n    sourse: /tmp\n", "sourse"),
    "bad modality": ("models:\n  - name: x\n    source: /tmp\n    modality: audio\n", "modality"),
    "missing source": ("models:\n  - name: x\n", "models.0: Value error, give `source`"),
    "pinned without prompt": (
        "models:\n  - name: x\n    base: y\n",
        "an entry with `base` pins a prompt: give `prompt_name`",
    ),
    "pinned with its own weights": (
        "models:\n  - name: x\n    base: y\n    prompt_name: q\n    dtype: bfloat16\n",
        "dtype cannot be set on it",
    ),
    "prompt without base": (
        "models:\n  - name: x\n    source: /tmp\n    prompt_name: q\n",
        "give `base` too",
    ),
    "bad dtype": ("models:\n  - name: x\n    source: /tmp\n    dtype: int8\n", "dtype"),
    "bad pooling": ("models:\n  - name: x\n    source: /tmp\n    pooling: sum\n", "pooling"),
    "zero max tokens": (
        "models:\n  - name: x\n    source: /tmp\n    max_input_tokens: 0\n",
        "max_input_tokens",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS_FILES))
def test_invalid_models_file_fails_at_start_up(tmp_path: Path, case: str) -> None:
    content, fragment = BAD_MODELS_FILES[case]
    path = tmp_path / "models.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        create_app(test_settings(models_file=path))
    assert caught.value.setting == "EMB_PROVIDER_MODELS_FILE"
    assert str(path) in caught.value.message
    assert fragment in caught.value.message
    assert "\n" not in str(caught.value)  # reported as one line by the CLI


@pytest.mark.parametrize(
    ("entries", "fragment"),
    [
        ("  - name: x\n    base: nope\n    prompt_name: q\n", "base 'nope' is not a model"),
        (
            "  - name: x\n    base: all-MiniLM-L6-v2\n    prompt_name: q\n"
            "  - name: y\n    base: x\n    prompt_name: q\n",
            "base x pins a prompt itself",
        ),
    ],
)
def test_bad_pinned_base_fails_at_start_up(tmp_path: Path, entries: str, fragment: str) -> None:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n" + entries, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        create_app(test_settings(models_file=path))
    assert caught.value.setting == "EMB_PROVIDER_MODELS_FILE"
    assert fragment in caught.value.message


def test_unknown_default_model_fails_at_start_up() -> None:
    with pytest.raises(ConfigError) as caught:
        create_app(test_settings(default_model="nope"))
    assert caught.value.setting == "EMB_PROVIDER_DEFAULT_MODEL"
    assert "'nope'" in caught.value.message
    assert DEFAULT_MODEL in caught.value.message  # the known models are listed


def test_models_file_can_name_the_default_model(models_file: Path) -> None:
    # By name or alias; create_app builds the app without loading anything.
    create_app(test_settings(models_file=models_file, default_model="team/minilm"))
