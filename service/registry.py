"""The hosted models: loaded once, each behind a runner (``service.runners``), with its preprocessing and labels."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import torch
from timm.data import ImageNetInfo, infer_imagenet_subset
from torch import nn

import evit
from evit.backends import BackendMissing
from service.exceptions import UnknownModel
from service.images import ImageLimits, Preprocessor, check_formats
from service.runners.base import Runner
from service.runners.select import build_runner, runner_precision
from service.settings import ASSET_CHECKPOINT, ModelSpec, Settings

log = logging.getLogger("service.registry")

REPORTED_RATES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)  # keep rates /models reports GMACs at
DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which setting fixes it."""


@dataclass
class HostedModel:
    spec: ModelSpec
    runner: Runner
    device: torch.device
    preprocess: Preprocessor
    labels: list[str]
    ready: bool = False
    _gmacs: dict[float, float] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model(self) -> nn.Module | None:
        """The torch module behind a torch runner (tests and tools read it; the service never does)."""
        return getattr(self.runner, "model", None)

    @property
    def num_classes(self) -> int:
        return self.runner.info.num_classes

    @property
    def default_keep_rate(self) -> float:
        return self.runner.info.default_keep_rate

    @property
    def grid(self) -> tuple[int, int]:
        return self.runner.info.grid

    def gmacs(self, keep_rate: float) -> float:
        """GMACs per image at ``keep_rate``, memoised (the batch-formation policy asks per batch)."""
        value = self._gmacs.get(keep_rate)
        if value is None:
            if len(self._gmacs) > 4096:
                self._gmacs.clear()
            value = self._gmacs[keep_rate] = self.runner.cost(keep_rate).gmacs
        return value

    def info(self) -> dict[str, Any]:
        info = self.runner.info
        costs = {r: self.runner.cost(r) for r in REPORTED_RATES}
        return {
            "name": self.name,
            "architecture": self.spec.arch,
            "input_size": info.input_size,
            "num_classes": info.num_classes,
            "num_patches": info.num_patches,
            "prune_blocks": info.prune_blocks,
            "fuse": info.fuse,
            "fusion": info.fusion,
            "default_keep_rate": info.default_keep_rate,
            "weights": self.spec.weights,
            "random_weights": self.spec.random_weights,
            "device": info.device,
            "dtype": DTYPE_NAMES[info.precision],
            "backend": info.backend,
            "precision": info.precision,
            "keep_rates": list(info.keep_rates) if info.keep_rates is not None else None,
            "ready": self.ready,
            "gmacs": {f"{r:.2f}": round(c.gmacs, 4) for r, c in costs.items()},
            "tokens": {f"{r:.2f}": c.total_tokens for r, c in costs.items()},
        }


class Registry:
    """Hosted models by name; the first one is the default for requests that name none."""

    def __init__(self, models: list[HostedModel]) -> None:
        if not models:
            raise ValueError("at least one model must be hosted")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    def get(self, name: str | None) -> HostedModel:
        model = self.models.get(name or self.default)
        if model is None:
            raise UnknownModel(f"unknown model {name!r}; hosted: {', '.join(self.models)}")
        return model

    def __iter__(self) -> Iterator[HostedModel]:
        return iter(self.models.values())

    @property
    def devices(self) -> set[torch.device]:
        return {m.device for m in self}


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {setting} was asked for but CUDA is not available (use --device cpu)")
    return device


def labels_for(model: nn.Module, spec: ModelSpec) -> list[str]:
    n = int(model.num_classes)
    if spec.labels is not None:
        if len(spec.labels) != n:
            raise ModelLoadError(f"model {spec.name}: {len(spec.labels)} labels given for {n} classes")
        return list(spec.labels)
    if n == 1000 and infer_imagenet_subset(model) == "imagenet-1k":
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(n)]
    return [f"class_{i}" for i in range(n)]


