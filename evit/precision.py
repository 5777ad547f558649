"""Precision: ``auto | fp32 | bf16 | fp16`` -> a torch dtype for a device, and a model cast to it.

``auto`` is fp16 on CUDA, bf16 on a CPU with native bf16 arithmetic (AVX-512 BF16 or AMX), fp32 otherwise.
What must stay exact stays float32 whatever the model's dtype: the class attention's softmax
(``evit.reorganize.class_attention``), the fused token's weighted sum and the nearest-merge sums
(``evit.merge``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DTYPES", "PRECISIONS", "cast_model", "native_bf16", "precision_name", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX-512 BF16 or AMX tiles), as torch detects it."""
    cpu = torch.cpu
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


def resolve_precision(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype ``name`` (``PRECISIONS``) means on ``device``; ValueError for an unknown name or fp16 asked
    of a CPU (torch's CPU kernels have no fast fp16 path: use bf16)."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    if name == "fp16" and device.type == "cpu":
        raise ValueError("precision fp16 is for CUDA; on a CPU use bf16 (or auto)")
    return DTYPES[name]


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"`` (the inverse of ``DTYPES``)."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` with its parameters and buffers in ``dtype`` (in place); inputs must be cast to match."""
    return model.to(dtype)
