"""API keys, stored only as hashes, and the constant-time check of a presented key.

A key is stored as ``sha256:<64 hex digits>`` (``emb-model-provider hash-key`` prints one), so a
leaked settings file or environment does not leak a usable key. Keys are long random strings
(``sk-`` and 32 random bytes), so an unsalted fast hash is enough: there is nothing to guess.

A presented key is hashed once and compared with ``hmac.compare_digest`` against *every* stored
hash, without stopping at the first match, so the time taken does not tell which key (or how much
of one) matched.

Keys file (``EMB_PROVIDER_API_KEYS_FILE``), YAML::

    keys:
      - sha256:9f86d081...                 # a bare hash: every model, named by its hash prefix
      - hash: sha256:60303ae2...
        name: search-team                  # shown in logs instead of the hash prefix
        models: [all-MiniLM-L6-v2]         # names or aliases this key may use; absent = all
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

HASH_PREFIX = "sha256:"
_HEX_DIGITS = frozenset("0123456789abcdef")
_DIGEST_HEX_LEN = 64


def hash_key(key: str) -> str:
    """``sha256:<hex>`` of ``key``, the form the settings store."""
    return HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random key in OpenAI's shape (``sk-...``)."""
    return "sk-" + secrets.token_urlsafe(32)


def parse_key_hash(text: str) -> bytes:
    """The digest of a ``sha256:<hex>`` string; ``ValueError`` names what is wrong."""
    value = text.strip().lower()
    if not value.startswith(HASH_PREFIX):
        raise ValueError(
            f"key hashes look like sha256:<64 hex digits> (got {_shown(text)}); "
            "`emb-model-provider hash-key` prints one"
        )
    hex_part = value.removeprefix(HASH_PREFIX)
    if len(hex_part) != _DIGEST_HEX_LEN or not set(hex_part) <= _HEX_DIGITS:
        raise ValueError(f"not a sha256 digest of 64 hex digits: {_shown(text)}")
    return bytes.fromhex(hex_part)


def _shown(text: str) -> str:
    # A misplaced clear-text key must not end up in a start-up error whole.
    return repr(text if len(text) <= 12 else text[:10] + "...")


@dataclass(frozen=True)
class ApiKey:
    """One stored key: its digest, a name for logs and the models it may use (None: all)."""

    name: str
    digest: bytes
    models: frozenset[str] | None = None

    def may_use(self, names: Iterable[str]) -> bool:
        """Whether any of a model's ``names`` (canonical name and aliases) is allowed."""
        return self.models is None or not self.models.isdisjoint(names)


def key_from_hash(
    text: str, *, name: str | None = None, models: Iterable[str] | None = None
) -> ApiKey:
    digest = parse_key_hash(text)
    return ApiKey(
        name=name or f"{HASH_PREFIX}{digest.hex()[:8]}",
        digest=digest,
        models=frozenset(models) if models is not None else None,
    )


def keys_from_list(text: str) -> tuple[ApiKey, ...]:
    """Keys from a comma-separated list of hashes (the ``*_KEY_HASHES`` settings)."""
    return tuple(key_from_hash(entry) for entry in text.split(",") if entry.strip())


def load_keys_file(path: Path) -> tuple[ApiKey, ...]:
    """Keys from a YAML keys file (see the module doc); ``ValueError`` names the bad entry."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError(f"{path}: expected a mapping with a 'keys' list")
    keys: list[ApiKey] = []
    for index, entry in enumerate(document["keys"]):
        where = f"{path}: keys[{index}]"
        if isinstance(entry, str):
            keys.append(_entry(where, entry, None, None))
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("hash"), str):
            raise ValueError(f"{where}: expected a hash string or a mapping with 'hash'")
        unknown = set(entry) - {"hash", "name", "models"}
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        name = entry.get("name")
        if name is not None and not (isinstance(name, str) and name.strip()):
            raise ValueError(f"{where}: 'name' must be a non-empty string")
        models = entry.get("models")
        if models is not None and not (
            isinstance(models, list) and all(isinstance(m, str) and m for m in models)
        ):
            raise ValueError(f"{where}: 'models' must be a list of model names")
        keys.append(_entry(where, entry["hash"], name, models))
    return tuple(keys)


def _entry(where: str, text: str, name: str | None, models: list[str] | None) -> ApiKey:
    try:
        return key_from_hash(text, name=name, models=models)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


class KeyRing:
    """The stored keys, checked in constant time over all of them."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = tuple(keys)
        digests = [key.digest for key in self._keys]
        if len(set(digests)) != len(digests):
            raise ValueError("the same key hash is configured twice")

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return self._keys

    def match(self, presented: str) -> ApiKey | None:
        """The stored key whose hash is that of ``presented``, or None."""
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found: ApiKey | None = None
        for key in self._keys:  # no early exit: every candidate costs the same
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found
