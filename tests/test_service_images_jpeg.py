"""JPEGs through torchvision (``jpeg_torchvision``): the PIL path's values, and only for the JPEGs it can take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_service_images import CONFIG, LIMITS, encode, gradient

from service.errors import ApiError
from service.images import ImageLimits, Preprocessor

PIL_ONLY = ImageLimits(LIMITS.max_pixels, LIMITS.formats, jpeg_torchvision=False)
VIT = {**CONFIG, "input_size": (3, 224, 224)}


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A gradient with texture: resizing it exercises every filter tap."""
    noise = np.random.default_rng(seed).normal(0, 25, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(gradient(size), np.float32) + noise, 0, 255).astype(np.uint8))


def counting(pre: Preprocessor) -> list[bytes]:
    calls: list[bytes] = []
    fast = pre.fast_jpeg
    assert fast is not None

    def spy(data: bytes) -> torch.Tensor:
        calls.append(data)
        return fast(data)

    pre.fast_jpeg = spy
    return calls


@pytest.mark.parametrize(("config", "size"), [(CONFIG, (40, 30)), (VIT, (333, 250)), (VIT, (250, 480))])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_torchvision_jpeg_equals_the_pil_path(config: dict, size: tuple[int, int], mode: str) -> None:
    data = encode(photo(size).convert(mode), "JPEG", quality=90)
    pre = Preprocessor(config, LIMITS)
    calls = counting(pre)
    ours, pils = pre(data), Preprocessor(config, PIL_ONLY)(data)
    assert calls == [data]
    assert ours.shape == pils.shape == (3, *config["input_size"][1:])
    level = 1 / (255 * config["std"][0])  # one intensity level, normalised
    assert float((ours - pils).abs().max()) <= 3 * level
    assert float((ours - pils).abs().mean()) < 0.05 * level


@pytest.mark.parametrize("case", ["draft_shrinks", "exif_rotated", "cmyk", "png"])
def test_other_images_take_the_pil_path(case: str) -> None:
    img = photo((40, 30))
    data = {
        "draft_shrinks": lambda: encode(photo((80, 72)), "JPEG"),  # shorter side >= 2 x the resize (35)
        "exif_rotated": lambda: encode(img, "JPEG", exif=_orientation(6)),
        "cmyk": lambda: encode(img.convert("CMYK"), "JPEG"),
        "png": lambda: encode(img, "PNG"),
    }[case]()
    pre = Preprocessor(CONFIG, LIMITS)
    calls = counting(pre)
    assert torch.equal(pre(data), Preprocessor(CONFIG, PIL_ONLY)(data))
    assert calls == []


def test_without_draft_every_rgb_jpeg_takes_torchvision() -> None:
    pre = Preprocessor(CONFIG, ImageLimits(LIMITS.max_pixels, LIMITS.formats, jpeg_draft=False))
    calls = counting(pre)
    pre(data := encode(photo((80, 72)), "JPEG"))
    assert calls == [data]


def test_truncated_jpeg_is_a_400() -> None:
    data = encode(photo((40, 30)), "JPEG")
    with pytest.raises(ApiError) as e:
        Preprocessor(CONFIG, LIMITS)(data[: len(data) // 2])
    assert e.value.status == 400


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif
