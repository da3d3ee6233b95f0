"""BERT without padding: the forward pass most of the compute goes to.

A batch of sentences of different lengths is padded to its longest one, and a padded forward
spends the projection and feed-forward matrix products (nearly all of BERT's FLOPs for sentences
of tens of tokens) on pad tokens too. Here the tokens of the whole batch are one flat
(tokens x hidden) matrix through every dense layer, LayerNorm and residual. Attention, which mixes
positions within a sentence, takes one of two layouts:

- ``grouped`` (the default on CPU): the batch is sorted by length and attention runs on each
  sentence's own rows, one call per run of equal lengths, with no padding and no mask. A padded
  call costs size x longest^2 and, on CPU, a masked kernel is slower than a plain one: on the
  benchmark corpus, batches of 32 random sentences run 1.5x faster than with padded attention,
  and length-sorted batches no slower.
- ``padded`` (the default elsewhere): one call on a padded (batch, heads, longest, head_dim) view
  with a key mask, what a GPU wants, taken back to the flat layout afterwards.

Pooling (``st_modules.pool_flat``) reads each sentence's own rows. The arithmetic is the same
as transformers' ``BertModel`` in eval mode (absolute positions, token type 0, no dropout); the
tests compare both layouts with sentence-transformers on the same weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from transformers import BertModel, PreTrainedModel
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer

#: (tokens x hidden, lengths, pooling skip) -> pooled vectors: ``st_modules.pool_flat``.
FlatPool = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


#: BERT and the families with BERT's layers: RoBERTa and XLM-RoBERTa differ only in numbering
#: positions from ``pad_token_id + 1`` (transformers' ``create_position_ids_from_input_ids``).
_FAMILIES = {"bert": False, "roberta": True, "xlm-roberta": True}


def supports(model: PreTrainedModel) -> bool:
    """Whether ``model`` is a plain BERT-style encoder this forward reproduces exactly."""
    config = model.config
    return (
        getattr(config, "model_type", None) in _FAMILIES
        and getattr(config, "position_embedding_type", "absolute") == "absolute"
        and not getattr(config, "is_decoder", False)
        and hasattr(model, "embeddings")
        and hasattr(model, "encoder")
    )


def _runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first row, sentences, length) for each run of consecutive sentences of equal length."""
    runs: list[tuple[int, int, int]] = []
    row = 0
    for length in lengths:
        if runs and runs[-1][2] == length:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, length)
        else:
            runs.append((row, 1, length))
        row += length
    return runs


