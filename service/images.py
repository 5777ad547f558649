"""Validate and decode image bytes into a model input tensor, following the model's timm data config.

Checks run cheapest first: the format and the pixel count come from the header (``Image.open`` is lazy),
so a decompression bomb is refused before a single pixel is decoded. Then EXIF orientation is applied and
every mode (grayscale, palette, CMYK, alpha, 16-bit) becomes 8-bit RGB before timm's eval transform.
Runs in a thread pool: PIL and torch release the GIL while they work.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform
from torchvision.transforms import Compose, Normalize

from service.errors import ApiError

_WHITE = (255, 255, 255)


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int
    formats: frozenset[str]
    jpeg_draft: bool = True


class Preprocessor:
    """bytes -> ``3, H, W`` float tensor for one model (its timm eval transform)."""

    def __init__(self, data_config: dict[str, Any], limits: ImageLimits) -> None:
        self.limits = limits
        self.transform = eval_transform(data_config)
        h, w = data_config["input_size"][1:]
        crop_pct = data_config.get("crop_pct") or 1.0
        self.resize_to = int(max(h, w) / crop_pct)  # the shorter side after timm's resize

    def __call__(self, data: bytes) -> torch.Tensor:
        img = open_image(data, self.limits)
        if img.format in ("JPEG", "MPO") and self.limits.jpeg_draft:
            img.draft(img.mode, (self.resize_to, self.resize_to))  # DCT-domain downscale, never below the resize
        try:
            img = to_rgb(ImageOps.exif_transpose(img))
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt pixel data
            raise ApiError(400, f"the image could not be decoded: {e}", "undecodable_image") from e
        return self.transform(img)


def eval_transform(data_config: dict[str, Any]) -> Callable[[Image.Image], torch.Tensor]:
    """timm's eval transform, its ToTensor + Normalize tail fused into one pass over the pixels.

    Same values as timm's to float rounding. In numpy, not torch: torch's small ops start an OpenMP team in
    every decode thread, whose spinning cost 4-10x the CPU time of the whole preprocessing (measured on this
    2-core machine) and competes with inference. Falls back to timm's own transform when it does not end that way.
    """
    full = create_transform(**data_config, is_training=False)
    steps = list(getattr(full, "transforms", []))
    fusable = len(steps) >= 2 and type(steps[-2]).__name__ in ("MaybeToTensor", "ToTensor")
    if not (fusable and isinstance(steps[-1], Normalize)):
        return full
    resize = Compose(steps[:-2])  # PIL resize and crop
    mean = np.asarray(steps[-1].mean, dtype=np.float32)
    std = np.asarray(steps[-1].std, dtype=np.float32)
    scale, offset = 1.0 / (255.0 * std), mean / std  # float32, per channel

    def transform(img: Image.Image) -> torch.Tensor:
        x = np.asarray(resize(img), dtype=np.float32) * scale - offset  # H, W, 3
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # 3, H, W

    return transform


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open lazily and check the header: known format (415), pixel count (413); nothing decoded yet."""
    if not data:
        raise ApiError(400, "the request body is empty; send the image bytes", "empty_body")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ApiError(413, f"image too large: {e}", "image_too_large") from e
    except UnidentifiedImageError as e:
        raise ApiError(400, "the body is not a decodable image", "undecodable_image") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a known format with a broken header
        raise ApiError(400, f"the image header could not be read: {e}", "undecodable_image") from e
    if img.format not in limits.formats:
        raise ApiError(
            415, f"image format {img.format} is not accepted; send one of {', '.join(sorted(limits.formats))}",
            "unsupported_image_format",
        )
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ApiError(
            413, f"image of {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}",
            "image_too_large",
        )
    if width < 1 or height < 1:
        raise ApiError(400, f"image has no pixels ({width}x{height})", "undecodable_image")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited on white, 16-bit and float scaled (not clipped), CMYK/palette converted."""
    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)  # animations: the first frame
    mode = img.mode
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grayscale
        return Image.fromarray(_scale_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if mode == "RGB" else img.convert("RGB")


def _scale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Full-range scaling: 16-bit modes by 65535; 32-bit int and float by the range their values use."""
    peak = float(arr.max()) if arr.size else 0.0
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F" and peak <= 1.0:
        top = 1.0
    else:
        top = 65535.0 if peak > 255 else 255.0
    return np.clip(np.rint(arr.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)


def check_formats(formats: Sequence[str]) -> frozenset[str]:
    """The accepted formats that this Pillow build can open (AVIF needs a recent Pillow)."""
    Image.init()
    return frozenset(f.upper() for f in formats if f.upper() in Image.OPEN)
