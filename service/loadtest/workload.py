"""What the load generator sends: the keep-rate mix, the images and the arrival times."""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from evit.config import check_keep_rate

# Keep-rate words passed to the server as they are, besides numbers in (0, 1].
SPECIAL_RATES = ("auto",)
# `default` sends no keep_rate at all: the server uses the model's default.
DEFAULT_RATE = "default"

IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".bmp": "image/bmp",
    ".gif": "image/gif",
}


def rate_key(rate: float) -> str:
    """The key a keep rate is reported under in the load report: ``0.7 -> "0.7"``, ``1 -> "1.0"`` (the service's
    metrics label rates with ``service.metrics.rate_label``, bucketed; ``bucket_rate`` maps one to the other)."""
    return repr(float(rate))


def bucket_rate(label: str, step: float = 0.05) -> float | None:
    """The keep rate the service's metrics label a request with (bucketed to ``step``); None for words."""
    try:
        rate = float(label)
    except ValueError:
        return None
    return round(max(1, round(rate / step)) * step, 6)


@dataclass(frozen=True)
class KeepRateMix:
    """Keep rates (labels: ``"0.7"``, ``"auto"``, ``"default"``) and their relative weights."""

    labels: tuple[str, ...]
    weights: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> KeepRateMix:
        """Parse ``"0.5:1,0.7:2,1.0:1"`` (rate:weight; the weight defaults to 1)."""
        labels: list[str] = []
        weights: list[float] = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                raise ValueError(f"empty item in keep-rate spec {spec!r}")
            rate_text, _, weight_text = part.partition(":")
            labels.append(_parse_rate(rate_text.strip()))
            try:
                weight = float(weight_text) if weight_text else 1.0
            except ValueError:
                raise ValueError(f"weight {weight_text!r} in {part!r} is not a number") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"weight in {part!r} must be a finite number > 0")
            weights.append(weight)
        if len(set(labels)) != len(labels):
            raise ValueError(f"keep rate listed twice in {spec!r}")
        return cls(tuple(labels), tuple(weights))

    def fractions(self) -> dict[str, float]:
        total = sum(self.weights)
        return {label: w / total for label, w in zip(self.labels, self.weights, strict=True)}

    def chooser(self, rng: random.Random) -> Iterator[str]:
        """An endless stream of labels drawn with the mix's weights."""
        cum = list(itertools.accumulate(self.weights))
        while True:
            yield rng.choices(self.labels, cum_weights=cum)[0]


def _parse_rate(text: str) -> str:
    if text in SPECIAL_RATES or text == DEFAULT_RATE:
        return text
    try:
        rate = float(text)
    except ValueError:
        raise ValueError(
            f"keep rate {text!r} is not a number in (0, 1] nor one of {(*SPECIAL_RATES, DEFAULT_RATE)}"
        ) from None
    return rate_key(check_keep_rate(rate, "keep rate"))


@dataclass(frozen=True)
class Image:
    name: str
    data: bytes
    content_type: str


def load_images(folder: Path, limit: int = 256) -> list[Image]:
    """Read up to ``limit`` image files (by extension, sorted by path) from ``folder`` and below."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_TYPES)
    if not paths:
        raise ValueError(f"no image files ({', '.join(sorted(IMAGE_TYPES))}) in {folder}")
    return [Image(p.name, p.read_bytes(), IMAGE_TYPES[p.suffix.lower()]) for p in paths[:limit]]


def generate_images(count: int = 8, size: int = 224, seed: int = 0) -> list[Image]:
    """``count`` JPEGs of ``size`` x ``size``: smooth colour gradients with noise, like a photo's bytes."""
    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    images = []
    for i in range(count):
        a, b, c = rng.uniform(0, 255, size=(3, 3))
        rgb = np.stack([a[k] * xx + b[k] * yy + c[k] * xx * yy for k in range(3)], axis=-1)  # H, W, 3
        rgb += rng.normal(0, 12, size=rgb.shape)
        pil = PILImage.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=90)
        images.append(Image(f"generated-{i}.jpg", buf.getvalue(), "image/jpeg"))
    return images


def arrival_offsets(rate: float, kind: str, rng: random.Random) -> Iterator[float]:
    """Send times in seconds from the start: ``poisson`` (exponential gaps) or ``constant`` (1/rate)."""
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"arrival rate must be > 0, got {rate}")
    if kind == "constant":
        return (i / rate for i in itertools.count())
    if kind == "poisson":
        return itertools.accumulate((rng.expovariate(rate) for _ in itertools.count()), initial=0.0)
    raise ValueError(f"unknown arrival process {kind!r} (poisson or constant)")
