"""Shared fixtures for the service tests: a tiny random-weight model spec, test images, an in-process app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest
from _hostile import encode, noise

TINY_KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10)
TINY_MODEL = {"name": "tiny", "arch": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": TINY_KWARGS}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def tiny_model() -> dict[str, Any]:
    """The tiny model as an ``EVIT_MODELS`` entry."""
    return dict(TINY_MODEL)


@pytest.fixture
def tiny_settings() -> Callable[..., Any]:
    """``tiny_settings(**overrides)``: Settings hosting the tiny model (random weights, seed 0), on CPU."""
    from service.settings import Settings

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"models": [TINY_MODEL], "device": "cpu", "max_wait_ms": 2.0, **overrides}
        return Settings(**values)

    return make


@pytest.fixture
def image_bytes() -> Callable[..., bytes]:
    """``image_bytes(fmt="JPEG", size=(48, 40), mode="RGB", seed=0)``: a noise image, encoded."""

    def make(fmt: str = "JPEG", size: tuple[int, int] = (48, 40), mode: str = "RGB", seed: int = 0,
             **save: Any) -> bytes:
        img = noise(size, seed)
        return encode(img if mode == "RGB" else img.convert(mode), fmt, **save)

    return make


@pytest.fixture
def serve() -> Callable[..., AbstractAsyncContextManager[Any]]:
    """``async with serve(settings) as (app, client)``: the app with its lifespan, an httpx client, ready."""
    import httpx

    from service.app import create_app

    @asynccontextmanager
    async def run(settings: Any, ready: bool = True) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://svc", timeout=30) as client:
                for _ in range(500):
                    if not ready or (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
                yield app, client

    return run
