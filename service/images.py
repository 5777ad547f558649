"""Validate and decode image bytes into a model input tensor, following the model's timm data config.

Checks run cheapest first: the format, the pixel count and the aspect ratio come from the header
(``Image.open`` is lazy), so a decompression bomb or a 1 x 10^6 strip is refused before a single pixel is
decoded. Then the memory the decode would take (the decoded pixels, their RGB copies and the image after
timm's resize, which for a thin image is far larger than the source) is estimated from the header and
checked against a budget, still before any large allocation. Then EXIF orientation is applied and
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
    max_aspect_ratio: float = 50.0  # longer side / shorter side
    max_decoded_bytes: int = 512 * 2**20  # estimated peak memory of one decode (see ``decode_bytes``)
    jpeg_torchvision: bool = True  # JPEGs that draft would not shrink: torchvision's decode and resize


class Preprocessor:
    """bytes -> ``3, H, W`` float tensor for one model (its timm eval transform)."""

    def __init__(self, data_config: dict[str, Any], limits: ImageLimits) -> None:
        self.limits = limits
        self.transform = eval_transform(data_config)
        h, w = data_config["input_size"][1:]
        crop_pct = data_config.get("crop_pct") or 1.0
        self.resize_to = int(max(h, w) / crop_pct)  # the shorter side after timm's resize
        self.fast_jpeg = jpeg_transform(data_config, self.resize_to) if limits.jpeg_torchvision else None

    def __call__(self, data: bytes) -> torch.Tensor:
        img = open_image(data, self.limits)
        if self.fast_jpeg is not None and self._plain_jpeg(img):
            check_decode_budget(img, self.resize_to, self.limits.max_decoded_bytes)
            try:
                return self.fast_jpeg(data)
            except RuntimeError:  # corrupt or truncated: PIL decides, with its error (no C++ paths in it)
                pass
        if img.format in ("JPEG", "MPO") and self.limits.jpeg_draft:
            img.draft(img.mode, (self.resize_to, self.resize_to))  # DCT-domain downscale, never below the resize
        check_decode_budget(img, self.resize_to, self.limits.max_decoded_bytes)
        try:
            img = to_rgb(ImageOps.exif_transpose(img))
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt pixel data
            raise ApiError(400, f"the image could not be decoded: {e}", "undecodable_image") from e
        return self.transform(img)

    def _plain_jpeg(self, img: Image.Image) -> bool:
        """A baseline JPEG in RGB or grayscale that draft mode would not shrink (shorter side under twice the
        resize) and with no EXIF rotation: torchvision's path gives timm's transform's values to ~1e-5."""
        shrinks = self.limits.jpeg_draft and min(img.size) >= 2 * self.resize_to
        return (img.format == "JPEG" and img.mode in ("RGB", "L") and not shrinks
                and img.getexif().get(_ORIENTATION, 1) == 1)


_ORIENTATION = 0x0112


def jpeg_transform(data_config: dict[str, Any], resize_to: int) -> Callable[[bytes], torch.Tensor] | None:
    """JPEG bytes -> 3, H, W with timm's eval transform (shorter side resized to ``resize_to``, centre crop,
    normalise), by libjpeg-turbo through ``torchvision.io.decode_jpeg`` and torch's uint8 antialiased resize: the
    same values as the PIL path to ~1e-5 at ~2/3 of its CPU time (the resize is ~4x cheaper). None for a config
    that is not that transform."""
    if data_config.get("crop_mode", "center") != "center" or data_config["interpolation"] not in ("bicubic",
                                                                                                "bilinear"):
        return None
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # torchvision deprecated its image codecs in 0.29 (for torchcodec): PIL then
        return None
    from torchvision.transforms.v2 import functional as F

    h, w = data_config["input_size"][1:]
    interpolation = F.InterpolationMode(data_config["interpolation"])
    scale = 1.0 / (255.0 * torch.tensor(data_config["std"]).view(3, 1, 1))
    offset = torch.tensor(data_config["mean"]).view(3, 1, 1) / torch.tensor(data_config["std"]).view(3, 1, 1)

    def transform(data: bytes) -> torch.Tensor:
        img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        img = F.center_crop(F.resize(img, [resize_to], interpolation=interpolation, antialias=True), [h, w])
        return img.float() * scale - offset

    return transform


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
            413, f"image of {width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels} "
            "(max_image_pixels)",
            "image_too_large",
        )
    if width < 1 or height < 1:
        raise ApiError(400, f"image has no pixels ({width}x{height})", "undecodable_image")
    if max(width, height) > limits.max_aspect_ratio * min(width, height):
        raise ApiError(
            422, f"image of {width}x{height} has an aspect ratio over the limit of {limits.max_aspect_ratio:g}:1 "
            "(max_image_aspect_ratio); crop or pad it first", "extreme_aspect_ratio",
        )
    return img


# bytes per pixel Pillow stores for a mode (three-band modes are padded to four), and what ``to_rgb`` adds:
# an RGB copy, the RGBA copy and white background for alpha, numpy's float64 scaling for 16/32-bit modes
_STORED = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La", "P")


def decode_bytes(size: tuple[int, int], mode: str, resize_to: int) -> int:
    """Estimated peak bytes of decoding a ``size`` image of ``mode`` and resizing its shorter side to
    ``resize_to``: source pixels, RGB conversion, an EXIF-rotated copy and the resized image (4 bytes a pixel,
    plus one for Pillow's resampling buffers: measured within a few % for thin images, over for large ones)."""
    width, height = size
    stored = _STORED.get(mode, 4)
    per_pixel = stored + 4 + 4  # the source, an RGB copy, a rotated copy
    if mode in _ALPHA:
        per_pixel += 8
    elif mode.startswith("I") or mode == "F":
        per_pixel += 8 + 1
    short, long = sorted(size)
    resized = resize_to * -(-resize_to * long // short) * 5  # the longer side grows with the shorter
    return width * height * per_pixel + resized


def check_decode_budget(img: Image.Image, resize_to: int, budget: int) -> None:
    """413 when decoding ``img`` (after any JPEG draft) would take more than ``budget`` bytes."""
    need = decode_bytes(img.size, img.mode, resize_to)
    if need > budget:
        w, h = img.size
        raise ApiError(
            413, f"decoding this {w}x{h} {img.mode} image and resizing it to a shorter side of {resize_to} would "
            f"take about {need / 2**20:.0f} MiB, over the limit of {budget / 2**20:.0f} MiB (max_decoded_bytes)",
            "image_too_large",
        )


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
