"""``emb-model-provider embed``: flags, checks, the chosen engine, the summary line.

Imports nothing heavy at module level (``cli.py`` builds its parser from here); torch, Ray and
pyarrow load only when a job runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emb_model_provider.core.config import Settings
from emb_model_provider.core.kinds import QUANTIZATIONS

if TYPE_CHECKING:
    from emb_model_provider.offline.base import Embedder
    from emb_model_provider.offline.job import Summary
    from emb_model_provider.offline.records import InputSpec

DESCRIPTION = (
    "Embed a corpus into a Parquet or .npy file (a sparse model's vectors: Parquet indices and "
    "values columns), in this process (the model's weights here), "
    "through a running server (--url) or on a Ray cluster (--engine ray). Inputs: a .txt file "
    "(one input per line), .jsonl ({'id', 'text'} or {'id', 'image'}), .csv or .parquet "
    "(--column), or a directory of images. An interrupted run resumes when run again with the "
    "same arguments; inputs that fail are listed in OUTPUT.errors.jsonl."
)

#: flag -> Settings field: the model's placement and registry, as ``serve`` takes them.
SETTINGS_FLAGS: dict[str, tuple[str, str]] = {
    "--device": ("device", "auto | cpu | cuda | cuda:N | mps (EMB_PROVIDER_DEVICE)"),
    "--dtype": ("dtype", "auto | float32 | float16 | bfloat16"),
    "--precision": ("precision", "exact | fast: float32, or the fastest path passing the gate"),
    "--models-file": ("models_file", "YAML file that adds or overrides models"),
    "--cache-dir": ("cache_dir", "Hugging Face hub cache directory"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="a .txt, .jsonl, .csv or .parquet file, or an image folder")
    parser.add_argument(
        "-o", "--output", required=True, help="OUTPUT.parquet, or OUTPUT.npy (+ OUTPUT.ids.jsonl)"
    )
    parser.add_argument("--model", help="model name or alias (default: the default model)")
    parser.add_argument(
        "--dimensions",
        help="keep the first N components, re-normalised (a sparse model: its N largest weights)",
    )
    parser.add_argument(
        "--encoding-format",
        default="float",
        help="float | int8 | uint8 | binary | ubinary: integers as the server's encoding_format",
    )
    parser.add_argument("--batch-size", default="64", help="inputs per forward pass or request")
    parser.add_argument("--column", help="csv/parquet: the column to embed")
    parser.add_argument("--id-column", help="csv/parquet: the id column (default: row number)")
    parser.add_argument(
        "--input-format", help="txt | jsonl | csv | parquet | dir (default: from the suffix)"
    )
    parser.add_argument(
        "--chunk-size", default="1024", help="inputs per part file: what a resume skips"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUTPUT and any unfinished run of it"
    )
    parser.add_argument(
        "--progress-interval", default="10", help="seconds between progress lines (no terminal)"
    )
    for flag, (_, help_text) in SETTINGS_FLAGS.items():
        parser.add_argument(flag, help=help_text)
    remote = parser.add_argument_group("through a running server")
    remote.add_argument("--url", help="the server's base URL, e.g. http://10.0.0.5:9000")
    remote.add_argument("--api-key", help="API key for --url; - reads it from stdin")
    remote.add_argument("--concurrency", default="4", help="requests in flight (--url)")
    cluster = parser.add_argument_group("on a Ray cluster (pip install emb-model-provider[ray])")
    cluster.add_argument("--engine", default="local", help="local (this process, or --url) | ray")
    cluster.add_argument("--ray-address", help="cluster address (default: a local Ray)")
    cluster.add_argument("--ray-cpus", help="CPUs of a local Ray (default: all)")
    cluster.add_argument("--actors", help="encoder actors (default: one per GPU or CPU share)")
    cluster.add_argument("--cpus-per-actor", default="1", help="CPUs (torch threads) per actor")
    cluster.add_argument("--gpus-per-actor", default="0", help="GPUs per actor (1: one per GPU)")


def settings_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for flag, (field, _) in SETTINGS_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            overrides[field] = value
    return overrides


class UsageError(Exception):
    """A bad flag value: one line, exit status 2."""


def _number(args: argparse.Namespace, name: str, kind: type[int] | type[float]) -> Any:
    raw = getattr(args, name)
    if raw is None:
        return None
    flag = "--" + name.replace("_", "-")
    try:
        value = kind(raw)
    except ValueError:
        raise UsageError(f"{flag} must be a number, got {raw!r}") from None
    least = 0 if name == "gpus_per_actor" else 1
    if not value >= least:  # NaN fails this too
        raise UsageError(f"{flag} must be at least {least}, got {raw!r}")
    return value


def run_embed(args: argparse.Namespace, settings: Settings, fail: Callable[[str], int]) -> int:
    from emb_model_provider.offline.base import BulkError
    from emb_model_provider.offline.records import InputError, input_spec

    try:
        batch_size = _number(args, "batch_size", int)
        chunk_size = _number(args, "chunk_size", int)
        dimensions = _number(args, "dimensions", int)
        concurrency = _number(args, "concurrency", int)
        interval_s = _number(args, "progress_interval", float)
        if args.encoding_format not in ("float", *QUANTIZATIONS):
            raise UsageError(
                "--encoding-format must be float, int8, uint8, binary or ubinary, "
                f"got {args.encoding_format!r}"
            )
        if args.encoding_format != "float" and args.engine == "ray":
            raise UsageError("--encoding-format with --engine ray is not supported")
        if args.engine not in ("local", "ray"):
            raise UsageError(f"--engine must be local or ray, got {args.engine!r}")
        if args.url is not None and args.engine == "ray":
            raise UsageError("--url and --engine ray exclude each other")
        if args.url is not None and not args.url.startswith(("http://", "https://")):
            raise UsageError(f"--url must be an http(s) URL, got {args.url!r}")
        spec = input_spec(
            Path(args.input),
            column=args.column,
            id_column=args.id_column,
            format=args.input_format,
        )
    except (UsageError, InputError) as exc:
        return fail(f"embed: {exc}")
    output = Path(args.output)
    try:
        if args.engine == "ray":
            summary = _run_ray(
                args,
                settings,
                spec,
                output,
                batch_size=batch_size,
                chunk_size=chunk_size,
                dimensions=dimensions,
            )
        else:
            from emb_model_provider.offline.job import check_output, run_job

            check_output(output, overwrite=args.overwrite)
            embedder = _embedder(args, settings, batch_size, dimensions, concurrency)
            if args.encoding_format != "float":
                embedder = _quantizing(embedder, args, settings)
            try:
                summary = run_job(
                    spec,
                    embedder,
                    output,
                    chunk_size=chunk_size,
                    overwrite=args.overwrite,
                    progress_interval_s=interval_s,
                )
            finally:
                embedder.close()
    except UsageError as exc:
        return fail(f"embed: {exc}")
    except (BulkError, InputError) as exc:
        fail(f"embed: {exc}")
        return 1
    except KeyboardInterrupt:
        fail("embed: interrupted; run the same command again to resume")
        return 130
    sys.stderr.write(f"emb-model-provider embed: {summary.line()}\n")
    return 0


def _quantizing(embedder: Embedder, args: argparse.Namespace, settings: Settings) -> Embedder:
    from emb_model_provider.core.quantization import calibration_texts
    from emb_model_provider.offline.quantized import QuantizingEmbedder
    from emb_model_provider.registry import Registry
    from emb_model_provider.services.quantize import calibration_texts_of

    try:
        # --url: the server's model, calibrated on the built-in set (or the local models
        # file's, when it names the model too).
        registry = Registry.from_settings(settings.models_file)
        spec = registry.get(embedder.model) if embedder.model in registry else None
        texts = calibration_texts_of(spec) if spec is not None else calibration_texts()
        return QuantizingEmbedder(embedder, args.encoding_format, texts)
    except BaseException:
        embedder.close()
        raise


def _embedder(
    args: argparse.Namespace,
    settings: Settings,
    batch_size: int,
    dimensions: int | None,
    concurrency: int,
) -> Embedder:
    if args.url is not None:
        from emb_model_provider.offline.http import HttpEmbedder

        api_key = args.api_key
        if api_key == "-":
            api_key = sys.stdin.readline().strip()
        return HttpEmbedder(
            args.url,
            model=args.model or settings.default_model,
            dimensions=dimensions,
            batch_size=batch_size,
            concurrency=concurrency,
            api_key=api_key,
            max_image_bytes=settings.max_image_bytes,
        )
    from emb_model_provider.offline.local import LocalConfig, LocalEmbedder

    config = LocalConfig.from_settings(
        settings, model=args.model, dimensions=dimensions, batch_size=batch_size
    )
    return LocalEmbedder(config)


def _run_ray(
    args: argparse.Namespace,
    settings: Settings,
    spec: InputSpec,
    output: Path,
    *,
    batch_size: int,
    chunk_size: int,
    dimensions: int | None,
) -> Summary:
    try:
        import ray  # noqa: F401  # the optional extra, checked before anything starts
    except ImportError:
        raise UsageError("--engine ray needs Ray: pip install 'emb-model-provider[ray]'") from None
    from emb_model_provider.offline.local import LocalConfig
    from emb_model_provider.offline.ray_engine import run_ray_job

    config = LocalConfig.from_settings(
        settings, model=args.model, dimensions=dimensions, batch_size=batch_size
    )
    return run_ray_job(
        spec,
        config,
        output,
        address=args.ray_address,
        num_cpus=_number(args, "ray_cpus", int),
        actors=_number(args, "actors", int),
        cpus_per_actor=_number(args, "cpus_per_actor", float),
        gpus_per_actor=_number(args, "gpus_per_actor", float),
        chunk_size=chunk_size,
        overwrite=args.overwrite,
        progress_interval_s=_number(args, "progress_interval", float),
    )
