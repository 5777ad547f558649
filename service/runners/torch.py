"""The eager PyTorch runner: an EViT-patched timm model on one device, any keep rate, exact, per sample."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import evit
from evit import Cost
from evit.precision import cast_model, precision_name
from service.runners.base import RunnerOutput, kept_indices, model_info


class TorchRunner:
    """Runs ``model.forward_with_info``; on CUDA stages inputs through a reused pinned buffer."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                 name: str = "") -> None:
        self.model = cast_model(model.to(device), dtype).eval()
        self.device = device
        self.dtype = dtype
        self._data_config = evit.data_config(model)
        self.info = model_info(model, name, "torch", precision_name(dtype), device,
                               tuple(self._data_config["input_size"]), None)
        self._pinned: torch.Tensor | None = None  # max-batch staging buffer in pinned memory (CUDA)

    @property
    def data_config(self) -> dict[str, Any]:
        return dict(self._data_config)

    def snap(self, rate: float) -> float:
        return rate  # any rate runs exactly

    def cost(self, rate: float) -> Cost:
        return self.model.cost(rate)

    def _stage(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """B, C, H, W on the model's device and dtype."""
        if self.device.type != "cuda":
            return torch.stack(list(images)).to(self.dtype)
        buf = self._pinned
        if buf is None or buf.shape[0] < len(images):
            buf = self._pinned = torch.empty((len(images), *images[0].shape), pin_memory=True)
        staged = torch.stack(list(images), out=buf[: len(images)])
        # Safe to reuse the buffer next pass: the outputs' .cpu() in forward waits for this copy to finish.
        return staged.to(self.device, non_blocking=True).to(self.dtype)

    def forward(self, images: Sequence[torch.Tensor], rates: Sequence[float], return_kept: bool = False
                ) -> RunnerOutput:
        with torch.inference_mode():
            out = self.model.forward_with_info(self._stage(images), keep_rate=list(rates), return_kept=return_kept)
            logits = out.logits.float().cpu()  # B, classes
            tokens = out.tokens.cpu().tolist()  # B
            stages = [s.cpu() for s in out.kept] if return_kept and out.kept else None  # stages of B, P
        kept = None if stages is None else kept_indices(stages, len(images))
        return RunnerOutput(logits, [int(t) for t in tokens], kept)

    def warm_up(self) -> None:
        """Nothing to compile: the worker's first timed passes do the allocations."""
