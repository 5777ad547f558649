"""Test instruments that act on the hosted model itself (forward hooks), not on the service's internals:
a gate that holds forward passes and records their batch sizes, a head rigged so that an image's predicted
class is its mean brightness (whatever the pass holds), and polling helpers."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from timm.data import resolve_model_data_config


def hosted_module(app: Any, name: str | None = None) -> torch.nn.Module:
    """The torch module the service runs for model ``name`` (the default one when None)."""
    return app.state.service.registry.get(name).model


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 5 ms; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def queued(client: Any, n: int, model: str = "tiny", timeout: float = 10.0) -> None:
    """Until ``/metrics`` says ``n`` requests wait in ``model``'s batching queue."""
    end = time.monotonic() + timeout
    while metric((await client.get("/metrics")).text, "evit_queue_depth", model=model) != n:
        if time.monotonic() > end:
            raise AssertionError(f"queue depth never reached {n}")
        await asyncio.sleep(0.005)


class Gate:
    """Blocks the model's forward passes (on the device thread) until opened; records each pass's batch size."""

    def __init__(self, app: Any, name: str | None = None) -> None:
        self.event = threading.Event()
        self.sizes: list[int] = []
        module = hosted_module(app, name)
        self.handle = module.patch_embed.register_forward_pre_hook(self._hook)  # runs once per forward pass

    @property
    def passes(self) -> int:
        return len(self.sizes)

    def _hook(self, _module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self.sizes.append(int(args[0].shape[0]))  # B, 3, H, W
        self.event.wait(10)

    def open(self) -> None:
        """Let every pass through from now on (still recording their sizes)."""
        self.event.set()


def rig_by_brightness(module: torch.nn.Module) -> Callable[[], None]:
    """Make ``module`` (10 classes) predict class ``round(9 * mean pixel value)`` of each image, whatever else
    is in its pass and whatever its keep rate: its ``forward_with_info`` runs as before, then each row's logits
    are replaced by a one-hot of that image's brightness (un-normalised input). Returns the undo function."""
    config = resolve_model_data_config(module)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    real = module.forward_with_info

    def rigged(x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = real(x, *args, **kwargs)
        brightness = (x.float().cpu() * std + mean).mean(dim=(1, 2, 3))  # B, in [0, 1]
        classes = (brightness * 9).round().long().clamp(0, 9)  # B
        logits = torch.full_like(out.logits, -10.0)  # B, classes
        logits[torch.arange(len(classes)), classes.to(logits.device)] = 10.0
        return dataclasses.replace(out, logits=logits)

    module.forward_with_info = rigged
    return lambda: delattr(module, "forward_with_info")


def flat_png(level: int, size: tuple[int, int] = (40, 36)) -> bytes:
    """A grey PNG of one brightness (0..255): the rigged model answers class ``round(9 * level / 255)``."""
    buf = io.BytesIO()
    Image.new("RGB", size, (level, level, level)).save(buf, "PNG")
    return buf.getvalue()


def level_for(cls: int) -> int:
    """The grey level the rigged model classifies as ``cls``."""
    return round(cls / 9 * 255)
