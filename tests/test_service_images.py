"""Image validation and decoding: header checks before decoding, EXIF, every mode to RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from service.errors import ApiError
from service.images import ImageLimits, Preprocessor, check_formats, open_image, to_rgb

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "crop_pct": 0.9, "crop_mode": "center"}
LIMITS = ImageLimits(max_pixels=4_000_000, formats=check_formats(["JPEG", "PNG", "WEBP", "TIFF", "GIF"]))


def encode(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def gradient(size=(40, 30)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    rgb = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.broadcast_to((x + y) / 2, (h, w, 1))], axis=2)
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


def test_output_follows_the_data_config() -> None:
    pre = Preprocessor(CONFIG, LIMITS)
    x = pre(encode(gradient((64, 48))))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # mean = std = 0.5: pixels land in [-1, 1]


def test_fused_transform_equals_timms() -> None:
    from timm.data import create_transform

    from service.images import eval_transform

    for config in (CONFIG, {**CONFIG, "input_size": (3, 224, 224), "mean": (0.485, 0.456, 0.406),
                            "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}):
        img = gradient((301, 207))
        ours, timms = eval_transform(config)(img), create_transform(**config, is_training=False)(img)
        assert ours.shape == timms.shape and ours.is_contiguous()
        assert torch.allclose(ours, timms, atol=1e-5)


def test_exif_orientation_is_applied() -> None:
    pre = Preprocessor(CONFIG, LIMITS)
    upright = gradient((40, 30))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # pixels stored turned 90 degrees counter-clockwise
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    rotated = pre(encode(stored, "PNG", exif=exif))
    assert torch.allclose(rotated, pre(encode(upright)), atol=1e-5)
    assert not torch.allclose(pre(encode(stored)), pre(encode(upright)), atol=1e-2)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "1"])
def test_modes_become_rgb(mode: str) -> None:
    img = gradient().convert(mode)
    out = to_rgb(Image.open(io.BytesIO(encode(img, "TIFF" if mode == "CMYK" else "PNG"))))
    assert out.mode == "RGB" and out.size == img.size
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 40))  # opaque blue left half
    if mode == "LA":
        rgba = rgba.convert("LA")
    elif mode == "P":
        rgba = rgba.convert("RGB").quantize(2)
        rgba.info["transparency"] = rgba.getpixel((30, 0))  # the right half's index is transparent
    data = encode(rgba)
    assert Image.open(io.BytesIO(data)).mode == mode
    blue = (0, 0, 255) if mode != "LA" else (29, 29, 29)  # blue's luma (ITU-R 601) in LA
    expected = Image.new("RGB", (40, 40), (255, 255, 255))  # the same picture, composited on white by hand
    expected.paste(blue, (0, 0, 20, 40))
    assert np.array_equal(np.asarray(to_rgb(Image.open(io.BytesIO(data)))), np.asarray(expected))
    pre = Preprocessor(CONFIG, LIMITS)  # what the service feeds the model: the composited picture's tensor
    assert torch.allclose(pre(data), pre(encode(expected)), atol=1e-6)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    levels = np.arange(0, 256, dtype=np.uint16).reshape(16, 16)
    deep = Image.fromarray(levels * 257)  # 16-bit: 0..65535
    decoded = Image.open(io.BytesIO(encode(deep)))
    assert decoded.mode.startswith("I")
    out = np.asarray(to_rgb(decoded))
    assert np.array_equal(out[..., 0], levels.astype(np.uint8)) and np.array_equal(out[..., 1], out[..., 2])


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    big = Image.new("L", (2100, 2000))  # 4.2 MP, a few kB of PNG
    data = encode(big)
    img = open_image(data, ImageLimits(max_pixels=5_000_000, formats=LIMITS.formats))
    assert img.size == (2100, 2000) and img._im is None  # header read, no pixel decoded yet
    with pytest.raises(ApiError) as e:
        open_image(data, LIMITS)
    assert e.value.status == 413 and "4200000" in e.value.message


def test_truncated_unknown_and_unsupported() -> None:
    pre = Preprocessor(CONFIG, LIMITS)
    jpeg = encode(gradient((64, 64)), "JPEG", quality=95)
    for data, status in ((jpeg[: len(jpeg) * 2 // 3], 400), (b"GIF89a-but-not-really", 400), (b"", 400),
                         (encode(gradient(), "BMP"), 415)):
        with pytest.raises(ApiError) as e:
            pre(data)
        assert e.value.status == status


def test_large_jpeg_drafted_close_to_full_decode() -> None:
    img = gradient((1200, 900))
    data = encode(img, "JPEG", quality=95)
    fast = Preprocessor(CONFIG, LIMITS)(data)
    exact = Preprocessor(CONFIG, ImageLimits(LIMITS.max_pixels, LIMITS.formats, jpeg_draft=False))(data)
    assert (fast - exact).abs().mean() < 0.02  # DCT-domain downscaling changes pixels a little, not content


def limits(**overrides) -> ImageLimits:
    return ImageLimits(**{"max_pixels": LIMITS.max_pixels, "formats": LIMITS.formats, **overrides})


@pytest.mark.parametrize("size", [(1, 41), (41, 1), (3, 200), (1, 1_000_000), (1_000_000, 1)])
def test_aspect_ratio_limit_from_the_header(size) -> None:
    from _hostile import png_declaring

    data = png_declaring(*size)  # header only: nothing could be decoded anyway
    with pytest.raises(ApiError) as e:
        open_image(data, limits(max_aspect_ratio=40))
    assert e.value.status == 422 and e.value.error == "extreme_aspect_ratio"
    assert f"{size[0]}x{size[1]}" in e.value.message and "max_image_aspect_ratio" in e.value.message
    if max(size) <= 200:  # within a looser limit the same strip decodes (the resize stays small)
        assert Preprocessor(CONFIG, limits(max_aspect_ratio=200))(encode(gradient(size))).shape == (3, 32, 32)


def test_decode_budget_counts_the_resize() -> None:
    from service.images import decode_bytes

    square, strip = decode_bytes((100, 100), "RGB", 248), decode_bytes((1, 10_000), "L", 248)
    assert square == 100 * 100 * 12 + 248 * 248 * 5
    assert strip > 248 * 248 * 10_000 * 4  # the source is 10 kB; its resize (248 x 2.48 M) is what costs
    assert decode_bytes((100, 100), "RGBA", 248) > square and decode_bytes((100, 100), "I;16", 248) > square
    pre = Preprocessor(CONFIG, limits(max_aspect_ratio=1e6, max_decoded_bytes=2**20))  # 1 MiB
    with pytest.raises(ApiError) as e:
        pre(encode(Image.new("L", (1, 2000), 9)))  # resized to 35 x 70000: 11.7 MiB
    assert e.value.status == 413 and e.value.error == "image_too_large" and "max_decoded_bytes" in e.value.message
    assert pre(encode(gradient((300, 200)))).shape == (3, 32, 32)  # 0.7 MiB: within the budget


def test_decode_budget_applies_after_the_jpeg_draft() -> None:
    data = encode(gradient((1600, 1200)), "JPEG", quality=90)  # 23 MiB at full size, 1.5 MiB drafted to 1/8
    budget = limits(max_decoded_bytes=4 * 2**20)
    assert Preprocessor(CONFIG, budget)(data).shape == (3, 32, 32)
    with pytest.raises(ApiError) as e:
        Preprocessor(CONFIG, ImageLimits(**{**vars(budget), "jpeg_draft": False}))(data)
    assert e.value.status == 413 and "1600x1200" in e.value.message
