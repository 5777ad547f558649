"""The runner contract: the only way the service core (registry, batcher, policy, worker) reaches a model.

A runner wraps one loaded model on one device behind a small interface, whatever executes it (eager
PyTorch here; compiled backends such as ONNX Runtime or OpenVINO plug in behind the same shape):

- ``info``: what the service reports and schedules with (prune blocks, patch grid, classes, input size,
  the keep rates it can run).
- ``data_config``: timm's preprocessing config; the service decodes images into ``C, H, W`` float32
  tensors with it.
- ``snap(rate)``: the keep rate that will actually run for a requested one (identity when any rate runs).
- ``cost(rate)``: tokens and GMACs per image at a keep rate (``evit.Cost``), for the pass policy.
- ``forward(images, rates, return_kept)``: one pass, called on the device's one thread.
- ``warm_up()``: one-time work before the first timed pass (allocations, compilation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from evit import Cost

Backend = Literal["torch", "onnxruntime", "openvino"]
Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class RunnerInfo:
    name: str  # the architecture (timm name)
    backend: Backend
    precision: Precision
    device: str  # "cpu", "cuda:0", ...
    prune_blocks: tuple[int, ...]  # 0-based blocks that prune
    grid: tuple[int, int]  # patches: rows, columns
    num_classes: int
    input_size: tuple[int, int, int]  # C, H, W
    default_keep_rate: float  # for requests that give none
    fuse: bool = True  # inattentive tokens fused (True) or dropped
    fusion: str = "one"  # "one", "nearest" or "drop"
    keep_rates: tuple[float, ...] | None = None  # None: any rate in (0, 1], exact, per sample; else the buckets

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class RunnerOutput:
    logits: torch.Tensor  # B, num_classes (float32, CPU)
    tokens: list[int]  # per sample: tokens the blocks processed, summed over blocks
    kept: list[list[list[int]]] | None = None  # per sample, per pruning stage: patch indices still their own token


@runtime_checkable
class Runner(Protocol):
    info: RunnerInfo

    @property
    def data_config(self) -> dict[str, Any]:
        """timm's preprocessing config (``input_size``, interpolation, crop, mean, std)."""
        ...

    def snap(self, rate: float) -> float:
        """The keep rate that runs when ``rate`` is asked for."""
        ...

    def cost(self, rate: float) -> Cost:
        """Tokens and GMACs per image at keep rate ``rate``."""
        ...

    def forward(self, images: Sequence[torch.Tensor], rates: Sequence[float], return_kept: bool = False
                ) -> RunnerOutput:
        """One pass over ``images`` (each C, H, W float32 on CPU) with one (snapped) keep rate per image."""
        ...

    def warm_up(self) -> None:
        """One-time work before the first timed pass."""
        ...


def snap_to(rates: Sequence[float] | None, rate: float) -> float:
    """``rate`` when any rate runs (``rates`` None), else the nearest bucket at or above it (else the highest)."""
    if rates is None:
        return rate
    above = [r for r in rates if r >= rate - 1e-9]
    return min(above) if above else max(rates)


def model_info(model: Any, name: str, backend: str, precision: str, device: torch.device,
               input_size: tuple[int, ...], keep_rates: tuple[float, ...] | None) -> RunnerInfo:
    """``RunnerInfo`` of an EViT-patched timm ``model`` (its options, patch grid and classes); the default
    keep rate snaps to ``keep_rates`` when the runner has buckets."""
    cfg = model.evit_cfg
    return RunnerInfo(
        name=name or type(model).__name__, backend=backend, precision=precision,  # type: ignore[arg-type]
        device=str(device), prune_blocks=tuple(cfg.prune_blocks), grid=tuple(model.patch_embed.grid_size),
        num_classes=int(model.num_classes), input_size=input_size,
        default_keep_rate=snap_to(keep_rates, float(cfg.keep_rate)), fuse=bool(cfg.fuse), fusion=cfg.fusion,
        keep_rates=keep_rates,
    )


def kept_indices(stages: Sequence[torch.Tensor], batch: int) -> list[list[list[int]]]:
    """Per sample, per pruning stage: the indices of the patches still their own token (stages: B, P masks)."""
    return [[s[i].nonzero().flatten().tolist() for s in stages] for i in range(batch)]
