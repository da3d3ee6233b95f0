"""``precision: fast``: a faster forward for a text model, kept only if it passes an accuracy gate.

Measured on this project's CPUs (AMD EPYC, AVX-512 with VNNI and BF16, no AMX; figures in
docs/benchmarks.md): OpenVINO with bfloat16 inference ran the bundled all-MiniLM-L6-v2 at about
3x raw float32 ``SentenceTransformer.encode`` with a least cosine of 0.9999 to float32, where
torch bfloat16 ran 1.4-1.6x (least cosine 0.998) and ONNX Runtime's dynamic int8 2.7x but with a
least cosine of 0.982 (it fails the default gate). OpenVINO keeps its accumulations, layer norms
and softmax in float32 and rounds only the matrix products' inputs to bfloat16, which is why it is
both the faster and the more accurate. So the candidates, fastest first, are:

- ``openvino-bfloat16`` where the CPU computes in bfloat16 (AVX-512 BF16 or AMX);
- ``openvino-float32`` (OpenVINO's own fused kernels, about 1.7x here);
- ``torch-bfloat16`` where OpenVINO is not installed (the ``fast`` extra) and the CPU has BF16.

Each is judged by the gate: the calibration texts (``calibration.json``, shipped with the package:
hard cases, up to 512 tokens, where a low-precision path drifts first; the int8 ranges of
``core/quantization.py`` use a set of typical texts instead) are encoded by float32 torch and by
the candidate, and the candidate is kept only if the least cosine between the two is at least
``min_cosine``. The first candidate that passes serves; if none
does, float32 serves and the reason is logged and reported. The OpenVINO model (converted from the
loaded torch model, or read as it is from a directory that ships ``openvino/openvino_model.xml``
or ``onnx/model.onnx``) and the measured cosines are cached under ``export_dir``, keyed by the
model's files, the versions of torch, transformers and OpenVINO, and the settings that change
the vectors, so a restart neither converts nor calibrates again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from emb_model_provider.core.kinds import FastBackend
from emb_model_provider.encoders.base import EXACT_PATH, PrecisionReport

logger = logging.getLogger(__name__)

#: A padded forward: (input ids, attention mask), both (rows, longest) int64, -> hidden states
#: (rows, longest, hidden) float32 on the CPU.
PaddedForward = Callable[[npt.NDArray[np.int64], npt.NDArray[np.int64]], torch.Tensor]

#: Calibration texts go through the encoder in batches of this many (the server's default).
_CALIBRATION_BATCH = 32
#: Files in a model directory that ship an OpenVINO or ONNX graph, used as they are.
_SHIPPED_GRAPHS = ("openvino/openvino_model.xml", "onnx/model.onnx")
_DECISION = "decision-{path}.json"
_IR = "openvino_model.xml"


@dataclass(frozen=True)
class Candidate:
    backend: FastBackend
    dtype: str  # "bfloat16" | "float32"
    #: CPU features the path computes with.
    cpu_features: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        return f"{self.backend}-{self.dtype}"


def calibration_texts() -> list[str]:
    texts = json.loads((Path(__file__).with_name("calibration.json")).read_text(encoding="utf-8"))
    assert isinstance(texts, list)
    return [str(text) for text in texts]


def openvino() -> Any:
    """The ``openvino`` module, imported without its usage telemetry.

    The openvino wheel depends on openvino-telemetry, and ``import openvino`` sends a Google
    Analytics event (``convert_model`` sends more) unless the user's home holds an opt-out file
    or ``CI=true``: opt-out, not opt-in. A server must not report to a third party, so the
    telemetry package is made unimportable before the first import; OpenVINO's conversion tools
    then use their own no-op stub (``openvino/tools/ovc/telemetry_stub.py``), as they do when
    the package is not installed. Only if something else imported openvino first is it left be.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    import openvino as module

    return module


def openvino_available() -> bool:
    try:
        openvino()
    except ImportError:
        return False
    return True


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    return frozenset()


def _bf16_features() -> tuple[str, ...]:
    flags = cpu_flags()
    return tuple(flag for flag in ("amx_bf16", "avx512_bf16") if flag in flags)


@functools.cache
def _openvino_bf16() -> bool:
    """Whether OpenVINO's CPU plugin computes in bfloat16 here (it says so itself)."""
    capabilities = openvino().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def candidates(
    device: str, *, backend: FastBackend | None, dtype: str | None
) -> tuple[list[Candidate], str | None]:
    """The fast paths to try on ``device``, fastest first, within the pins; and, when there are
    none, why."""
    if device != "cpu":
        return [], f"the fast paths are for the CPU; on {device} the model runs in its dtype"
    found: list[Candidate] = []
    bf16 = _bf16_features()
    if backend in (None, "openvino") and openvino_available():
        if _openvino_bf16():
            found.append(Candidate("openvino", "bfloat16", bf16 or ("bf16",)))
        found.append(Candidate("openvino", "float32", _vector_features()))
    if backend in (None, "torch") and bf16:
        found.append(Candidate("torch", "bfloat16", bf16))
    if dtype is not None:
        found = [candidate for candidate in found if candidate.dtype == dtype]
    if found:
        return found, None
    pins = ", ".join(
        f"{key}={value}" for key, value in (("backend", backend), ("dtype", dtype)) if value
    )
    missing = [] if openvino_available() else ["OpenVINO is not installed (the `fast` extra)"]
    if not bf16:
        missing.append("the CPU has no bfloat16 instructions (avx512_bf16, amx_bf16)")
    why = "; ".join(missing) or "no path fits the pins"
    return [], f"no fast path on this machine{f' for {pins}' if pins else ''}: {why}"


