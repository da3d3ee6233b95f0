"""Inputs of a bulk job, read lazily in a fixed order (resuming relies on the order).

Each input becomes a ``Record``: an id (always text in the output), a value (text, or an image
path, URL or data URI) and, for a line that cannot be used, the reason. Bad lines are kept as
records so that they reach the errors file with their ids and the rest goes on.

- ``.txt``: one text per line; the id is the line number (from 1).
- ``.jsonl``: ``{"id": .., "text": ..}`` or ``{"id": .., "image": "<path|url|data URI>"}``;
  image paths are relative to the file's folder.
- ``.csv`` / ``.parquet``: the ``column`` named; the id is ``id_column`` or the row number (from 0).
- a directory: image files found recursively by extension, sorted; the id is the relative path.

A multimodal model (CLIP, SigLIP) takes both: a directory gives images, ``.txt``, ``.csv`` and
``.parquet`` give texts, and each ``.jsonl`` line whichever of ``"image"`` and ``"text"`` it has.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from emb_model_provider.core.kinds import Modality

InputKind = Literal["text", "image"]
#: A model's modality: the kinds of input it takes.
ModelKind = Modality

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})
FORMATS = ("txt", "jsonl", "csv", "parquet", "dir")
InputFormat = Literal["txt", "jsonl", "csv", "parquet", "dir"]

_SUFFIXES: dict[str, InputFormat] = {
    ".txt": "txt",
    ".text": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class InputError(Exception):
    """The input as a whole cannot be read (missing file, unknown column): one line for users."""


@dataclass(frozen=True, slots=True)
class Record:
    id: str
    #: Text, or an image reference: a local path (absolute), an http(s) URL or a data URI.
    value: str
    kind: InputKind
    #: Why this input cannot be embedded; None for a usable one.
    error: str | None = None


@dataclass(frozen=True)
class InputSpec:
    path: Path
    format: InputFormat
    column: str | None = None
    id_column: str | None = None

    def describe(self) -> dict[str, object]:
        """What identifies this input for resuming: the path, its size and modification time
        (a directory: those of every image in it), and how it is read."""
        return {
            "path": str(self.path.resolve()),
            "format": self.format,
            "column": self.column,
            "id_column": self.id_column,
            "fingerprint": _fingerprint(self.path, self.format),
        }


def input_spec(
    path: Path, *, column: str | None, id_column: str | None, format: str | None = None
) -> InputSpec:
    """Check that ``path`` can be read as the format its suffix (or ``format``) names."""
    if not path.exists():
        raise InputError(f"input not found: {path}")
    chosen: InputFormat
    if format is not None:
        if format not in FORMATS:
            raise InputError(f"unknown input format {format!r}; use one of {', '.join(FORMATS)}")
        chosen = cast(InputFormat, format)
    elif path.is_dir():
        chosen = "dir"
    else:
        found = _SUFFIXES.get(path.suffix.lower())
        if found is None:
            raise InputError(
                f"cannot tell the format of {path.name} from its suffix; use .txt, .jsonl, .csv, "
                ".parquet, a directory of images, or --input-format"
            )
        chosen = found
    if (chosen == "dir") != path.is_dir():
        raise InputError(f"{path} is {'a' if path.is_dir() else 'not a'} directory")
    if chosen in ("csv", "parquet"):
        if column is None:
            raise InputError(f"--column is required for {chosen} input: the column to embed")
        names = _columns(path, chosen)
        for wanted in (column, id_column):
            if wanted is not None and wanted not in names:
                raise InputError(
                    f"{path.name} has no column {wanted!r}; it has {', '.join(names) or 'none'}"
                )
    elif column is not None or id_column is not None:
        raise InputError(f"--column and --id-column apply to csv and parquet input, not {chosen}")
    return InputSpec(path, chosen, column, id_column)


def read_records(spec: InputSpec, kind: ModelKind) -> Iterator[Record]:
    """Every input in order; ``kind`` is the model's modality (how plain values are taken)."""
    plain: InputKind = "text" if kind == "multimodal" else kind
    if spec.format == "txt":
        yield from _txt(spec.path, plain)
    elif spec.format == "jsonl":
        yield from _jsonl(spec.path, kind)
    elif spec.format == "csv":
        yield from _csv(spec, plain)
    elif spec.format == "parquet":
        yield from _parquet(spec, plain)
    else:
        yield from _directory(spec.path, "image" if kind == "multimodal" else kind)