class UnpaddedBert:
    def __init__(self, model: PreTrainedModel) -> None:
        bert = cast(BertModel, model)  # ``supports(model)`` said so
        #: "auto": grouped on CPU, padded on other devices.
        self.attention: Literal["auto", "grouped", "padded"] = "auto"
        self._heads = int(bert.config.num_attention_heads)
        self._hidden = int(bert.config.hidden_size)
        self._embeddings: BertEmbeddings = bert.embeddings
        #: RoBERTa-style positions: the pad id, from which real tokens' positions count.
        self._padding_idx: int | None = (
            int(bert.config.pad_token_id or 0) if _FAMILIES[str(bert.config.model_type)] else None
        )
        self._layers = [cast(BertLayer, layer) for layer in bert.encoder.layer]
        # One GEMM for query, key and value instead of three.
        self._qkv = [
            (
                torch.cat(
                    [
                        layer.attention.self.query.weight,
                        layer.attention.self.key.weight,
                        layer.attention.self.value.weight,
                    ]
                ),
                torch.cat(
                    [
                        layer.attention.self.query.bias,
                        layer.attention.self.key.bias,
                        layer.attention.self.value.bias,
                    ]
                ),
            )
            for layer in self._layers
        ]

    @property
    def fused_bytes(self) -> int:
        """Bytes of the fused query-key-value copies, held beside the model's own weights (a
        quarter of each layer's attention weights again: on BERT-base, 27 MB in float32)."""
        return sum(tensor.numel() * tensor.element_size() for pair in self._qkv for tensor in pair)

    def close(self) -> None:
        """Drop the fused copies (releasing the model frees only its own weights)."""
        self._qkv = []

    def _attend_padded(
        self,
        qkv: torch.Tensor,
        slot: torch.Tensor,
        size: int,
        longest: int,
        key_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Attention for the whole batch at once on a padded view with a key mask: one kernel,
        what a GPU wants; its cost grows with size x longest^2."""
        head_dim = self._hidden // self._heads
        padded = qkv.new_zeros(size * longest, 3 * self._hidden)
        padded[slot] = qkv
        query, key, value = padded.view(size, longest, 3, self._heads, head_dim).permute(
            2, 0, 3, 1, 4
        )
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=key_mask)
        return attended.transpose(1, 2).reshape(size * longest, self._hidden)[slot]

    def _attend_each(self, qkv: torch.Tensor, runs: list[tuple[int, int, int]]) -> torch.Tensor:
        """Attention sentence by sentence (one call per run of equal lengths), on each one's own
        rows: no padding and no mask. On CPU the calls are cheap, while one padded call pays for
        size x longest^2 and a masked kernel is slower than a plain one."""
        head_dim = self._hidden // self._heads
        out = []
        for first, count, length in runs:
            rows = qkv[first : first + count * length]
            query, key, value = rows.view(count, length, 3, self._heads, head_dim).permute(
                2, 0, 3, 1, 4
            )
            attended = F.scaled_dot_product_attention(query, key, value)
            out.append(attended.transpose(1, 2).reshape(count * length, self._hidden))
        return out[0] if len(out) == 1 else torch.cat(out)

    def pooled(
        self,
        batch: Sequence[npt.NDArray[np.int64]],
        device: torch.device,
        pool: FlatPool,
        skip: Sequence[int],
        type_ids: Sequence[npt.NDArray[np.int64]] | None = None,
    ) -> torch.Tensor:
        """Pooled vectors, one row per token id array of any length; ``pool`` gets the flat
        hidden states, the lengths and ``skip`` (tokens per sentence left out of pooling).
        ``type_ids``: each token's segment (a cross-encoder's pair: 0 for the query, 1 for the
        document); None: all 0, as for single texts."""
        lengths_list = [int(ids.shape[0]) for ids in batch]
        grouped = self.attention == "grouped" or (self.attention == "auto" and device.type == "cpu")
        if grouped:
            order = sorted(range(len(batch)), key=lengths_list.__getitem__)
            if order != list(range(len(batch))):
                # Sorted by length, equal lengths share attention calls; rows back in input order.
                in_order = self.pooled(
                    [batch[index] for index in order],
                    device,
                    pool,
                    [skip[i] for i in order],
                    None if type_ids is None else [type_ids[i] for i in order],
                )
                return in_order[torch.argsort(torch.tensor(order, device=device))]
        size, longest = len(batch), max(lengths_list)
        lengths = torch.tensor(lengths_list, device=device)
        flat_ids = torch.from_numpy(np.concatenate(batch)).to(device, non_blocking=True)
        sentence = torch.repeat_interleave(torch.arange(size, device=device), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        position = torch.arange(flat_ids.shape[0], device=device) - starts[sentence]
        slot = sentence * longest + position  # each token's row in the padded layout

        if self._padding_idx is not None:
            # As RoBERTa numbers them: real tokens (not the pad id) count up from pad id + 1.
            real = flat_ids.ne(self._padding_idx).long()
            counted = torch.cumsum(real, 0)
            before = (counted - real)[starts][sentence]  # real tokens before the sentence
            position = (counted - before) * real + self._padding_idx
        embeddings = self._embeddings
        if type_ids is None:
            token_types = embeddings.token_type_embeddings.weight[0]
        else:
            flat_types = torch.from_numpy(np.concatenate(type_ids)).to(device, non_blocking=True)
            token_types = embeddings.token_type_embeddings(flat_types)
        hidden = (
            embeddings.word_embeddings(flat_ids)
            + embeddings.position_embeddings(position)
            + token_types
        )
        hidden = embeddings.LayerNorm(hidden)
        attend: Callable[[torch.Tensor], torch.Tensor]
        if grouped:
            attend = functools.partial(self._attend_each, runs=_runs(lengths_list))
        else:
            key_mask = torch.arange(longest, device=device)[None, :] < lengths[:, None]
            attend = functools.partial(
                self._attend_padded,
                slot=slot,
                size=size,
                longest=longest,
                key_mask=key_mask[:, None, None, :],
            )
        for layer, (qkv_weight, qkv_bias) in zip(self._layers, self._qkv, strict=True):
            attended = attend(F.linear(hidden, qkv_weight, qkv_bias))
            attention_out = layer.attention.output
            hidden = attention_out.LayerNorm(attention_out.dense(attended) + hidden)
            intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
            hidden = layer.output.LayerNorm(layer.output.dense(intermediate) + hidden)

        return pool(hidden, lengths, torch.tensor(list(skip), device=device))