def _vector_features() -> tuple[str, ...]:
    flags = cpu_flags()
    return tuple(flag for flag in ("avx512f", "avx2") if flag in flags)[:1]


# -- the cache ----------------------------------------------------------------------------------


def cache_key(model_dir: Path, settings: dict[str, object]) -> str:
    """What decides the export and the measured cosines: the model's files (names, sizes, change
    times), the libraries' versions and the settings that change the vectors. One folder per
    key holds the export (shared by the paths of one runtime) and each path's decision."""
    files = sorted(
        (str(path.relative_to(model_dir)), path.stat().st_size, path.stat().st_mtime_ns)
        for path in model_dir.rglob("*")
        if path.is_file() and ".cache" not in path.parts
    )
    versions = {name: _version(name) for name in ("torch", "transformers", "openvino")}
    blob = json.dumps(
        {
            "model": str(model_dir.resolve()),
            "files": files,
            "versions": versions,
            "settings": settings,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def default_export_dir(cache_dir: str | None) -> Path:
    """In the cache folder the operator chose (``EMB_PROVIDER_CACHE_DIR``), or else beside
    huggingface_hub's hub cache (``~/.cache/huggingface/emb-model-provider-fast``), where
    ``hf cache scan`` does not mistake it for a model."""
    from huggingface_hub import constants

    if cache_dir:
        return Path(cache_dir) / "emb-model-provider-fast"
    return Path(constants.HF_HUB_CACHE).parent / "emb-model-provider-fast"


@dataclass(frozen=True)
class Decision:
    min_cosine: float
    mean_cosine: float
    #: What the OpenVINO model was read from: ``export`` or the shipped file's path.
    graph: str | None = None


def read_decision(folder: Path, path: str) -> Decision | None:
    try:
        raw = json.loads((folder / _DECISION.format(path=path)).read_text(encoding="utf-8"))
        return Decision(float(raw["min_cosine"]), float(raw["mean_cosine"]), raw.get("graph"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_decision(folder: Path, path: str, decision: Decision) -> None:
    _atomic_write(
        folder / _DECISION.format(path=path),
        json.dumps(
            {
                "min_cosine": decision.min_cosine,
                "mean_cosine": decision.mean_cosine,
                "graph": decision.graph,
            }
        ),
    )


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(staging, path)


# -- the forwards -------------------------------------------------------------------------------


class _Wrapped(torch.nn.Module):
    """The transformers model as (input ids, attention mask) -> last hidden state, the two inputs
    the server feeds (token type ids are zeros, as in ``TextEncoder``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra = {"token_type_ids": torch.zeros_like(input_ids)} if self.token_types else {}
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = getattr(output, "last_hidden_state", None)
        result: torch.Tensor = output[0] if hidden is None else hidden
        return result


def openvino_forward(
    model: torch.nn.Module,
    model_dir: Path,
    folder: Path,
    *,
    dtype: str,
    num_threads: int,
) -> tuple[PaddedForward, str]:
    """An OpenVINO forward of ``model``: read from the cache, from a graph the directory ships,
    or converted from the torch model (and cached). Returns it and what it was read from."""
    ov = openvino()
    core = ov.Core()
    shipped = next(
        (model_dir / name for name in _SHIPPED_GRAPHS if (model_dir / name).is_file()), None
    )
    if shipped is not None:
        graph = core.read_model(str(shipped))
        source = str(shipped.relative_to(model_dir))
    elif (folder / _IR).is_file():
        graph = core.read_model(str(folder / _IR))
        source = "export"
    else:
        graph = _convert(model)
        with tempfile.TemporaryDirectory(dir=_mkdir(folder)) as staging:
            # Written whole, then moved: a crash mid-write leaves no half model to read.
            ov.save_model(graph, str(Path(staging) / _IR), compress_to_fp16=False)
            for name in (_IR, _IR.replace(".xml", ".bin")):
                os.replace(Path(staging) / name, folder / name)
        source = "export"
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": "bf16" if dtype == "bfloat16" else "f32",
        # One batch at a time per model (the batcher's forward lock): latency, not streams.
        "PERFORMANCE_HINT": "LATENCY",
    }
    if num_threads > 0:
        config["INFERENCE_NUM_THREADS"] = num_threads
    compiled = core.compile_model(graph, "CPU", config)
    request = compiled.create_infer_request()
    names = {name for port in compiled.inputs for name in port.get_names()}
    output = next(
        (port for port in compiled.outputs if "last_hidden_state" in port.get_names()),
        compiled.outputs[0],
    )

    def forward(
        input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> torch.Tensor:
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in names:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        result = request.infer({key: value for key, value in feed.items() if key in names})
        # Copied: the request's output buffer is reused by its next inference.
        return torch.from_numpy(np.array(result[output], dtype=np.float32))

    return forward, source


def _mkdir(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _convert(model: torch.nn.Module) -> Any:
    example = {
        "input_ids": torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]),
    }
    with torch.inference_mode(), _quiet_tracing():
        return openvino().convert_model(_Wrapped(model).eval(), example_input=example)


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Tracing warns about every data-dependent branch of the modelling code; noise in a log."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def torch_bf16_forward(model: torch.nn.Module) -> PaddedForward:
    """The model in bfloat16 (a copy: the float32 one stays the reference until the gate)."""
    import copy

    wrapped = _Wrapped(copy.deepcopy(model).to(torch.bfloat16)).eval()

    def forward(
        input_ids: npt.NDArray[np.int64], attention_mask: npt.NDArray[np.int64]
    ) -> torch.Tensor:
        with torch.inference_mode():
            hidden: torch.Tensor = wrapped(
                torch.from_numpy(input_ids), torch.from_numpy(attention_mask)
            )
        return hidden.float()

    return forward


# -- the gate -----------------------------------------------------------------------------------


def cosines(
    reference: npt.NDArray[np.float32], fast: npt.NDArray[np.float32]
) -> tuple[float, float]:
    """Least and mean cosine between the rows of two vector sets."""
    ref = reference.astype(np.float64)
    got = fast.astype(np.float64)
    ref /= np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), 1e-12)
    got /= np.maximum(np.linalg.norm(got, axis=1, keepdims=True), 1e-12)
    values = (ref * got).sum(axis=1)
    return float(values.min()), float(values.mean())


def encode_all(
    encode: Callable[[Sequence[str]], npt.NDArray[np.float32]], texts: Sequence[str]
) -> npt.NDArray[np.float32]:
    parts = [
        encode(texts[start : start + _CALIBRATION_BATCH])
        for start in range(0, len(texts), _CALIBRATION_BATCH)
    ]
    return np.concatenate(parts)


def choose(
    encode_with: Callable[[PaddedForward | None, Sequence[str]], npt.NDArray[np.float32]],
    model: torch.nn.Module,
    model_dir: Path,
    *,
    device: str,
    gate: float,
    backend: FastBackend | None,
    dtype: str | None,
    num_threads: int,
    export_dir: Path,
    settings: dict[str, object],
) -> tuple[PaddedForward | None, PrecisionReport]:
    """The first candidate that passes the gate, with its report; or (None, a report of why
    float32 serves). ``encode_with(forward, texts)`` encodes texts through the model's pipeline
    (tokenizer, pooling, Dense) with ``forward`` in place of the float32 one (None: float32)."""
    found, why = candidates(device, backend=backend, dtype=dtype)
    if not found:
        logger.warning("precision fast: %s; serving float32", why)
        return None, PrecisionReport(requested="fast", path=EXACT_PATH, gate=gate, reason=why)
    texts = calibration_texts()
    reference: npt.NDArray[np.float32] | None = None
    reasons: list[str] = []
    first: Decision | None = None
    folder = export_dir / cache_key(model_dir, settings)
    for candidate in found:
        decision = read_decision(folder, candidate.path)
        try:
            if candidate.backend == "openvino":
                forward, graph = openvino_forward(
                    model, model_dir, folder, dtype=candidate.dtype, num_threads=num_threads
                )
            else:
                forward, graph = torch_bf16_forward(model), None
            if decision is None:
                if reference is None:
                    reference = encode_all(lambda batch: encode_with(None, batch), texts)
                vectors = encode_all(functools.partial(encode_with, forward), texts)
                least, mean = cosines(reference, vectors)
                decision = Decision(least, mean, graph)
                write_decision(folder, candidate.path, decision)
            else:
                logger.info("precision fast: %s gate decision read from %s", candidate.path, folder)
        except Exception as exc:  # a conversion the library cannot do: try the next path
            logger.warning("precision fast: %s failed: %s", candidate.path, exc, exc_info=True)
            reasons.append(f"{candidate.path} failed ({type(exc).__name__}: {exc})")
            continue
        first = first or decision
        if decision.min_cosine >= gate:
            logger.info(
                "precision fast: %s passes the gate (least cosine %.5f >= %s, mean %.6f)",
                candidate.path,
                decision.min_cosine,
                gate,
                decision.mean_cosine,
            )
            report = PrecisionReport(
                requested="fast",
                path=candidate.path,
                min_cosine=decision.min_cosine,
                mean_cosine=decision.mean_cosine,
                gate=gate,
                cpu_features=candidate.cpu_features,
            )
            return forward, report
        reasons.append(
            f"{candidate.path} least cosine {decision.min_cosine:.5f} < min_cosine {gate}"
        )
    reason = "; ".join(reasons)
    logger.warning("precision fast refused, serving float32: %s", reason)
    return None, PrecisionReport(
        requested="fast",
        path=EXACT_PATH,
        min_cosine=first.min_cosine if first else None,
        mean_cosine=first.mean_cosine if first else None,
        gate=gate,
        reason=reason,
    )
