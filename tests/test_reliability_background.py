"""Broken weights and background tasks that die are never silent.

- A checkpoint holding NaN is refused at load: ``evit-serve`` exits 2 naming the tensors, and (not being
  a hub download) without the "without network access" hint; a missing checkpoint likewise.
- Finite weights whose outputs are not (overflow) fail warm-up: the server never becomes ready and exits 2
  with the reason on stderr.
- In process: a warm-up that raises, or a model's batch former that dies, is logged with its traceback,
  ``/readyz`` says 503 with the reason, requests get 503 at once (never 504 after the timeout).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from _live import ROOT, free_port
from _reliability import record
from conftest import TINY_KWARGS, TINY_MODEL

HINT = "Without network access"
RESULTS: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def report():
    """One report row once every check of the module has run (in whatever order)."""
    yield
    if len(RESULTS) == 5:
        record("background_failures", {
            "what": "NaN and missing checkpoints, finite weights with overflowing outputs (python -m service); a "
                    "warm-up that raises and a batch former that dies (in process, injected)",
            "sent": 5, "answered": len(RESULTS), "accepted": 0, "rejected": len(RESULTS), "crashes": 0,
            "memory_growth_mb": "-",
            "notes": "; ".join(RESULTS[k] for k in ("nan", "missing", "overflow", "warm_up", "former")),
        })


def checkpoint(path: Path, tensor: str, values: torch.Tensor | None) -> Path:
    """The tiny model's weights with ``tensor`` replaced by ``values`` (NaN-filled when None)."""
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224", **TINY_KWARGS).state_dict()
    state[tensor] = torch.full_like(state[tensor], float("nan")) if values is None else values
    torch.save(state, path)
    return path


def serve_cli(weights: Path, timeout: float = 120) -> tuple[int, str, float]:
    """``python -m service`` hosting the tiny model with ``weights``: exit code, stderr, seconds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVIT_")}
    env.update({"EVIT_MODELS": json.dumps([{**TINY_MODEL, "weights": str(weights)}]), "EVIT_DEVICE": "cpu",
                "EVIT_HOST": "127.0.0.1", "EVIT_PORT": str(free_port()), "EVIT_TORCH_THREADS": "1"})
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "service"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    return done.returncode, done.stderr, time.monotonic() - start


@pytest.mark.slow
def test_broken_checkpoints_exit_2_with_the_cause(tmp_path) -> None:
    nan = checkpoint(tmp_path / "nan.pth", "blocks.1.mlp.fc1.weight", None)
    code, err, _ = serve_cli(nan)
    assert code == 2 and "NaN or inf" in err and "blocks.1.mlp.fc1.weight" in err, err[-2000:]
    assert HINT not in err
    RESULTS["nan"] = f"NaN checkpoint: exit {code}"
    code, err, _ = serve_cli(tmp_path / "missing.pth")
    assert code == 2 and "checkpoint not found" in err and HINT not in err, err[-2000:]
    RESULTS["missing"] = f"missing checkpoint: exit {code}"


@pytest.mark.slow
def test_non_finite_outputs_fail_warm_up_and_exit_2(tmp_path) -> None:
    shape = (3 * TINY_KWARGS["embed_dim"], TINY_KWARGS["embed_dim"])
    huge = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e20  # finite; attention overflows
    code, err, seconds = serve_cli(checkpoint(tmp_path / "huge.pth", "blocks.0.attn.qkv.weight", huge))
    assert code == 2, err[-2000:]
    assert "warm-up failed" in err and "non-finite outputs" in err and HINT not in err, err[-2000:]
    RESULTS["overflow"] = f"finite weights, NaN outputs: never ready, exit {code} after {seconds:.1f} s"


@pytest.mark.anyio
async def test_failed_warm_up_is_logged_and_unready(serve, tiny_settings, image_bytes, monkeypatch, caplog) -> None:
    from service.batcher import Batcher

    async def broken(self) -> None:
        raise RuntimeError("warm-up exploded")

    monkeypatch.setattr(Batcher, "warm_up", broken)
    with caplog.at_level(logging.ERROR, logger="service.runtime"):
        async with serve(tiny_settings(), ready=False) as (app, client):
            from _gate import until

            await until(lambda: app.state.service.failure is not None)
            r = await client.get("/readyz")
            assert r.status_code == 503 and "warm-up exploded" in r.json()["error"]
            r = await client.post("/classify", content=image_bytes())
            assert r.status_code == 503 and r.json()["error"] == "failed" and "warm-up" in r.json()["message"]
            assert app.state.service.exit_code == 1
    (entry,) = [r for r in caplog.records if "warm-up failed" in r.getMessage()]
    assert entry.exc_info is not None  # the traceback is in the log
    RESULTS["warm_up"] = "warm-up raised: logged, /readyz 503 with the reason, requests 503"


@pytest.mark.anyio
async def test_dead_batch_former_fails_readiness_not_504(serve, tiny_settings, image_bytes, monkeypatch,
                                                         caplog) -> None:
    from service.batcher import Batcher

    async with serve(tiny_settings(request_timeout_s=20.0)) as (app, client):
        fatal: list[bool] = []
        app.state.service.on_fatal = lambda: fatal.append(True)

        def broken(self, q):
            raise RuntimeError("former exploded")

        monkeypatch.setattr(Batcher, "_take", broken)
        with caplog.at_level(logging.ERROR, logger="service.batcher"):
            start = time.monotonic()
            r = await client.post("/classify", content=image_bytes())
            seconds = time.monotonic() - start
        assert r.status_code == 503 and r.json()["error"] == "failed" and seconds < 5, (r.text, seconds)
        assert "former exploded" in r.json()["message"]
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "batch former of model tiny died" in ready.json()["error"]
        assert ready.json()["models"] == {"tiny": False} and fatal == [True]
        r = await client.post("/classify", content=image_bytes())
        assert r.status_code == 503 and r.json()["error"] == "failed"
    (entry,) = [r for r in caplog.records if "batch former" in r.getMessage()]
    assert entry.exc_info is not None
    RESULTS["former"] = f"batch former died: its request 503 in {seconds:.2f} s (timeout 20 s), /readyz 503"
