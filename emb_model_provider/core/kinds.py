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

#: What an operator asks of a model's numbers: ``exact`` (float32, the reference library's
#: vectors) or ``fast`` (the fastest path this machine runs that passes the accuracy gate).
Precision = Literal["exact", "fast"]

#: The runtime a ``fast`` model may be pinned to (sentence-transformers' ``backend`` names).
FastBackend = Literal["openvino", "torch"]
