"""The console's text-to-image search in headless Chromium, against a live server with a tiny
random CLIP: the images ranked per query, and the cosines shown, are those of the API's own
vectors (see tests/test_ui.py for the browser set-up this reuses)."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from numpy.testing import assert_allclose
from playwright.sync_api import Browser, expect, sync_playwright

from emb_model_provider.security.keys import hash_key
from tests.live import live_server, test_settings
from tests.test_ui import (
    _DATA_TRANSFER_JS,
    ARTIFACTS,
    CHROMIUM_ARGS,
    WAIT_MS,
    _png,
    chromium_path,
)
from tests.tiny_multimodal import multimodal_models_file, tiny_clip

pytestmark = pytest.mark.timeout(240)

API_KEY = "sk-console-multimodal-0123456789"
MODEL = "tiny-clip"
QUERIES = ["a photo of a cat", "green trees and white clouds"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("console-multimodal")
    models = multimodal_models_file(root / "models.yaml", {MODEL: tiny_clip(root / "clip")})
    settings = test_settings(api_key_hashes=hash_key(API_KEY), models_file=models)
    with live_server(settings) as url:
        yield url


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


def test_text_to_image_search_shows_the_api_cosines(server: str, browser: Browser) -> None:
    expect.set_options(timeout=WAIT_MS)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(f"{server}/ui/", wait_until="load")
        page.fill("#api-key", API_KEY)
        page.click("#save-keys")
        expect(page.locator(f'#model-list li[data-model="{MODEL}"]')).to_be_visible()
        page.select_option("#model-select", MODEL)
        expect(page.locator("#multimodal-hint")).to_be_visible()

        files = [
            (f"photo-{seed}.png", base64.b64encode(_png(seed, size)).decode(), "image/png")
            for seed, size in ((1, (64, 48)), (2, (40, 40)), (3, (96, 64)), (4, (30, 80)))
        ]
        transfer = page.evaluate_handle(_DATA_TRANSFER_JS, files)
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
        expect(page.locator("#image-list li")).to_have_count(len(files))
        page.fill("#texts", "\n".join(QUERIES))
        page.click("#embed-button")
        expect(page.locator("#search")).to_be_visible()
        expect(page.locator("#search-results .search-query")).to_have_count(len(QUERIES))

        # The API's own vectors for the same inputs: the queries, then the images.
        uris = [f"data:{kind};base64,{b64}" for _, b64, kind in files]
        reply = httpx.post(
            f"{server}/v1/embeddings",
            headers={"Authorization": f"Bearer {API_KEY}"},
            json={"model": MODEL, "input": [*QUERIES, *uris], "encoding_format": "float"},
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        data = sorted(reply.json()["data"], key=lambda item: item["index"])
        vectors = np.array([item["embedding"] for item in data], dtype=np.float64)
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        texts, images = unit[: len(QUERIES)], unit[len(QUERIES) :]
        for number, query in enumerate(QUERIES):
            section = page.locator(f'#search-results .search-query[data-query="{number}"]')
            expect(section.locator("h4")).to_have_text(query)
            shown = section.locator("li").evaluate_all(
                "items => items.map(i => [+i.dataset.index, +i.dataset.value, "
                "i.querySelector('.neighbour-value').textContent, "
                "i.querySelector('.ranked-name').textContent])"
            )
            cosines = images @ texts[number]
            order = [int(i) for i in np.argsort(-cosines)]
            # Items are numbered in input order: the texts first, then the images.
            assert [index - len(QUERIES) for index, _, _, _ in shown] == order
            assert_allclose([value for _, value, _, _ in shown], cosines[order], atol=1e-5)
            for index, value, text, name in shown:
                assert abs(float(text) - value) <= 0.0005 + 1e-12, (text, value)
                assert name == files[index - len(QUERIES)][0]
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "text-to-image-search.png"), full_page=True)
    finally:
        context.close()
    assert errors == [], errors
