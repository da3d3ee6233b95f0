"""One model's read-only Rust tokenizers, one per truncation mode: off, and each side
(``TruncationSide``) over-long texts may be cut from.

``Tokenizer.encode_batch`` takes ``&self``, so request threads share these; changing a
tokenizer's truncation per call would race. The model's own side (its saved
``truncation_side``) is built at load; the other is built the first time a request asks for
it, as most servers never see one.
"""

from __future__ import annotations

import threading
from typing import Literal

from tokenizers import Tokenizer

from emb_model_provider.core.kinds import TruncationSide

__all__ = ["TruncationModes"]


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
        self.full = Tokenizer.from_str(self._json)
        self.full.no_padding()
        self.full.no_truncation()
        self._truncating: dict[TruncationSide, Tokenizer] = {side: self._build(side)}
        self._lock = threading.Lock()

    def _build(self, side: TruncationSide) -> Tokenizer:
        tokenizer = Tokenizer.from_str(self._json)
        tokenizer.no_padding()
        tokenizer.enable_truncation(self._max_tokens, strategy=self._strategy, direction=side)
        return tokenizer

    def get(self, truncate: bool, side: TruncationSide | None = None) -> Tokenizer:
        """The tokenizer for a request: no truncation, or cutting ``side`` (None: the model's)."""
        if not truncate:
            return self.full
        side = side or self.side
        tokenizer = self._truncating.get(side)
        if tokenizer is None:
            with self._lock:
                tokenizer = self._truncating.get(side)
                if tokenizer is None:
                    tokenizer = self._truncating[side] = self._build(side)
        return tokenizer
