"""The web console (/ui/) in a real headless Chromium (Debian's ``chromium``, driven by Playwright;
nothing downloads a browser) against a live server with API and admin keys and two tiny random
DINOv3 image models. What the page shows is checked against the API's own answers.

Screenshots are saved under ``test-artifacts/ui/`` (git-ignored). ``CHROMIUM_PATH`` names another
Chromium executable; without one the browser tests are skipped.
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import httpx
import numpy as np
import pytest
from numpy.testing import assert_allclose
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.families import build
from benchmarks.rerankers import build_cross_encoder
from emb_model_provider.api.ui import ASSETS
from emb_model_provider.security.keys import hash_key
from tests.conftest import DEFAULT_MODEL
from tests.live import live_server, test_settings
from tests.tiny_models import image_models_file, tiny_dinov3_convnext, tiny_dinov3_vit

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts" / "ui"
API_KEY = "sk-console-test-0123456789"
ADMIN_KEY = "sk-console-admin-0123456789"
VIT = "tiny-vit"
PROMPTED = "tiny-prompted"
RERANKER = "tiny-reranker"
CONVNEXT = "tiny-convnext"
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps over a sleepy hound.",
    "Quarterly revenue grew by four percent.",
]
WAIT_MS = 30_000
#: Without the background-networking flags Chromium keeps calling home on a closed network.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

# Builds a DataTransfer holding the given files, as a drag from the desktop carries them.
_DATA_TRANSFER_JS = """
(files) => {
  const transfer = new DataTransfer();
  for (const [name, b64, type] of files) {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    transfer.items.add(new File([bytes], name, { type }));
  }
  return transfer;
}
"""

# Every visible text (and form control) whose colour contrasts less than 4.5:1 with the
# background it sits on (backgrounds composited up the ancestors, over white).
_LOW_CONTRAST_JS = """
() => {
  const parse = (text) => {
    const match = /rgba?\\(([^)]+)\\)/.exec(text);
    if (!match) return null;
    const parts = match[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
    return [parts[0], parts[1], parts[2], parts.length > 3 ? parts[3] : 1];
  };
  const over = (top, bottom) => [0, 1, 2].map((i) => top[i] * top[3] + bottom[i] * (1 - top[3]));
  const background = (node) => {
    const layers = [];
    for (let n = node; n; n = n.parentElement) {
      const colour = parse(getComputedStyle(n).backgroundColor);
      if (colour && colour[3] > 0) {
        layers.push(colour);
        if (colour[3] >= 1) break;
      }
    }
    let result = [255, 255, 255];
    for (const layer of layers.reverse()) result = over(layer, result);
    return result;
  };
  const luminance = (rgb) => {
    const linear = rgb.map((v) => {
      const c = v / 255;
      return c <= 0.04045 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4;
    });
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2];
  };
  const failures = [];
  let checked = 0;
  for (const node of document.querySelectorAll("body *")) {
    const control = ["INPUT", "SELECT", "TEXTAREA"].includes(node.tagName);
    const text = [...node.childNodes].some((c) => c.nodeType === 3 && c.textContent.trim());
    if (!control && !text) continue;
    const style = getComputedStyle(node);
    if (style.visibility === "hidden" || node.getClientRects().length === 0) continue;
    if (node.closest(".visually-hidden")) continue;
    const bg = background(node);
    const fg = over(parse(style.color), bg);
    const [a, b] = [luminance(fg), luminance(bg)].sort((x, y) => y - x);
    const ratio = (a + 0.05) / (b + 0.05);
    checked += 1;
    if (ratio < 4.5) {
      failures.push({ text: (node.textContent || node.id).trim().slice(0, 40), ratio, fg, bg });
    }
  }
  return { checked, failures };
}
"""


def chromium_path() -> str | None:
    return (
        os.environ.get("CHROMIUM_PATH")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


def _png(seed: int, size: tuple[int, int]) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _cosines(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(unit @ unit.T, dtype=np.float64)


#: ``open_console(width, height, keys=True)``: a console page in a new browser context.
OpenConsole = Callable[..., Page]


@dataclass
class Served:
    url: str
    api: httpx.Client
    admin: httpx.Client


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("console")
    models_file = image_models_file(
        root / "models.yaml",
        {VIT: tiny_dinov3_vit(root / "vit"), CONVNEXT: tiny_dinov3_convnext(root / "cnx")},
    )
    # A text model with prompts, for the playground's prompt picker.
    prompted = build("mpnet", root / "prompted", "tiny")
    reranker = build_cross_encoder("bert", root / "reranker")
    with models_file.open("a", encoding="utf-8") as out:
        out.write(
            f"  - name: {PROMPTED}\n    source: {prompted}\n"
            '    prompts: {query: "query: ", passage: "passage: "}\n'
            f"  - name: {RERANKER}\n    source: {reranker}\n"
        )
    settings = test_settings(
        api_key_hashes=hash_key(API_KEY),
        admin_key_hashes=hash_key(ADMIN_KEY),
        models_file=models_file,
    )
    with (
        live_server(settings) as url,
        httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as api,
        httpx.Client(
            base_url=url, timeout=60, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as admin,
    ):
        yield Served(url, api, admin)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium, or set CHROMIUM_PATH)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Console:
    """A console page in its own browser context (its own sessionStorage), and what it did."""

    page: Page
    origin: str
    requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    policy_violations: list[str] = field(default_factory=list)


@pytest.fixture
def open_console(browser: Browser, served: Served) -> Iterator[OpenConsole]:
    """``open_console(width, height, keys=True)``: the page, loaded, with the keys typed in."""
    expect.set_options(timeout=WAIT_MS)
    opened: list[tuple[BrowserContext, Console]] = []

    def open_(width: int = 1280, height: int = 900, *, keys: bool = True) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        page = context.new_page()
        console = Console(page, served.url)
        page.on("request", lambda r: console.requests.append(r.url))
        page.on("pageerror", lambda exc: console.page_errors.append(str(exc)))
        page.on(
            "console",
            lambda message: (
                console.policy_violations.append(message.text)
                if "Content Security Policy" in message.text
                else None
            ),
        )
        page.goto(f"{served.url}/", wait_until="load")  # a browser at / lands on the console
        assert page.url == f"{served.url}/ui/"
        if not keys:
            expect(page.locator("#models-error")).to_be_visible()
        else:
            page.fill("#api-key", API_KEY)
            page.fill("#admin-key", ADMIN_KEY)
            page.click("#save-keys")
            expect(page.locator(f'#model-list li[data-model="{VIT}"]')).to_be_visible()
            expect(page.locator("#status-device")).not_to_have_text("–")
        opened.append((context, console))
        return page

    yield open_
    for context, console in opened:
        context.close()
        assert console.page_errors == [], console.page_errors
        assert console.policy_violations == [], console.policy_violations
        # Everything the page loads or calls is served by the server itself.
        outside = [
            url
            for url in console.requests
            if not url.startswith(f"{console.origin}/") and not url.startswith(("data:", "blob:"))
        ]
        assert outside == [], outside


def _screenshot(page: Page, name: str, request: pytest.FixtureRequest) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"screenshot: {path.relative_to(ROOT)}")
    return path


def _heatmap(page: Page) -> tuple[np.ndarray, list[str]]:
    cells = page.eval_on_selector_all(
        "#heatmap td[data-value]",
        "cells => cells.map(c => "
        "[+c.dataset.row, +c.dataset.col, +c.dataset.value, c.textContent])",
    )
    size = round(len(cells) ** 0.5)
    shown = np.full((size, size), np.nan)
    for row, col, value, text in cells:
        shown[row, col] = value
        assert abs(float(text) - value) <= 0.0005 + 1e-12, (text, value)
    labels = page.locator("#heatmap tbody th").all_inner_texts()
    return shown, labels


def _embed(served: Served, model: str, inputs: list[str], **extra: object) -> dict[str, object]:
    reply = served.api.post(
        "/v1/embeddings",
        json={"model": model, "input": inputs, "encoding_format": "float", **extra},
    )
    assert reply.status_code == 200, reply.text
    body: dict[str, object] = reply.json()
    return body


def _vectors(body: dict[str, object]) -> np.ndarray:
    data = body["data"]
    assert isinstance(data, list)
    return np.array([item["embedding"] for item in sorted(data, key=lambda item: item["index"])])


def _api_error(response: httpx.Response) -> str:
    message: str = response.json()["error"]["message"]
    return message


# -- the page over plain HTTP -------------------------------------------------------------------


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.inline: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if tag == "style" or "style" in names or any(n.startswith("on") for n in names):
            self.inline.append(tag)
        if tag == "script" and not names.get("src"):
            self.inline.append("script")
        for name in ("src", "href"):
            value = names.get(name)
            if value and not value.startswith("#"):
                self.references.append(value)


def test_console_is_public_strict_and_served_from_the_package(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=30) as anonymous:
        # The API needs the key; the console's files do not.
        assert anonymous.get("/v1/models").status_code == 401
        page = anonymous.get("/ui/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert "connect-src 'self'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-cache"
        # Revalidation by ETag.
        again = anonymous.get("/ui/", headers={"If-None-Match": page.headers["etag"]})
        assert again.status_code == 304
        assert again.content == b""

        markup = _Markup()
        markup.feed(page.text)
        assert markup.inline == []  # nothing the policy would block
        assert sorted(markup.references) == ["/ui/app.js", "/ui/favicon.svg", "/ui/style.css"]
        for reference in markup.references:
            asset = anonymous.get(reference)
            assert asset.status_code == 200
            assert asset.headers["content-type"] == ASSETS[reference.removeprefix("/ui/")]
            assert asset.headers["content-security-policy"] == policy
        missing = anonymous.get("/ui/secrets.txt")
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Invalid URL (GET /ui/secrets.txt)"

        # / still answers API clients with JSON, and links the console; browsers go there.
        about = anonymous.get("/")
        assert about.json()["links"]["console"] == "/ui/"
        browser_visit = anonymous.get("/", headers={"Accept": "text/html,*/*;q=0.8"})
        assert browser_visit.status_code == 307
        assert browser_visit.headers["location"] == "/ui/"
        assert anonymous.get("/ui").headers["location"] == "/ui/"


# -- the page in a browser ----------------------------------------------------------------------


def test_three_texts_show_the_cosines_of_the_api_vectors(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console()
    page.select_option("#model-select", DEFAULT_MODEL)
    page.fill("#texts", "\n".join(TEXTS))
    page.click("#embed-button")
    expect(page.locator("#result")).to_be_visible()

    reply = _embed(served, DEFAULT_MODEL, TEXTS)
    expected = _cosines(_vectors(reply))
    shown, labels = _heatmap(page)
    assert_allclose(shown, expected, atol=1e-5)
    assert labels == [f"{i + 1}. {text}" for i, text in enumerate(TEXTS)]
    usage = reply["usage"]
    assert isinstance(usage, dict)
    expect(page.locator("#result-dims")).to_have_text("384")
    expect(page.locator("#result-count")).to_have_text("3")
    expect(page.locator("#result-tokens")).to_have_text(str(usage["prompt_tokens"]))
    expect(page.locator("#result-model")).to_have_text(DEFAULT_MODEL)
    assert re.fullmatch(r"\d+ ms", page.inner_text("#result-time"))

    # Nearest neighbours of the first text: the others, most similar first.
    neighbours = page.eval_on_selector_all(
        "#neighbours li", "items => items.map(i => [+i.dataset.index, +i.dataset.value])"
    )
    order = [int(i) for i in np.argsort(-expected[0]) if i != 0]
    assert [index for index, _ in neighbours] == order
    assert_allclose([value for _, value in neighbours], expected[0][order], atol=1e-5)
    page.select_option("#query-select", "2")
    neighbours = page.eval_on_selector_all(
        "#neighbours li", "items => items.map(i => +i.dataset.index)"
    )
    assert neighbours == [int(i) for i in np.argsort(-expected[2]) if i != 2]
    _screenshot(page, "texts-heatmap", request)


def test_playground_picks_a_prompt(open_console: OpenConsole, served: Served) -> None:
    page = open_console()
    page.select_option("#model-select", PROMPTED)
    options = page.eval_on_selector_all("#prompt-select option", "items => items.map(i => i.value)")
    assert options == ["", "query", "passage"]
    page.select_option("#prompt-select", "query")
    page.fill("#texts", "\n".join(TEXTS))
    page.click("#embed-button")
    expect(page.locator("#result")).to_be_visible()
    reply = _embed(served, PROMPTED, TEXTS, prompt_name="query")
    shown, _ = _heatmap(page)
    assert_allclose(shown, _cosines(_vectors(reply)), atol=1e-5)
    usage = reply["usage"]
    assert isinstance(usage, dict)
    expect(page.locator("#result-tokens")).to_have_text(str(usage["prompt_tokens"]))
    # A model without prompts offers none.
    page.select_option("#model-select", DEFAULT_MODEL)
    expect(page.locator("#prompt-select")).to_be_disabled()


def test_rerank_panel_ranks_pasted_documents(open_console: OpenConsole, served: Served) -> None:
    page = open_console()
    # Rerankers are offered in their panel only, not in the playground.
    assert RERANKER not in page.eval_on_selector_all(
        "#model-select option", "items => items.map(i => i.value)"
    )
    expect(page.locator(f'#rerank-model option[value="{RERANKER}"]')).to_have_count(1)
    query = "how do foxes find food"
    page.fill("#rerank-query", query)
    page.fill("#rerank-documents", "\n".join(TEXTS))
    page.click("#rerank-button")
    expect(page.locator("#rerank-results li")).to_have_count(len(TEXTS))
    reply = served.api.post(
        "/v1/rerank", json={"model": RERANKER, "query": query, "documents": TEXTS}
    ).json()
    shown = page.eval_on_selector_all(
        "#rerank-results li",
        "items => items.map(i => [Number(i.dataset.index), Number(i.dataset.value)])",
    )
    assert [index for index, _ in shown] == [item["index"] for item in reply["results"]]
    assert_allclose(
        [score for _, score in shown],
        [item["relevance_score"] for item in reply["results"]],
        rtol=1e-6,
    )
    expect(page.locator("#rerank-error")).to_be_hidden()
    page.fill("#rerank-query", "")
    page.click("#rerank-button")
    expect(page.locator("#rerank-error")).to_be_visible()


def test_dropped_images_are_embedded_by_an_image_model(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console()
    files = [
        (f"noise-{seed}.png", base64.b64encode(_png(seed, size)).decode(), "image/png")
        for seed, size in ((1, (64, 48)), (2, (40, 40)), (3, (96, 64)))
    ]
    transfer = page.evaluate_handle(_DATA_TRANSFER_JS, files)
    page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
    expect(page.locator("#image-list li")).to_have_count(3)
    page.select_option("#model-select", VIT)
    page.click("#embed-button")
    expect(page.locator("#result")).to_be_visible()

    uris = [f"data:{kind};base64,{b64}" for _, b64, kind in files]
    reply = _embed(served, VIT, uris)
    shown, labels = _heatmap(page)
    assert_allclose(shown, _cosines(_vectors(reply)), atol=1e-5)
    assert labels == [f"{i + 1}. image: {name}" for i, (name, _, _) in enumerate(files)]
    usage = reply["usage"]
    assert isinstance(usage, dict)
    expect(page.locator("#result-dims")).to_have_text("32")
    expect(page.locator("#result-tokens")).to_have_text(str(usage["prompt_tokens"]))
    _screenshot(page, "images-heatmap", request)


def test_load_and_unload_a_model(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console()
    item = page.locator(f'#model-list li[data-model="{CONVNEXT}"]')
    expect(item).to_have_attribute("data-state", "not_loaded")
    expect(item.locator('[data-fact="memory"]')).to_have_text("–")
    item.get_by_role("button", name=f"Load {CONVNEXT}", exact=True).click()
    expect(item).to_have_attribute("data-state", "loaded")
    state = {entry["name"]: entry for entry in served.admin.get("/api/models").json()["data"]}
    assert state[CONVNEXT]["state"] == "loaded"
    assert state[CONVNEXT]["memory_bytes"] > 0
    expect(item.locator('[data-fact="memory"]')).to_have_text(re.compile(r"^\d+(\.\d)? [KMG]?B$"))
    _screenshot(page, "model-loaded", request)

    item.get_by_role("button", name=f"Unload {CONVNEXT}", exact=True).click()
    expect(item).to_have_attribute("data-state", "not_loaded")
    state = {entry["name"]: entry for entry in served.admin.get("/api/models").json()["data"]}
    assert state[CONVNEXT]["state"] == "not_loaded"


def test_without_an_admin_key_the_console_does_not_ask_the_admin_endpoints(
    browser: Browser,
) -> None:
    """/api/status says the admin routes are off: no request to /api/models (whose 403 the
    browser would log as an error), a note instead, and no Load or Unload buttons."""
    expect.set_options(timeout=WAIT_MS)
    requests: list[str] = []
    errors: list[str] = []
    with live_server(test_settings()) as url:
        assert httpx.get(f"{url}/api/status", timeout=30).json()["admin_endpoints"] is False
        context = browser.new_context()
        try:
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{url}/ui/", wait_until="load")
            item = page.locator(f'#model-list li[data-model="{DEFAULT_MODEL}"]')
            expect(item).to_be_visible()
            # Written by the models refresh once it has decided not to ask /api/models.
            expect(page.locator("#admin-note")).to_contain_text("no admin key")
            expect(item.get_by_role("button")).to_have_count(0)
            page.click("#refresh-models")
            expect(page.locator("#admin-note")).to_contain_text("no admin key")
            expect(page.locator("#status-device")).not_to_have_text("–")
        finally:
            context.close()
    assert [url for url in requests if "/api/models" in url] == []
    assert errors == []


def test_api_errors_are_shown_as_the_api_words_them(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console()
    # Text sent to an image model.
    page.select_option("#model-select", VIT)
    page.fill("#texts", "a text for an image model")
    page.click("#embed-button")
    refused = served.api.post(
        "/v1/embeddings", json={"model": VIT, "input": ["a text for an image model"]}
    )
    assert refused.status_code == 400
    expect(page.locator("#embed-error .error-message")).to_have_text(_api_error(refused))
    expect(page.locator("#embed-error .error-meta")).to_contain_text("400")
    expect(page.locator("#result")).to_be_hidden()

    # The pinned default model cannot be unloaded.
    page.get_by_role("button", name=f"Unload {DEFAULT_MODEL}", exact=True).click()
    pinned = served.admin.post(f"/api/models/{DEFAULT_MODEL}/unload")
    assert pinned.status_code == 400
    expect(page.locator("#models-error .error-message")).to_have_text(_api_error(pinned))
    _screenshot(page, "api-errors", request)

    # A wrong key: every panel says what the API says.
    wrong = "sk-wrong-key-0123456789"
    page.fill("#api-key", wrong)
    page.fill("#admin-key", "")
    page.click("#save-keys")
    refusal = _api_error(
        httpx.get(
            f"{served.url}/v1/models", headers={"Authorization": f"Bearer {wrong}"}, timeout=30
        )
    )
    assert refusal.startswith("Incorrect API key provided")
    expect(page.locator("#models-error .error-message")).to_have_text(refusal)
    expect(page.locator("#status-error .error-message")).to_have_text(refusal)


def test_keys_stay_in_the_tab_session(open_console: OpenConsole, served: Served) -> None:
    page = open_console()
    stored = page.evaluate("() => [localStorage.length, {...sessionStorage}]")
    assert stored[0] == 0
    assert sorted(stored[1].values()) == sorted([API_KEY, ADMIN_KEY])
    page.reload()
    expect(page.locator("#api-key")).to_have_value(API_KEY)  # the same tab keeps it
    # Another session (a new tab or browser) starts without a key and is refused as the API says.
    fresh = open_console(keys=False)
    expect(fresh.locator("#api-key")).to_have_value("")
    missing = _api_error(httpx.get(f"{served.url}/v1/models", timeout=30))
    expect(fresh.locator("#models-error .error-message")).to_have_text(missing)


def _v1_traffic(served: Served) -> tuple[int, float, float]:
    """Requests, latency sum and count of the /v1 routes, read with prometheus_client."""
    text = httpx.get(f"{served.url}/metrics", timeout=30).text
    requests, total, count = 0.0, 0.0, 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.labels.get("route", "").startswith("/v1/"):
                continue
            if sample.name == "emb_provider_requests_total":
                requests += sample.value
            elif sample.name == "emb_provider_request_duration_seconds_sum":
                total += sample.value
            elif sample.name == "emb_provider_request_duration_seconds_count":
                count += sample.value
    return int(requests), total, count


def test_status_shows_device_queue_and_traffic_from_the_metrics(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console()
    page.select_option("#refresh-every", "1")
    status = served.api.get("/api/status").json()
    expect(page.locator("#status-device")).to_have_text(status["device"])
    expect(page.locator("#status-queue")).to_have_text("0")
    expect(page.locator("#status-ready")).to_have_text("yes")
    assert page.inner_text("#status-rss").endswith("B")
    expect(page.locator("#status-accelerator")).to_have_text("none (CPU)")

    for _ in range(4):
        _embed(served, DEFAULT_MODEL, ["traffic for the status panel"])
    # Requests per second over the interval that saw them.
    snapshot = page.wait_for_function(
        """() => {
             const text = (id) => document.getElementById(id).textContent;
             const rps = Number(text("status-rps"));
             return rps > 0 ? [text("status-rps"), text("status-latency"), text("status-p95")]
                            : null;
           }""",
        timeout=WAIT_MS,
    ).json_value()
    assert re.fullmatch(r"\d+\.\d\d", snapshot[0])
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", snapshot[1])
    assert re.fullmatch(r"\d+(\.\d+)? (ms|s)", snapshot[2])
    # The totals are those of /metrics once the /v1 traffic is over (the page itself polls
    # /api/status and /metrics only): the page's next refresh shows what the test reads.
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        requests, total, count = _v1_traffic(served)
        shown = page.evaluate(
            "() => [document.getElementById('status-requests').textContent,"
            " document.getElementById('status-latency-total').textContent]"
        )
        if shown[0] == str(requests) or time.monotonic() > deadline:
            break
        page.wait_for_timeout(200)  # polling interval under the deadline
    assert shown[0] == str(requests)
    mean_ms = total / count * 1000
    value, unit = shown[1].split(" ")
    if unit == "ms":  # one decimal below a second, two decimals of a second above
        assert abs(float(value) - mean_ms) <= 0.05 + 1e-9
    else:
        assert unit == "s"
        assert abs(float(value) * 1000 - mean_ms) <= 5 + 1e-9
    _screenshot(page, "status", request)


def _focus_ring(page: Page, element_id: str) -> dict[str, str]:
    ring: dict[str, str] = page.evaluate(
        """(id) => {
             const node = id === "image-input" ? document.getElementById("drop-zone")
                                               : document.activeElement;
             const style = getComputedStyle(node);
             return { style: style.outlineStyle, width: style.outlineWidth };
           }""",
        element_id,
    )
    return ring


def test_keyboard_only_use_with_visible_focus_and_readable_contrast(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console(keys=False)
    # Every control has a label.
    unlabelled = page.evaluate(
        """() => [...document.querySelectorAll("input, select, textarea")]
             .filter((n) => n.labels.length === 0 && !n.getAttribute("aria-label"))
             .map((n) => n.id)"""
    )
    assert unlabelled == []

    visited: list[str] = []

    def tab_to(target: str, *, limit: int = 40) -> None:
        for _ in range(limit):
            page.keyboard.press("Tab")
            focused = page.evaluate(
                "() => document.activeElement.id"
                " || document.activeElement.getAttribute('aria-label')"
            )
            visited.append(focused)
            ring = _focus_ring(page, focused)
            assert ring["style"] != "none" and float(ring["width"].removesuffix("px")) >= 2, (
                focused,
                ring,
            )
            if focused == target:
                return
        pytest.fail(f"Tab never reached {target}: {visited}")

    tab_to("api-key")
    page.keyboard.type(API_KEY)
    tab_to("admin-key")
    page.keyboard.type(ADMIN_KEY)
    tab_to("save-keys")
    page.keyboard.press("Enter")
    expect(page.locator(f'#model-list li[data-model="{VIT}"]')).to_be_visible()
    tab_to("model-select")
    tab_to("texts")
    page.keyboard.type("\n".join(TEXTS))
    tab_to("image-input")
    tab_to("embed-button")
    page.keyboard.press("Enter")
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#heatmap td[data-value]")).to_have_count(9)
    tab_to("refresh-every")
    tab_to(f"Load {DEFAULT_MODEL}")
    assert visited.index("api-key") < visited.index("texts") < visited.index("embed-button")
    # Load and unload from the keyboard; focus stays on the button when the list is redrawn.
    item = page.locator(f'#model-list li[data-model="{CONVNEXT}"]')
    tab_to(f"Load {CONVNEXT}", limit=60)
    page.keyboard.press("Enter")
    expect(item).to_have_attribute("data-state", "loaded")
    tab_to(f"Unload {CONVNEXT}", limit=1)
    page.keyboard.press("Enter")
    expect(item).to_have_attribute("data-state", "not_loaded")

    # Contrast, with results, an error and a note on the page.
    page.select_option("#model-select", VIT)
    page.click("#embed-button")
    expect(page.locator("#embed-error")).to_be_visible()
    contrast = page.evaluate(_LOW_CONTRAST_JS)
    assert contrast["checked"] > 50
    assert contrast["failures"] == []
    _screenshot(page, "keyboard-contrast", request)


def test_phone_width_has_no_horizontal_overflow(
    open_console: OpenConsole, served: Served, request: pytest.FixtureRequest
) -> None:
    page = open_console(375, 812)
    page.select_option("#model-select", DEFAULT_MODEL)
    page.fill("#texts", "\n".join([*TEXTS, "A much longer line " * 12]))
    page.click("#embed-button")
    expect(page.locator("#result")).to_be_visible()
    page.get_by_role("button", name=f"Unload {DEFAULT_MODEL}", exact=True).click()
    expect(page.locator("#models-error")).to_be_visible()
    widths = page.evaluate(
        """() => ({ viewport: window.innerWidth,
                    page: document.documentElement.scrollWidth,
                    body: document.body.scrollWidth,
                    widest: Math.max(...[...document.querySelectorAll("body *")]
                      .filter((n) => !n.closest(".scroll") && !n.closest(".visually-hidden"))
                      .map((n) => n.getBoundingClientRect().right)) })"""
    )
    assert widths["viewport"] == 375
    assert widths["page"] <= 375, widths
    assert widths["body"] <= 375, widths
    assert widths["widest"] <= 375 + 0.5, widths
    contrast = page.evaluate(_LOW_CONTRAST_JS)
    assert contrast["failures"] == []
    _screenshot(page, "phone", request)
