"""Image inputs: telling URLs from inline images, and decoding real images built in memory."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import pytest
from PIL import Image

from emb_model_provider.inputs.images import (
    ImageInputError,
    InlineImage,
    UrlImage,
    decode_image,
    parse_image_reference,
    to_rgb,
)

MAX_PIXELS = 4_000_000
RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def near(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 8) -> bool:
    """JPEG is lossy: colours come back within a few levels."""
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def rgb_at(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    pixel = image.getpixel((x, y))
    assert isinstance(pixel, tuple)
    return pixel


def decode(data: bytes, **limits: int) -> Image.Image:
    image = decode_image(data, max_pixels=limits.pop("max_pixels", MAX_PIXELS), **limits)
    assert image.mode == "RGB"
    return image


def png_with_declared_size(width: int, height: int) -> bytes:
    """A tiny real PNG whose IHDR (with a valid CRC) claims ``width`` x ``height``.

    Its pixel data is for 8x8, so decoding it would fail as truncated: an error about the pixel
    limit shows that the size was refused from the header, before any pixel was decoded.
    """
    data = bytearray(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# --- decoding ---------------------------------------------------------------------------------


def test_png_rgb_round_trips_exactly() -> None:
    source = Image.new("RGB", (5, 3), RED)
    source.putpixel((4, 2), BLUE)
    image = decode(encode(source, "PNG"))
    assert image.size == (5, 3)
    assert image.tobytes() == source.tobytes()


def test_jpeg_exif_orientation_is_applied() -> None:
    # Stored 40 wide x 20 high, red on the left, blue on the right. Orientation 6 means "rotate
    # 90 degrees clockwise to display": the upright image is 20 x 40, red on top, blue below.
    source = Image.new("RGB", (40, 20), BLUE)
    source.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode(encode(source, "JPEG", quality=95, exif=exif.tobytes()))
    assert image.size == (20, 40)
    assert near(rgb_at(image, 10, 5), RED)
    assert near(rgb_at(image, 10, 35), BLUE)


def test_jpeg_without_orientation_is_unchanged() -> None:
    source = Image.new("RGB", (40, 20), BLUE)
    image = decode(encode(source, "JPEG", quality=95))
    assert image.size == (40, 20)
    assert near(rgb_at(image, 0, 0), BLUE)


def test_rgba_transparency_becomes_white() -> None:
    source = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    source.putpixel((1, 0), (255, 0, 0, 255))
    source.putpixel((2, 0), (0, 0, 0, 128))
    image = decode(encode(source, "PNG"))
    assert rgb_at(image, 0, 0) == WHITE
    assert rgb_at(image, 1, 0) == RED
    # Half-transparent black over white is mid grey.
    assert all(abs(channel - 127) <= 1 for channel in rgb_at(image, 2, 0))


def test_la_transparency_becomes_white() -> None:
    source = Image.new("LA", (2, 1), (0, 0))
    source.putpixel((1, 0), (50, 255))
    image = decode(encode(source, "PNG"))
    assert rgb_at(image, 0, 0) == WHITE
    assert rgb_at(image, 1, 0) == (50, 50, 50)


def test_palette_with_transparent_index_becomes_white() -> None:
    source = Image.new("P", (2, 1), 0)
    source.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 - 2) * 3)
    source.putpixel((1, 0), 1)
    data = encode(source, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    image = decode(data)
    assert rgb_at(image, 0, 0) == WHITE
    assert rgb_at(image, 1, 0) == RED


def test_palette_without_transparency_keeps_its_colours() -> None:
    source = Image.new("RGB", (2, 1), RED).convert("P")
    image = decode(encode(source, "GIF"))
    assert rgb_at(image, 1, 0) == RED


def test_grayscale_and_bilevel() -> None:
    assert rgb_at(decode(encode(Image.new("L", (2, 2), 100), "PNG")), 1, 1) == (100, 100, 100)
    assert rgb_at(decode(encode(Image.new("1", (2, 2), 1), "BMP")), 0, 0) == WHITE


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    source = Image.new("I;16", (3, 1), 0)
    source.putpixel((1, 0), 30000)
    source.putpixel((2, 0), 65535)
    data = encode(source, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = decode(data)
    assert rgb_at(image, 0, 0) == (0, 0, 0)
    # 30000 of 65535 is 45.8 % of full scale: about 116 of 255, not the 255 a clip would give.
    assert abs(rgb_at(image, 1, 0)[0] - 30000 * 255 / 65535) <= 1
    assert rgb_at(image, 2, 0) == WHITE


@pytest.mark.parametrize("mode", ["I", "I;16", "I;16B"])
def test_to_rgb_scales_every_sixteen_bit_mode(mode: str) -> None:
    source = Image.new("I", (1, 1), 65535).convert(mode)
    assert source.mode == mode
    assert rgb_at(to_rgb(source), 0, 0) == WHITE


def test_to_rgb_float_is_taken_as_unit_range() -> None:
    assert rgb_at(to_rgb(Image.new("F", (1, 1), 1.0)), 0, 0) == WHITE


def test_to_rgb_premultiplied_and_palette_alpha() -> None:
    pa = Image.new("PA", (1, 1), (0, 0))
    pa.putpalette([255, 0, 0] * 256)
    assert rgb_at(to_rgb(pa), 0, 0) == WHITE
    assert rgb_at(to_rgb(Image.new("RGBa", (1, 1), (0, 0, 0, 0))), 0, 0) == WHITE


def test_cmyk_jpeg_becomes_rgb() -> None:
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert near(rgb_at(decode(data), 4, 4), RED)


def test_webp_and_animated_gif_first_frame() -> None:
    assert near(rgb_at(decode(encode(Image.new("RGB", (4, 4), BLUE), "WEBP")), 0, 0), BLUE)
    frames = [Image.new("RGB", (4, 4), RED), Image.new("RGB", (4, 4), BLUE)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(gif)), "n_frames", 1) == 2
    assert rgb_at(decode(gif), 0, 0) == RED


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_is_refused(fmt: str) -> None:
    noisy = Image.frombytes("RGB", (64, 64), random.Random(1).randbytes(64 * 64 * 3))
    data = encode(noisy, fmt)
    with pytest.raises(ImageInputError, match="truncated or corrupt") as info:
        decode(data[: len(data) // 2])
    assert info.value.status == 400


def test_random_bytes_are_not_an_image() -> None:
    with pytest.raises(ImageInputError, match="not an image"):
        decode(random.Random(0).randbytes(1000))


def test_empty_bytes_are_refused() -> None:
    with pytest.raises(ImageInputError, match="empty"):
        decode(b"")


def test_format_outside_the_allowed_list_is_refused() -> None:
    tiff = encode(Image.new("RGB", (4, 4), RED), "TIFF")
    assert Image.open(io.BytesIO(tiff)).format == "TIFF"
    with pytest.raises(ImageInputError, match="not an image in a supported format"):
        decode(tiff)


def test_declared_size_over_the_pixel_limit_is_refused_before_decoding() -> None:
    with pytest.raises(ImageInputError, match=r"5000x5000 = 25000000 pixels") as info:
        decode(png_with_declared_size(5000, 5000), max_pixels=1_000_000)
    assert info.value.code == "image_too_large"
    # Far past every limit (Pillow itself refuses this one at open).
    with pytest.raises(ImageInputError, match="pixels") as info:
        decode(png_with_declared_size(100_000, 100_000))
    assert info.value.code == "image_too_large"


def test_declared_size_under_the_limit_but_truncated_pixels_is_corrupt() -> None:
    # The same forgery, small enough to pass the limit: now decoding runs and finds no pixels.
    with pytest.raises(ImageInputError, match="truncated or corrupt"):
        decode(png_with_declared_size(1000, 1000))


def test_solid_large_image_is_small_on_the_wire_but_refused() -> None:
    data = encode(Image.new("L", (3000, 3000), 0), "PNG")
    assert len(data) < 100_000
    with pytest.raises(ImageInputError, match="over the limit of 1000000"):
        decode(data, max_pixels=1_000_000)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_limit_applies_even_when_ours_is_higher() -> None:
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit is not None
    # Between Pillow's warning and error thresholds: Pillow only warns, we refuse.
    with pytest.raises(ImageInputError, match="pixels"):
        decode(png_with_declared_size(10_000, 10_000), max_pixels=10**12)
    assert pillow_limit < 10_000 * 10_000 < 2 * pillow_limit
    # Past twice Pillow's limit: Pillow raises DecompressionBombError at open.
    with pytest.raises(ImageInputError, match="pixels"):
        decode(png_with_declared_size(20_000, 20_000), max_pixels=10**12)


def test_max_side_is_enforced() -> None:
    data = encode(Image.new("RGB", (300, 2), RED), "PNG")
    assert decode(data, max_side=300).size == (300, 2)
    with pytest.raises(ImageInputError, match="limited to 299"):
        decode(data, max_side=299)


# --- references -------------------------------------------------------------------------------

PNG_BYTES = encode(Image.new("RGB", (2, 2), RED), "PNG")
PNG_B64 = base64.b64encode(PNG_BYTES).decode("ascii")


@pytest.mark.parametrize(
    "value",
    ["https://example.com/cat.png?x=1", "http://example.com/cat.png", "HTTPS://example.com/a"],
)
def test_urls_are_recognised(value: str) -> None:
    assert parse_image_reference(value) == UrlImage(url=value)


def test_data_uri_with_media_type() -> None:
    ref = parse_image_reference(f"data:image/png;base64,{PNG_B64}")
    assert ref == InlineImage(data=PNG_BYTES, media_type="image/png", kind="data_uri")
    assert isinstance(ref, InlineImage)
    assert decode(ref.data).size == (2, 2)


def test_data_uri_without_media_type_and_with_parameters() -> None:
    assert parse_image_reference(f"data:;base64,{PNG_B64}") == InlineImage(
        data=PNG_BYTES, media_type=None, kind="data_uri"
    )
    ref = parse_image_reference(f"DATA:Image/PNG;name=cat.png;BASE64,{PNG_B64}")
    assert ref == InlineImage(data=PNG_BYTES, media_type="image/png", kind="data_uri")


def test_bare_base64() -> None:
    assert parse_image_reference(PNG_B64) == InlineImage(
        data=PNG_BYTES, media_type=None, kind="base64"
    )
    assert parse_image_reference(f"  {PNG_B64}\n") == InlineImage(
        data=PNG_BYTES, media_type=None, kind="base64"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "empty"),
        ("   ", "empty"),
        (f"data:image/png;base64,{PNG_B64[:-2]}", "not valid base64"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        (f"data:image/png;base64,{PNG_B64[:20]}\n{PNG_B64[20:]}", "not valid base64"),
        ("data:image/png;base64,", "empty"),
        (f"data:image/png,{PNG_B64}", "must be base64"),
        (f"data:text/html;base64,{PNG_B64}", "not an image type"),
        (f"data:image/png;base64{PNG_B64}", "no ','"),
        (PNG_B64.replace("A", "-"), "not valid base64"),
        (PNG_B64[:-1], "not valid base64"),
        ("not base64 at all!", "not valid base64"),
        ("ftp://example.com/cat.png", "unsupported image reference scheme 'ftp'"),
        ("file:///etc/passwd", "unsupported image reference scheme 'file'"),
        ("gopher://example.com/", "unsupported image reference scheme 'gopher'"),
        ("https://example.com/" + "a" * 9000, "longer than 8192"),
    ],
)
def test_bad_references_are_refused(value: str, message: str) -> None:
    with pytest.raises(ImageInputError, match=message) as info:
        parse_image_reference(value)
    assert info.value.status == 400


def test_encoded_length_is_capped_before_decoding() -> None:
    # 4 bytes allow 8 characters; 12 characters are refused by length, whatever they hold.
    with pytest.raises(ImageInputError, match="12 characters, over the limit of 8") as info:
        parse_image_reference("@" * 12, max_bytes=4)
    assert info.value.code == "image_too_large"
    # 8 characters pass the length check but decode to 6 bytes, over 4.
    with pytest.raises(ImageInputError, match="6 bytes, over the limit of 4"):
        parse_image_reference(base64.b64encode(b"abcdef").decode(), max_bytes=4)
    assert parse_image_reference(base64.b64encode(b"abcd").decode(), max_bytes=4) == InlineImage(
        data=b"abcd", media_type=None, kind="base64"
    )
