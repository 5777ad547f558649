"""Which runner hosts a model: ``--backend torch|onnxruntime|openvino`` at ``--precision``."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from evit.precision import precision_name, resolve_precision
from service.runners.base import Runner
from service.runners.torch import TorchRunner


def runner_precision(precision: str | None, device: torch.device, half: bool = True) -> str:
    """The precision a runner uses: ``precision`` ("auto" resolved by ``evit.precision``), or when None the
    service's default: fp16 on CUDA (unless ``half`` is off), fp32 on a CPU."""
    if precision is None:
        return "fp16" if device.type == "cuda" and half else "fp32"
    if precision == "auto" and device.type == "cuda" and not half:
        return "fp32"
    return precision_name(resolve_precision(precision, device))


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto``: OpenVINO on a CPU where it is installed (the fastest measured here, docs/backends.md), else
    eager torch (on CUDA: fp16 eager; onnxruntime with TensorRT is one flag away)."""
    if backend != "auto":
        return backend
    if device.type == "cpu" and importlib.util.find_spec("openvino") is not None:
        return "openvino"
    return "torch"


def build_runner(model: nn.Module, device: torch.device, backend: str, precision: str, name: str = "",
                 keep_rates: Sequence[float] | None = None, cache_dir: str | Path = "",
                 threads: int | None = None, cuda_graphs: bool = False) -> Runner:
    """A runner for ``model``; a compiled backend whose package is missing raises ``evit.backends.BackendMissing``."""
    backend = resolve_backend(backend, device)
    if backend == "torch" and cuda_graphs:
        from service.runners.cudagraph import CudaGraphRunner

        return CudaGraphRunner(model, device, resolve_precision(precision, device), name)
    if backend == "torch":
        return TorchRunner(model, device, resolve_precision(precision, device), name)
    if backend == "onnxruntime":
        from service.runners.onnxruntime import OnnxRuntimeRunner as cls
    elif backend == "openvino":
        from service.runners.openvino import OpenVinoRunner as cls
    else:
        raise ValueError(f"backend must be torch, onnxruntime or openvino, got {backend!r}")
    return cls(model, device, precision, cache_dir, keep_rates, name, threads)
