"""The process environment of a training run: torchrun's ranks and device, or one process; mixed precision."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Dist:
    """torchrun's environment, or a single process without it."""

    def __init__(self, device: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device != "cpu"
        self.device = torch.device(device or (f"cuda:{local}" if cuda else "cpu"))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
            t /= self.world
        return t.tolist()

    def close(self) -> None:
        if self.world > 1:
            dist.destroy_process_group()


def amp_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    if choice == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]
