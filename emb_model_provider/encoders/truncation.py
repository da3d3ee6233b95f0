"""One model's read-only Rust tokenizers, one per truncation mode: off, and each side
(``TruncationSide``) over-long texts may be cut from.

``Tokenizer.encode_batch`` takes ``&self``, so request threads share these; changing a
tokenizer's truncation per call would race. The model's own side (its saved
``truncation_side``) is built at load; the other is built the first time a request asks for
it, as most servers never see one.

A request may also cap its texts below the model's limit (Cohere's ``max_tokens``, vLLM's
``truncate_prompt_tokens``): a tokenizer per (side, cap) is built on first use and kept in a
small LRU (``CAPPED_TOKENIZERS``), so clients sending many caps cannot grow memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Literal

from tokenizers import Tokenizer

from emb_model_provider.core.kinds import TruncationSide

__all__ = ["CAPPED_TOKENIZERS", "TruncationModes"]

#: Per model, the per-request caps whose tokenizers are kept (least recently used dropped).
CAPPED_TOKENIZERS = 8


class TruncationModes:
    def __init__(
        self,
        base: Tokenizer,
        max_tokens: int,
        *,
        side: TruncationSide = "right",
        strategy: Literal["longest_first", "only_first", "only_second"] = "longest_first",
    ) -> None:
        #: The side the model cuts when a request names none (its tokenizer's saved one).
        self.side: TruncationSide = side
        self._json = base.to_str()
        self._max_tokens = max_tokens
        self._strategy = strategy
        #: Special tokens the tokenizer adds to a text: a cap at or below it cannot truncate.
        processor = base.post_processor
        self.special_tokens = processor.num_special_tokens_to_add(False) if processor else 0
        #: The same for a (query, document) pair.
        self.pair_special_tokens = processor.num_special_tokens_to_add(True) if processor else 0
        self.full = Tokenizer.from_str(self._json)
        self.full.no_padding()
        self.full.no_truncation()
        self._truncating: dict[TruncationSide, Tokenizer] = {side: self._build(side)}
        self._capped: OrderedDict[tuple[TruncationSide, int], Tokenizer] = OrderedDict()
        self._lock = threading.Lock()

    def _build(self, side: TruncationSide, max_tokens: int | None = None) -> Tokenizer:
        tokenizer = Tokenizer.from_str(self._json)
        tokenizer.no_padding()
        tokenizer.enable_truncation(
            max_tokens or self._max_tokens, strategy=self._strategy, direction=side
        )
        return tokenizer

    def get(
        self, truncate: bool, side: TruncationSide | None = None, max_tokens: int | None = None
    ) -> Tokenizer:
        """The tokenizer for a request: no truncation, or cutting ``side`` (None: the model's)
        at ``max_tokens`` (None, or at least the model's limit: the model's limit), special
        tokens included (so it must be above ``special_tokens``)."""
        if not truncate:
            return self.full
        side = side or self.side
        if max_tokens is not None and max_tokens < self._max_tokens:
            return self._capped_tokenizer(side, max_tokens)
        tokenizer = self._truncating.get(side)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._truncating.get(side)
                if tokenizer is None:
                    tokenizer = self._truncating[side] = self._build(side)
        return tokenizer

    def _capped_tokenizer(self, side: TruncationSide, max_tokens: int) -> Tokenizer:
        key = (side, max_tokens)
        with self._lock:
            tokenizer = self._capped.get(key)
            if tokenizer is not None:
                self._capped.move_to_end(key)
                return tokenizer
        tokenizer = self._build(side, max_tokens)  # outside the lock: it parses the JSON
        with self._lock:
            self._capped[key] = tokenizer
            self._capped.move_to_end(key)
            while len(self._capped) > CAPPED_TOKENIZERS:
                self._capped.popitem(last=False)
        return tokenizer
