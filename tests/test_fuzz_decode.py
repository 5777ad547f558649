"""Property-based fuzzing of the image decoding path (``service.images.Preprocessor``).

Valid encodings in every accepted format are mutated (bit flips, overwritten ranges, truncation,
insertions, rewritten header dimensions) or replaced by random bytes. Whatever comes in, the decoder
returns a finite ``3, H, W`` tensor or raises ``ApiError`` with 400, 413, 415 or 422 (aspect ratio); never
another exception, never slower than the hypothesis deadline, and the process's peak memory stays bounded.
"""

from __future__ import annotations

import os
import resource
import struct
import time

import numpy as np
import pytest
import torch
from _hostile import encode, gif_declaring, noise, png_declaring
from _reliability import LEAK, record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from service.errors import ApiError
from service.images import ImageLimits, Preprocessor, check_formats

CONFIG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
          "crop_pct": 0.9, "crop_mode": "center"}
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
MAX_PIXELS = 4_000_000  # 16 MB of RGB at most per decode
EXAMPLES = int(os.environ.get("EVIT_FUZZ_EXAMPLES", "300"))
PEAK_GROWTH_LIMIT_MB = 300


def seeds() -> list[bytes]:
    base = noise((48, 40), seed=1)
    out = [encode(base, fmt) for fmt in FORMATS]
    out.append(encode(base, "JPEG", progressive=True, quality=80))
    out.append(encode(base.convert("P"), "PNG"))
    out.append(encode(base.convert("CMYK"), "TIFF", compression="tiff_lzw"))
    out.append(encode(base, "GIF", save_all=True, append_images=[noise((48, 40), seed=2)]))
    out.append(encode(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50), "PNG"))
    return out


SEEDS = seeds()
PRE = Preprocessor(CONFIG, ImageLimits(MAX_PIXELS, check_formats(FORMATS)))
STATS = {"examples": 0, "decoded": 0, "rejected": {}, "slowest_ms": 0.0}


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "dims"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=32))
            data[pos: pos + len(chunk)] = chunk
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "dims" and len(data) >= pos + 4:  # any 4 bytes read as big/little-endian sizes
            struct.pack_into(">HH", data, pos, draw(st.integers(0, 65535)), draw(st.integers(0, 65535)))
    return bytes(data)


headers = st.builds(png_declaring, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1),
                    st.binary(max_size=256)) | st.builds(gif_declaring, st.integers(0, 65535), st.integers(0, 65535))
inputs = mutated() | st.binary(max_size=4096) | headers


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


@settings(max_examples=EXAMPLES, deadline=2000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(inputs)
def fuzz_one(data: bytes) -> None:
    STATS["examples"] += 1
    start = time.perf_counter()
    try:
        x = PRE(data)
    except ApiError as e:
        assert e.status in (400, 413, 415, 422), (e.status, e.message)
        assert not LEAK.search(e.message), e.message
        STATS["rejected"][e.status] = STATS["rejected"].get(e.status, 0) + 1
    else:
        assert x.shape == (3, 32, 32) and bool(torch.isfinite(x).all())
        STATS["decoded"] += 1
    STATS["slowest_ms"] = max(STATS["slowest_ms"], (time.perf_counter() - start) * 1000)


@pytest.mark.timeout(120)
def test_decoder_never_fails_uncleanly() -> None:
    before = peak_rss_mb()
    fuzz_one()
    growth = peak_rss_mb() - before
    assert STATS["examples"] >= min(EXAMPLES, 100)
    assert growth < PEAK_GROWTH_LIMIT_MB
    record("decode_fuzz", {
        "what": f"hypothesis: {STATS['examples']} mutated/random/crafted images through the decoder",
        "sent": STATS["examples"], "answered": STATS["decoded"] + sum(STATS["rejected"].values()),
        "accepted": STATS["decoded"], "rejected": sum(STATS["rejected"].values()),
        "crashes": 0, "memory_growth_mb": round(growth, 1),  # any other exception failed the test before this
        "notes": f"rejections by status {dict(sorted(STATS['rejected'].items()))}; "
                 f"slowest decode {STATS['slowest_ms']:.0f} ms; peak RSS growth {growth:.0f} MB",
    })
