"""CUDA graphs for the torch backend (``--cuda-graphs``): a pass whose samples share one keep rate replays a
captured graph of ``evit.export.FixedRate`` (static token counts at a fixed rate), padded to a power-of-two
batch; mixed-rate passes, kept-patch requests and passes beyond ``max_graphs`` captures run eagerly."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from evit.export import FixedRate
from service.runners.base import RunnerOutput
from service.runners.torch import TorchRunner


class CudaGraphs:
    """Captured graphs keyed by (keep rate, padded batch); ``run`` returns None when it cannot replay."""

    def __init__(self, model: nn.Module, max_graphs: int = 32) -> None:
        self.model = model
        self.max_graphs = max_graphs
        self.graphs: dict[tuple[float, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.pool = None  # one memory pool shared by every graph

    def _capture(self, rate: float, x: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        fixed = FixedRate(self.model, rate)
        static_x = torch.zeros_like(x)  # B, C, H, W
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up passes off the default stream, as torch.cuda.graphs asks
                fixed(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fixed(static_x)  # B, classes
        self.pool = graph.pool()
        return graph, static_x, static_out

    def run(self, x: torch.Tensor, rate: float) -> torch.Tensor | None:
        """Logits for ``x`` (B, C, H, W on the GPU) at ``rate``, or None to run eagerly."""
        B = x.shape[0]
        size = 1 << (B - 1).bit_length()  # padded batch: 1, 2, 4, 8, ...
        key = (rate, size)
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs:
                return None
            pad = x.new_zeros(size, *x.shape[1:])
            entry = self.graphs[key] = self._capture(rate, pad)
        graph, static_x, static_out = entry
        static_x[:B].copy_(x)
        graph.replay()
        return static_out[:B].clone()


class CudaGraphRunner(TorchRunner):
    """The torch runner, replaying CUDA graphs for uniform-rate passes (exact: the same kernels, static shapes)."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype = torch.float16,
                 name: str = "", max_graphs: int = 32) -> None:
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device (--device cuda)")
        super().__init__(model, device, dtype, name)
        self.graphs = CudaGraphs(self.model, max_graphs)

    def forward(self, images: Sequence[torch.Tensor], rates: Sequence[float], return_kept: bool = False
                ) -> RunnerOutput:
        if not return_kept and len(set(rates)) == 1:
            with torch.inference_mode():
                logits = self.graphs.run(self._stage(images), rates[0])
            if logits is not None:
                tokens = self.cost(rates[0]).total_tokens
                return RunnerOutput(logits.float().cpu(), [tokens] * len(images))
        return super().forward(images, rates, return_kept)
