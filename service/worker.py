"""The tensor side of batching: one thread per device runs forward passes for every model placed on it.

It hands a pass's images and per-sample keep rates to the model's runner (``service.runners``) and returns
top-k probabilities, tokens and kept patches per sample. It knows tensors, never queues or HTTP.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from service.job import Job
from service.policy import PassCost
from service.registry import HostedModel


@dataclass(frozen=True)
class SampleResult:
    classes: list[int]  # top-k class indices, most probable first
    probabilities: list[float]
    tokens: int  # tokens the blocks processed for this sample, summed over blocks
    kept: list[list[int]] | None  # per pruning stage: original patch indices still their own token
    inference_s: float  # the whole pass
    batch_size: int  # samples in the pass


class DeviceWorker:
    """The single thread that runs every forward pass on one device, in submission order."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"evit-{device}")

    def forward(self, hosted: HostedModel, samples: Sequence[Job]) -> list[SampleResult]:
        """One forward pass over ``samples`` (their keep rates may differ). Runs on this worker's thread."""
        start = time.perf_counter()
        want_kept = any(s.want_kept for s in samples)
        k = min(max(s.top_k for s in samples), hosted.num_classes)
        out = hosted.runner.forward([s.tensor for s in samples], [s.rate for s in samples], want_kept)
        top = out.logits.softmax(dim=-1).topk(k, dim=-1)
        probs, classes = top.values, top.indices  # B, k
        seconds = time.perf_counter() - start
        n = len(samples)
        results = []
        for i, s in enumerate(samples):
            results.append(SampleResult(
                classes=classes[i, : s.top_k].tolist(), probabilities=probs[i, : s.top_k].tolist(),
                tokens=out.tokens[i], kept=out.kept[i] if out.kept and s.want_kept else None,
                inference_s=seconds, batch_size=n,
            ))
        return results

    def warm_up(self, hosted: HostedModel, batch: int, repeats: int = 3) -> PassCost | None:
        """Run the first passes (allocations, kernel selection) and fit the pass cost (see ``policy``)."""
        hosted.runner.warm_up()
        generator = torch.Generator().manual_seed(0)
        image = torch.randn(hosted.runner.info.input_size, generator=generator)

        def timed(n: int, rates: Sequence[float]) -> float:
            samples = [Job(rates[i % len(rates)], math.inf, tensor=image) for i in range(n)]
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                self.forward(hosted, samples)
                best = min(best, time.perf_counter() - t)
            return best

        t_single = timed(1, [1.0])
        if batch < 2:
            return None
        t_batch = timed(batch, [1.0])
        timed(batch, [hosted.default_keep_rate, 0.5, 1.0])  # the mixed-rate path
        return PassCost.calibrate(t_single, t_batch, batch, hosted.gmacs(1.0))

    def release_memory(self) -> None:
        """After an out-of-memory error: hand the allocator's cached blocks back before retrying."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
