"""The closed vocabularies that several floors name, declared once: what a model takes
(``Modality``), how a sentence-transformers Pooling module reduces tokens (``Pooling``), the
floating-point types a model can run in (``DType``) and what a model is for (``Task``). The
registry, the encoders, the wire models and the offline command all import them from here (the
ground floor), so a new value is one edit."""

from __future__ import annotations

from typing import Literal, get_args

#: What a model's inputs are: texts, images, or both in one space (CLIP, SigLIP).
Modality = Literal["text", "image", "multimodal"]

#: sentence-transformers' pooling modes (``Pooling.py``), by their ``pooling_mode`` names.
Pooling = Literal["mean", "cls", "max", "lasttoken", "weightedmean", "mean_sqrt_len_tokens"]
POOLING_MODES: tuple[Pooling, ...] = get_args(Pooling)

#: The dtypes a model may be loaded in (settings add ``auto``: the device's best).
DType = Literal["float32", "float16", "bfloat16"]

#: What a model does with its inputs: ``embed`` (a vector per input), ``rerank`` (a relevance
#: score per query-document pair) or ``sparse`` (a SPLADE vector: a weight per vocabulary
#: term). TEI and Infinity route by the same notion; a model is never served as a task it was
#: not built for.
Task = Literal["embed", "rerank", "sparse"]
TASKS: tuple[Task, ...] = get_args(Task)

#: Where a model's images are decoded and preprocessed: on the model thread (on CPU, where the
#: image processors' torch kernels share its one OpenMP team, ``core/model_thread.py``) or on
#: the decode workers (on a GPU, so that the model thread only launches forwards).
PrepareThread = Literal["model", "worker"]

#: The integer forms of sentence-transformers' ``quantize_embeddings``: per-dimension buckets
#: (int8, uint8) or signs packed 8 per byte (binary, ubinary).
Quantization = Literal["int8", "uint8", "binary", "ubinary"]
QUANTIZATIONS: tuple[Quantization, ...] = get_args(Quantization)

#: ``encoding_format`` of /v1/embeddings: OpenAI's two and, as extensions, the quantised forms.
EncodingFormat = Literal["float", "base64", "int8", "uint8", "binary", "ubinary"]

#: What an operator asks of a model's numbers: ``exact`` (float32, the reference library's
#: vectors) or ``fast`` (the fastest path this machine runs that passes the accuracy gate).
Precision = Literal["exact", "fast"]

#: The runtime a ``fast`` model may be pinned to (sentence-transformers' ``backend`` names).
FastBackend = Literal["openvino", "torch"]

#: Which end of an over-long text truncation cuts tokens from, as a Hugging Face tokenizer's
#: ``truncation_side``: ``right`` keeps the beginning (the default; Cohere ``END``), ``left``
#: keeps the end (Cohere ``START``, TEI ``truncation_direction: left``).
TruncationSide = Literal["right", "left"]
