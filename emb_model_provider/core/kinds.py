"""The closed vocabularies that several floors name, declared once: what a model takes
(``Modality``), how a sentence-transformers Pooling module reduces tokens (``Pooling``) and the
floating-point types a model can run in (``DType``). The registry, the encoders, the wire models
and the offline command all import them from here (the ground floor), so a new value is one edit."""

from __future__ import annotations

from typing import Literal, get_args

#: What a model's inputs are: texts, images, or both in one space (CLIP, SigLIP).
Modality = Literal["text", "image", "multimodal"]

#: sentence-transformers' pooling modes (``Pooling.py``), by their ``pooling_mode`` names.
Pooling = Literal["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]
POOLING_MODES: tuple[Pooling, ...] = get_args(Pooling)

#: The dtypes a model may be loaded in (settings add ``auto``: the device's best).
DType = Literal["float32", "float16", "bfloat16"]

#: The integer forms of sentence-transformers' ``quantize_embeddings``: per-dimension buckets
#: (int8, uint8) or signs packed 8 per byte (binary, ubinary).
Quantization = Literal["int8", "uint8", "binary", "ubinary"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)

#: ``encoding_format`` of /v1/embeddings: OpenAI's two and, as extensions, the quantised forms.
EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]
