"""Fuzzing the live server's request bodies with hypothesis: whatever arrives, no 5xx, and every
error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import DEFAULT_MODEL

ERROR_KEYS = {"message", "type", "param", "code"}

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
_json = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=6),
        st.dictionaries(st.text(max_size=10), children, max_size=5),
    ),
    max_leaves=20,
)
# Values that are nearly right: what a confused client sends.
_inputs = st.one_of(
    _json,
    st.text(max_size=200),
    st.lists(st.text(max_size=60), max_size=8),
    st.lists(st.integers(min_value=-5, max_value=200_000), max_size=12),
    st.lists(st.lists(st.integers(min_value=-5, max_value=200_000), max_size=6), max_size=4),
    st.lists(st.fixed_dictionaries({"image": st.text(max_size=30)}), max_size=3),
)
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries(
        {"model": st.one_of(st.just(DEFAULT_MODEL), _json), "input": _inputs},
        optional={
            "encoding_format": st.one_of(st.sampled_from(["float", "base64"]), _json),
            "dimensions": st.one_of(st.integers(min_value=-3, max_value=500), _json),
            "user": _json,
            "extra": _json,
        },
    ),
)


def _check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        body = response.json()
        assert body["object"] == "list"
        assert len(body["data"]) >= 1
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_bodies)
def test_json_bodies_never_cause_a_5xx(http: httpx.Client, body: Any) -> None:
    _check(http.post("/v1/embeddings", content=json.dumps(body), headers=_JSON))


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=300))
def test_raw_bytes_never_cause_a_5xx(http: httpx.Client, raw: bytes) -> None:
    _check(http.post("/v1/embeddings", content=raw, headers=_JSON))


@settings(max_examples=60, deadline=None)
@given(body=_bodies)
def test_image_api_bodies_never_cause_a_5xx(http: httpx.Client, body: Any) -> None:
    _check(http.post("/v1/images/embeddings", content=json.dumps(body), headers=_JSON))


_JSON = {"Content-Type": "application/json"}
