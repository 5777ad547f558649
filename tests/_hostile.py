"""A corpus of hostile and awkward images, built in code (nothing binary is committed).

Each :class:`Specimen` says what the service must answer: 200 for odd-but-valid images (16-bit, CMYK,
palette, alpha, animations, any EXIF orientation, 1x1, a polyglot that *is* a valid image), and one
precise 4xx error type for everything else. Bombs declare huge dimensions in a tiny file; the service
must refuse them from the header, before decoding (their few kB could never fill that many pixels anyway).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

JPEG = "image/jpeg"
PNG = "image/png"
OCTET = "application/octet-stream"


@dataclass(frozen=True)
class Specimen:
    name: str
    data: bytes
    content_type: str
    status: int  # what the service must answer
    error: str | None = None  # the ErrorResponse ``error`` type for non-200 answers


def noise(size: tuple[int, int] = (40, 30), seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def encode(img: Image.Image, fmt: str, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def jpegs(count: int, size: tuple[int, int] = (64, 48)) -> list[bytes]:
    """``count`` different noise JPEGs of ``size``."""
    return [encode(noise(size, seed=i), "JPEG") for i in range(count)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose header declares ``width x height`` (8-bit gray) with whatever IDAT we like."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024) if idat is None else idat
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_zero_rows_bomb(width: int, height: int) -> bytes:
    """A *complete* PNG of ``width x height`` black pixels: megapixels of zeros deflate to a few kB."""
    row = b"\0" * (width + 1)  # filter byte + pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    return png_declaring(width, height, idat)


def gif_declaring(width: int, height: int) -> bytes:
    """GIF89a whose logical screen and only frame are ``width x height`` (one LZW code of data)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"," + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b";"


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 dimensions rewritten to ``width x height``."""
    data = bytearray(encode(noise((16, 16)), "JPEG"))
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def tiff_declaring(width: int, height: int) -> bytes:
    data = bytearray(encode(Image.new("L", (8, 8)), "TIFF"))
    # little-endian TIFF: patch the ImageWidth (256) and ImageLength (257) entries of the first IFD
    (ifd,) = struct.unpack_from("<I", data, 4)
    (count,) = struct.unpack_from("<H", data, ifd)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        (tag,) = struct.unpack_from("<H", data, entry)
        if tag in (256, 257):
            value = width if tag == 256 else height
            struct.pack_into("<HHII", data, entry, tag, 4, 1, value)  # LONG
    return bytes(data)


def with_exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(noise((40, 30)), "JPEG", exif=exif.tobytes())


def jpeg_with_app1(payload: bytes) -> bytes:
    """A JPEG with an extra APP1 segment right after SOI (e.g. a malformed EXIF block)."""
    data = encode(noise(), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def animated(fmt: str, frames: int = 3) -> bytes:
    images = [noise(seed=i) for i in range(frames)]
    return encode(images[0], fmt, save_all=True, append_images=images[1:], duration=50, loop=0)


def zip_archive() -> bytes:
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.html", "<script>alert(document.domain)</script>")
    return buf.getvalue()


def corpus() -> list[Specimen]:
    jpeg = encode(noise((64, 48)), "JPEG", quality=90)
    png = encode(noise((64, 48)), "PNG")
    gray16 = Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
    rgba = noise().convert("RGBA")
    rgba.putalpha(128)
    palette_t = noise().convert("P")
    palette_t.info["transparency"] = 0
    bad_crc = bytearray(png)
    bad_crc[29] ^= 0xFF  # the IHDR CRC
    bad_idat = bytearray(png)
    idat = bad_idat.find(b"IDAT")
    bad_idat[idat + 4: idat + 40] = bytes(36)  # zeroed deflate stream
    no_sof = jpeg.replace(b"\xff\xc0", b"\xff\xfe", 1)  # SOF0 turned into a comment
    polyglot = jpeg + zip_archive()  # GIFAR-style: a JPEG with an archive appended
    html = b"<html><script>alert(1)</script></html>"
    html_jpeg = jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(html) + 2) + html + jpeg[2:]  # COM segment
    s = Specimen
    return [
        # bad bytes: 400
        s("zero_bytes", b"", JPEG, 400, "empty_body"),
        s("random_bytes", np.random.default_rng(7).bytes(4096), OCTET, 400, "undecodable_image"),
        s("text_as_image", b"hello, I am not an image", PNG, 400, "undecodable_image"),
        s("svg_as_png", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', PNG, 400,
          "undecodable_image"),
        s("jpeg_soi_only", b"\xff\xd8", JPEG, 400, "undecodable_image"),
        s("jpeg_header_only", jpeg[:200], JPEG, 400, "undecodable_image"),
        s("jpeg_truncated_half", jpeg[: len(jpeg) // 2], JPEG, 400, "undecodable_image"),
        s("jpeg_garbage_after_soi", b"\xff\xd8" + np.random.default_rng(3).bytes(2000), JPEG, 400,
          "undecodable_image"),
        s("jpeg_without_sof", no_sof, JPEG, 400, "undecodable_image"),
        s("png_signature_only", png[:8], PNG, 400, "undecodable_image"),
        s("png_truncated_half", png[: len(png) // 2], PNG, 400, "undecodable_image"),
        s("png_bad_crc", bytes(bad_crc), PNG, 400, "undecodable_image"),
        s("png_corrupt_deflate", bytes(bad_idat), PNG, 400, "undecodable_image"),
        s("png_zero_width", png_declaring(0, 10), PNG, 400, "undecodable_image"),
        s("gif_js_polyglot", b"GIF89a/*\x00\x00*/=alert(1)//;", "image/gif", 400, "undecodable_image"),
        # bombs: huge declared dimensions, tiny files -> 413 from the header
        s("bomb_png_header", png_declaring(100_000, 100_000), PNG, 413, "image_too_large"),
        s("bomb_png_complete_64mp", png_zero_rows_bomb(8_000, 8_000), PNG, 413, "image_too_large"),
        s("bomb_gif", gif_declaring(65_535, 65_535), "image/gif", 413, "image_too_large"),
        s("bomb_jpeg", jpeg_declaring(65_000, 65_000), JPEG, 413, "image_too_large"),
        s("bomb_tiff", tiff_declaring(1_000_000, 1_000_000), "image/tiff", 413, "image_too_large"),
        # resize bombs: thin strips whose resize (shorter side up to the model's) would be huge -> 422
        s("png_1x4096", encode(Image.new("L", (1, 4096), 128), "PNG"), PNG, 422, "extreme_aspect_ratio"),
        s("thin_png_1x1000000", png_declaring(1, 1_000_000), PNG, 422, "extreme_aspect_ratio"),
        s("thin_gif_65535x1", gif_declaring(65_535, 1), "image/gif", 422, "extreme_aspect_ratio"),
        # types the service does not take
        s("jpeg_as_text_plain", jpeg, "text/plain", 415, "unsupported_media_type"),
        s("jpeg_as_json", jpeg, "application/json", 415, "unsupported_media_type"),
        s("jpeg_as_svg", jpeg, "image/svg+xml", 415, "unsupported_media_type"),
        s("polyglot_as_html", polyglot, "text/html", 415, "unsupported_media_type"),
        s("bmp", encode(noise(), "BMP"), "image/bmp", 200),  # accepted by default (settings.image_formats)
        s("pcx", encode(noise(), "PCX"), OCTET, 415, "unsupported_image_format"),
        # odd but valid: answered like any image
        s("jpeg_1x1", encode(noise((1, 1)), "JPEG"), JPEG, 200),
        s("png_1x1_alpha", encode(Image.new("RGBA", (1, 1), (9, 9, 9, 0)), "PNG"), PNG, 200),
        s("png_2x80", encode(Image.new("L", (2, 80), 128), "PNG"), PNG, 200),  # 40:1, within the aspect limit
        s("png_16bit_gray", encode(gray16, "PNG"), PNG, 200),
        s("tiff_16bit_gray", encode(gray16, "TIFF"), "image/tiff", 200),
        s("tiff_float", encode(Image.fromarray(np.linspace(0, 1, 30 * 40, dtype=np.float32).reshape(30, 40)),
                               "TIFF"), "image/tiff", 200),
        s("jpeg_cmyk", encode(noise().convert("CMYK"), "JPEG"), JPEG, 200),
        s("tiff_cmyk", encode(noise().convert("CMYK"), "TIFF"), "image/tiff", 200),
        s("png_palette", encode(noise().convert("P"), "PNG"), PNG, 200),
        s("png_palette_transparency", encode(palette_t, "PNG"), PNG, 200),
        s("png_rgba", encode(rgba, "PNG"), PNG, 200),
        s("png_la", encode(rgba.convert("LA"), "PNG"), PNG, 200),
        s("png_bilevel", encode(noise().convert("1"), "PNG"), PNG, 200),
        s("gif_animated", animated("GIF"), "image/gif", 200),
        s("png_animated", animated("PNG"), PNG, 200),
        s("webp_animated", animated("WEBP"), "image/webp", 200),
        *[s(f"exif_orientation_{v}", with_exif_orientation(v), JPEG, 200) for v in (0, 1, 3, 5, 6, 8, 9, 255, 65535)],
        s("exif_garbage", jpeg_with_app1(b"Exif\0\0" + np.random.default_rng(5).bytes(300)), JPEG, 200),
        s("exif_truncated_ifd", jpeg_with_app1(b"Exif\0\0II*\0\x08\0\0\0\xff\xff"), JPEG, 200),
        s("png_as_jpeg", png, JPEG, 200),  # the declared subtype is not trusted: the bytes decide
        s("jpeg_as_octet_stream", jpeg, OCTET, 200),
        s("polyglot_jpeg_zip", polyglot, JPEG, 200),  # a valid JPEG; the trailing archive is never read
        s("jpeg_with_html_comment", html_jpeg, JPEG, 200),
    ]