def count_records(spec: InputSpec) -> int:
    """How many records ``read_records`` yields (for the progress bar's total and ETA)."""
    if spec.format in ("txt", "jsonl"):
        with spec.path.open("rb") as file:
            return sum(1 for _ in file)
    if spec.format == "csv":
        with spec.path.open(newline="", encoding="utf-8") as file:
            return max(0, sum(1 for _ in csv.reader(file)) - 1)
    if spec.format == "parquet":
        import pyarrow.parquet as pq

        return int(pq.ParquetFile(spec.path).metadata.num_rows)
    return sum(1 for _ in _image_files(spec.path))


def _value(value: object, kind: InputKind, id_: str, base: Path) -> Record:
    if not isinstance(value, str):
        return Record(id_, "", kind, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        return Record(id_, "", kind, "the input is empty")
    if kind == "image":
        value = image_reference(value, base)
    return Record(id_, value, kind)


def image_reference(value: str, base: Path) -> str:
    """URLs and data URIs as they are; anything else is a path, relative to ``base``."""
    lowered = value.lstrip().lower()
    if lowered.startswith(("http://", "https://", "data:")):
        return value.strip()
    return str((base / Path(value).expanduser()).resolve())


def _txt(path: Path, kind: InputKind) -> Iterator[Record]:
    with path.open(encoding="utf-8", errors="replace", newline="") as file:
        for number, line in enumerate(file, start=1):
            yield _value(line.rstrip("\r\n"), kind, str(number), path.parent)


def _jsonl(path: Path, model_kind: ModelKind) -> Iterator[Record]:
    with path.open(encoding="utf-8", errors="replace") as file:
        for number, line in enumerate(file, start=1):
            fallback = f"line {number}"
            kind: InputKind = "text" if model_kind == "multimodal" else model_kind
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                yield Record(fallback, "", kind, f"not JSON: {exc.msg} at column {exc.colno}")
                continue
            if not isinstance(item, dict):
                yield Record(fallback, "", kind, "expected a JSON object")
                continue
            raw_id = item.get("id")
            if raw_id is None or isinstance(raw_id, (dict, list)):
                yield Record(fallback, "", kind, 'no "id" (a string or a number)')
                continue
            id_ = str(raw_id)
            if model_kind == "multimodal" and "image" in item:
                kind = "image"
            other = "image" if kind == "text" else "text"
            if model_kind == "multimodal" and kind not in item:
                yield Record(id_, "", kind, 'no "text" or "image" field')
                continue
            if kind not in item:
                reason = (
                    f'has "{other}" but the model takes {kind}s'
                    if other in item
                    else f'no "{kind}" field'
                )
                yield Record(id_, "", kind, reason)
                continue
            yield _value(item[kind], kind, id_, path.parent)


def _csv(spec: InputSpec, kind: InputKind) -> Iterator[Record]:
    with spec.path.open(newline="", encoding="utf-8", errors="replace") as file:
        for row_number, row in enumerate(csv.DictReader(file)):
            id_ = row.get(spec.id_column) if spec.id_column else None
            yield _value(
                row.get(spec.column or ""),
                kind,
                id_ if id_ else str(row_number),
                spec.path.parent,
            )


def _parquet(spec: InputSpec, kind: InputKind) -> Iterator[Record]:
    import pyarrow.parquet as pq

    columns = [name for name in (spec.column, spec.id_column) if name is not None]
    row_number = 0
    for batch in pq.ParquetFile(spec.path).iter_batches(batch_size=4096, columns=columns):
        values = batch.column(spec.column or "").to_pylist()
        ids = batch.column(spec.id_column).to_pylist() if spec.id_column else None
        for offset, value in enumerate(values):
            raw_id = ids[offset] if ids is not None else None
            id_ = str(raw_id) if raw_id is not None else str(row_number)
            yield _value(value, kind, id_, spec.path.parent)
            row_number += 1


def _directory(path: Path, kind: InputKind) -> Iterator[Record]:
    for file in _image_files(path):
        id_ = file.relative_to(path).as_posix()
        if kind != "image":
            yield Record(id_, "", kind, "an image, but the model takes text")
        else:
            yield Record(id_, str(file.resolve()), kind)


def _image_files(path: Path) -> Iterator[Path]:
    found: list[Path] = []
    for folder, _dirs, files in os.walk(path):
        for name in files:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder) / name)
    yield from sorted(found, key=lambda item: item.relative_to(path).as_posix())


def _columns(path: Path, format: InputFormat) -> list[str]:
    try:
        if format == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(path).schema_arrow.names)
        with path.open(newline="", encoding="utf-8", errors="replace") as file:
            return next(csv.reader(file), [])
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def _fingerprint(path: Path, format: InputFormat) -> str:
    digest = hashlib.sha256()
    files = list(_image_files(path)) if format == "dir" else [path]
    for file in files:
        stat = file.stat()
        digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
