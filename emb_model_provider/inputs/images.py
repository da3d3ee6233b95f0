"""Image inputs: tell URLs from inline images, and decode bytes into RGB under size limits.

``parse_image_reference`` sorts a client's string into an ``http(s)`` URL (fetched later by
``security/fetch.py``), a ``data:`` URI or bare base64, and decodes the inline forms strictly.
``decode_image`` turns bytes into an RGB ``PIL.Image.Image``:

- The header is read first: ``Image.open`` is lazy and knows the size before any pixel is decoded,
  so an image over ``max_pixels`` (a decompression bomb: a few KB of PNG declaring 100k x 100k) is
  refused before it costs memory. The limit used is the smaller of ``max_pixels`` and Pillow's own
  ``Image.MAX_IMAGE_PIXELS``, so whatever Pillow would warn about is refused here, and Pillow's
  ``DecompressionBombError`` (raised at open for twice that) is reported the same way. The global
  warning filters are not touched: ``warnings.catch_warnings`` is not thread-safe, and decoding
  runs in worker threads.
- Only common web formats are opened (``ALLOWED_FORMATS``), which keeps Pillow's rarer and less
  hardened decoders (and EPS, which runs Ghostscript) out of reach of internet clients.
- Truncated or corrupt data is an error, never half an image (``ImageFile.LOAD_TRUNCATED_IMAGES``
  stays False).
- EXIF orientation is applied, then the image becomes RGB: transparency is composited on white
  (as a browser shows it on a white page); 16-bit grayscale is scaled to 8 bits rather than
  clipped (Pillow's ``convert("L")`` clips ``I;16`` at 255); CMYK, palette, 1-bit and grayscale
  go through Pillow's conversions. For animations the first frame is used.

Every failure is an ``ImageInputError`` (status 400) whose message says what was wrong; the caller
adds which input it was.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import struct
from dataclasses import dataclass
from typing import ClassVar, Literal

from PIL import Image, ImageOps, UnidentifiedImageError

#: Formats an internet client may send: what browsers and the OpenAI API accept, plus BMP.
#: (JPEGs from cameras that carry extra frames open through "JPEG" as Pillow's MPO images.)
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP")

DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000
MAX_URL_CHARS = 8192

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
#: Errors Pillow's decoders raise on bad data (``ImageFile.load`` and the plugins).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError)


class ImageInputError(Exception):
    """An image input that cannot be used; ``status`` is always 400 (the client's input)."""

    status: ClassVar[Literal[400]] = 400

    def __init__(self, message: str, *, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class UrlImage:
    """An ``http``/``https`` URL, to be fetched with ``security.fetch.ImageFetcher``."""

    url: str
    kind: Literal["url"] = "url"


@dataclass(frozen=True)
class InlineImage:
    """Image bytes sent in the request, from a ``data:`` URI or bare base64."""

    data: bytes
    #: The data URI's media type (``image/png``), or None when it named none or was bare base64.
    media_type: str | None
    kind: Literal["data_uri", "base64"]


ImageRef = UrlImage | InlineImage


def parse_image_reference(value: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> ImageRef:
    """Classify ``value`` and decode inline images (at most ``max_bytes`` once decoded).

    - ``http://…`` / ``https://…`` → ``UrlImage`` (not checked further here; the fetcher does).
    - ``data:[image/<type>][;param…];base64,<data>`` → ``InlineImage``; a media type, when given,
      must be ``image/*`` or ``application/octet-stream``; non-base64 data URIs are refused.
    - Anything else without a scheme is taken as bare base64.

    Base64 is decoded strictly (standard alphabet, padding required, no embedded whitespace), and
    its length is checked against ``max_bytes`` *before* decoding, so an oversized string costs no
    decode.
    """
    text = value.strip()
    if not text:
        raise ImageInputError("the image input is empty")
    match = _SCHEME_RE.match(text)
    if match is None:
        return InlineImage(data=_b64decode(text, max_bytes), media_type=None, kind="base64")
    scheme = match.group(1).lower()
    if scheme in ("http", "https"):
        if len(text) > MAX_URL_CHARS:
            raise ImageInputError(f"the image URL is longer than {MAX_URL_CHARS} characters")
        return UrlImage(url=text)
    if scheme == "data":
        return _parse_data_uri(text, max_bytes)
    raise ImageInputError(
        f"unsupported image reference scheme {scheme!r}: send an http(s) URL, a data URI or base64",
        code="invalid_image_url",
    )


def _parse_data_uri(text: str, max_bytes: int) -> InlineImage:
    header, sep, payload = text[len("data:") :].partition(",")
    if not sep:
        raise ImageInputError("the data URI has no ',' before its data")
    parts = [part.strip() for part in header.split(";")]
    media_type = parts[0].lower() or None
    params = [part.lower() for part in parts[1:]]
    if "base64" not in params:
        raise ImageInputError("image data URIs must be base64-encoded (';base64,')")
    if media_type is not None and not (
        media_type.startswith("image/") or media_type == "application/octet-stream"
    ):
        raise ImageInputError(f"the data URI's media type {media_type!r} is not an image type")
    return InlineImage(data=_b64decode(payload, max_bytes), media_type=media_type, kind="data_uri")


def _b64decode(text: str, max_bytes: int) -> bytes:
    # 4 characters carry 3 bytes; refusing on length first bounds the work for huge strings.
    max_chars = -(-max_bytes // 3) * 4
    if len(text) > max_chars:
        raise ImageInputError(
            f"the base64 image is {len(text)} characters, over the limit of {max_chars} "
            f"({max_bytes} bytes)",
            code="image_too_large",
        )
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageInputError(f"the image is not valid base64: {exc}") from None
    if not data:
        raise ImageInputError("the base64 image is empty")
    if len(data) > max_bytes:
        raise ImageInputError(
            f"the image is {len(data)} bytes, over the limit of {max_bytes}",
            code="image_too_large",
        )
    return data


def decode_image(data: bytes, *, max_pixels: int, max_side: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image, refusing it before decoding if it is too large."""
    if not data:
        raise ImageInputError("the image is empty (0 bytes)")
    limit = max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:
        limit = min(limit, Image.MAX_IMAGE_PIXELS)
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError:
        # Pillow refuses at open what declares over twice its own limit; ours is lower still.
        raise ImageInputError(
            f"the image declares more than {limit} pixels, the limit", code="image_too_large"
        ) from None
    except UnidentifiedImageError:
        raise ImageInputError(
            "the data is not an image in a supported format "
            f"({', '.join(f.lower() for f in ALLOWED_FORMATS)})"
        ) from None
    except _DECODE_ERRORS as exc:
        raise ImageInputError(f"the image is corrupt: {exc}") from None
    with image:
        width, height = image.size
        if width < 1 or height < 1:
            raise ImageInputError(f"the image has no pixels ({width}x{height})")
        if max_side is not None and max(width, height) > max_side:
            raise ImageInputError(
                f"the image is {width}x{height}; sides are limited to {max_side} pixels",
                code="image_too_large",
            )
        if width * height > limit:
            raise ImageInputError(
                f"the image is {width}x{height} = {width * height} pixels, over the limit "
                f"of {limit}",
                code="image_too_large",
            )
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
            return to_rgb(upright)
        except Image.DecompressionBombError:
            # A GIF/WebP whose frames grow past the header size.
            raise ImageInputError(
                f"the image has more than {limit} pixels", code="image_too_large"
            ) from None
        except _DECODE_ERRORS as exc:
            raise ImageInputError(f"the image is truncated or corrupt: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` in mode RGB: transparency composited on white, 16-bit scaled to 8-bit.

    An RGB image is returned as it is; every other mode gives a new image.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        # Full 16-bit range to 8 bits (65535 / 257 = 255); ``point`` on mode I is exact here.
        gray = image.convert("I").point(lambda value: value / 257).convert("L")
        return gray.convert("RGB")
    if mode == "F":
        # Float grayscale: taken as 0..1, the common convention of float image data.
        return image.point(lambda value: value * 255).convert("L").convert("RGB")
    has_transparency = mode in _ALPHA_MODES or "transparency" in image.info
    if has_transparency:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageInputError(f"the image's color mode {mode!r} is not supported") from exc
