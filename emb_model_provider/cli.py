"""``emb-model-provider serve``: settings from flags, then ``EMB_PROVIDER_*``/.env, then defaults.

A setting that cannot work stops the start with one line that names it, never a traceback.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pydantic import ValidationError

from emb_model_provider import __version__
from emb_model_provider.core.config import Settings, env_name
from emb_model_provider.core.errors import ConfigError
from emb_model_provider.offline import command as bulk

#: flag -> Settings field, for ``serve``.
_SERVE_FLAGS: dict[str, tuple[str, type, str]] = {
    "--host": ("host", str, "interface to bind (EMB_PROVIDER_HOST, default 127.0.0.1)"),
    "--port": ("port", str, "TCP port (EMB_PROVIDER_PORT, default 9000)"),
    "--default-model": ("default_model", str, "model loaded at start-up"),
    "--device": ("device", str, "auto | cpu | cuda | cuda:N | mps"),
    "--dtype": ("dtype", str, "auto | float32 | float16 | bfloat16"),
    "--precision": ("precision", str, "exact | fast (text models whose entry names none)"),
    "--log-level": ("log_level", str, "debug | info | warning | error | critical"),
    "--models-file": ("models_file", str, "YAML file that adds or overrides models"),
    "--max-batch-size": ("max_batch_size", str, "inputs per forward pass"),
    "--cache-dir": ("cache_dir", str, "Hugging Face hub cache directory"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emb-model-provider", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible embeddings API")
    for flag, (_, kind, help_text) in _SERVE_FLAGS.items():
        serve.add_argument(flag, type=kind, help=help_text)
    hash_key = commands.add_parser(
        "hash-key",
        help="print the sha256:<hex> hash of an API key for EMB_PROVIDER_*_KEY_HASHES",
        description=(
            "Print the hash of KEY (- reads it from stdin, keeping it out of the shell history). "
            "Without KEY, make a new random key and print it, then its hash, one per line."
        ),
    )
    hash_key.add_argument("key", nargs="?", help="the key to hash; - reads it from stdin")
    embed_command = commands.add_parser(
        "embed", help="embed a corpus into a Parquet or .npy file", description=bulk.DESCRIPTION
    )
    bulk.add_arguments(embed_command)
    return parser


def _fail(message: str) -> int:
    sys.stderr.write(f"emb-model-provider: {message}\n")
    return 2


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    for flag, (field, _, _) in _SERVE_FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            overrides[field] = value
    return Settings(**overrides)


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else "?"
    value = first.get("input")
    shown = f"={value!r}" if isinstance(value, (str, int, float)) else ""
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid setting {env_name(field)}{shown}: {message}"


def serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ValidationError as exc:
        return _fail(_describe(exc))

    import uvicorn

    from emb_model_provider.core.logging import configure_logging
    from emb_model_provider.main import create_app

    try:
        app = create_app(settings)
    except ConfigError as exc:
        return _fail(f"invalid setting {exc.setting}: {exc.message}")
    # Logging starts once the settings are known to work, so that a bad one is reported in one
    # line, not after INFO lines from the checks that ran before it.
    configure_logging(settings.log_level, settings.log_format)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _exit_after_shutdown)
    uvicorn.run(app, host=settings.host, port=settings.port, **uvicorn_options(settings))
    return 0


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """How ``serve`` runs uvicorn (the tests' live servers run it the same way)."""
    return {
        "log_config": None,
        "log_level": settings.log_level,
        # Ours (api/middleware.py) carries the request id, model and tokens.
        "access_log": not settings.access_log,
        "timeout_graceful_shutdown": settings.shutdown_timeout_s,
        # uvicorn's 5 s equals httpx's pool expiry: a client reusing a connection idle for
        # just under 5 s could send on one the server was closing (httpx.ReadError).
        "timeout_keep_alive": settings.keep_alive_s,
        # X-Forwarded-For is read by api/auth.py, from EMB_PROVIDER_TRUSTED_PROXIES only;
        # uvicorn's default would also believe it from any process on 127.0.0.1.
        "proxy_headers": False,
    }


def hash_key(key: str | None) -> int:
    from emb_model_provider.security.keys import generate_key
    from emb_model_provider.security.keys import hash_key as hashed

    if key == "-":
        key = sys.stdin.readline().strip()
    if key is not None and not key:
        return _fail("hash-key: the key is empty")
    if key is None:
        key = generate_key()
        sys.stderr.write("new API key (give it to the client; it is not stored), then its hash:\n")
        sys.stdout.write(f"{key}\n")
    sys.stdout.write(f"{hashed(key)}\n")
    return 0


def embed(args: argparse.Namespace) -> int:
    try:
        settings = Settings(**bulk.settings_overrides(args))
    except ValidationError as exc:
        return _fail(_describe(exc))
    return bulk.run_embed(args, settings, _fail)


def _exit_after_shutdown(signum: int, frame: FrameType | None) -> None:
    """Exit 0 once uvicorn has shut down on SIGINT/SIGTERM.

    uvicorn (>= 0.29, ``Server.capture_signals``) shuts down gracefully, restores the handlers it
    found and raises the signal again; with Python's defaults the process would then die of
    SIGTERM (exit status 143) or print a KeyboardInterrupt traceback after a clean shutdown.
    Installed just before ``uvicorn.run``, so a signal during start-up also ends the process.
    """
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "hash-key":
        return hash_key(args.key)
    if args.command == "embed":
        return embed(args)
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    raise SystemExit(main())