def hub_offline_if_unreachable(timeout_s: float = 3.0) -> None:
    """Without a route to the hub, use Hugging Face's local cache at once instead of a minute of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    resolved = threading.Event()

    def resolve() -> None:
        with contextlib.suppress(OSError):
            socket.getaddrinfo(host, 443)
            resolved.set()

    threading.Thread(target=resolve, daemon=True).start()
    if not resolved.wait(timeout_s):
        constants.HF_HUB_OFFLINE = True
        log.warning("%s cannot be resolved: loading hub weights from the local cache only", host)


def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    weights = spec.weights
    options = evit.ACCURATE if spec.options == "accurate" else {}
    kwargs = {"prune_blocks": spec.prune_blocks, "fuse": spec.fuse, "keep_rate": spec.keep_rate, **options,
              **spec.model_kwargs}
    try:
        if weights == "random":
            torch.manual_seed(seed)
            return evit.create_model(spec.arch, pretrained=False, **kwargs)
        if weights == "hub":
            hub_offline_if_unreachable()
            return evit.create_model(spec.arch, pretrained=True, **kwargs)
        return evit.create_model(spec.arch, checkpoint_path=weights, **kwargs)
    except evit.WeightsError as e:
        hint = (  # only a hub download can fail for want of network access
            f"\nWithout network access, serve a local checkpoint: --model ARCH --checkpoint PATH "
            f"(env EVIT_MODEL / EVIT_CHECKPOINT), e.g. --model vit_tiny_patch16_224 --checkpoint {ASSET_CHECKPOINT}; "
            f"or --random-weights (EVIT_RANDOM_WEIGHTS=1) for a smoke test with meaningless predictions."
        ) if weights == "hub" else ""
        raise ModelLoadError(f"model {spec.name!r} ({spec.arch}): {e}{hint}") from e
    except (ValueError, RuntimeError, TypeError) as e:  # unknown architecture, bad prune blocks, no cls token
        raise ModelLoadError(f"model {spec.name!r} ({spec.arch}): {e}") from e


def check_finite_weights(model: nn.Module, spec: ModelSpec) -> None:
    """Refuse weights holding NaN or inf (a broken checkpoint would otherwise serve NaN probabilities)."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ModelLoadError(f"model {spec.name!r} ({spec.arch}): weights {spec.weights} hold NaN or inf in "
                             f"{len(bad)} tensors ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")


def host(spec: ModelSpec, settings: Settings, device: torch.device) -> HostedModel:
    """Build one model and its runner on ``device`` (float16 on CUDA when ``settings.half``)."""
    model = build_model(spec, settings.seed)
    check_finite_weights(model, spec)
    try:
        precision = runner_precision(settings.precision, device, settings.half)
        runner = build_runner(model, device, settings.backend, precision, spec.arch, settings.keep_rates,
                              settings.graph_cache_dir, settings.torch_threads, settings.cuda_graphs)
    except (BackendMissing, ValueError) as e:
        raise ModelLoadError(f"model {spec.name!r}, backend {settings.backend}: {e}") from e
    limits = ImageLimits(settings.max_image_pixels, check_formats(settings.image_formats), settings.jpeg_draft,
                         settings.max_image_aspect_ratio, settings.max_decoded_bytes, settings.jpeg_torchvision)
    preprocess = Preprocessor(runner.data_config, limits)
    hosted = HostedModel(spec, runner, device, preprocess, labels_for(model, spec))
    if spec.random_weights:
        log.warning("model %s serves RANDOM weights: its predictions are meaningless", spec.name,
                    extra={"model": spec.name, "random_weights": True})
    log.info("hosting %s (%s, weights %s) on %s", spec.name, spec.arch, spec.weights, device,
             extra={"model": spec.name, "prune_blocks": list(runner.info.prune_blocks)})
    return hosted


def load_registry(settings: Settings) -> Registry:
    device = resolve_device(settings.device)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return Registry([host(spec, settings, device) for spec in settings.model_specs()])
