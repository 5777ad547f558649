"""Shared fixtures for the service tests: a tiny random-weight model spec, test images, an in-process app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from _hostile import encode, noise
from _isolated import pytest_configure, pytest_pyfunc_call  # noqa: F401 (hooks: @pytest.mark.isolated)

# the real assets (../shared/assets, see its README); tests that need them skip when they are absent
ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"
WEIGHTS = ASSETS / "weights" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
IMAGES = ASSETS / "imagenet-sample"

TINY_KWARGS = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2, num_classes=10)
TINY_MODEL = {"name": "tiny", "arch": "vit_tiny_patch16_224", "weights": "random", "model_kwargs": TINY_KWARGS}


@pytest.fixture(scope="session")
def real_data() -> tuple[Any, Any, Any]:
    """(real ViT-Ti EViT model, the 500 sample images preprocessed, their labels), built once per run."""
    import evit
    from evit.tools.backends import load_images

    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=WEIGHTS).eval()
    x, y = load_images(IMAGES, model)
    return model, x, y


def skip_or_fail(reason: str) -> None:
    """Skip a test whose external tool is missing; in CI (``CI=true``) fail instead: CI is never green by skipping."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason}; in CI a missing tool fails the run", pytrace=False)
    pytest.skip(reason)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """``make reliability-report``: publish the measured reliability figures, only when every test passed."""
    import _reliability

    if _reliability.enabled() and exitstatus == 0 and session.testsfailed == 0 and _reliability.ROWS:
        _reliability.publish(_reliability.ROWS)


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
