"""The ONNX Runtime runner: exported EViT graphs (one per keep-rate bucket) on ONNX Runtime.

CPU: fp32 (ONNX Runtime has no fast bf16 CPU path). CUDA: the TensorRT provider first where it is installed
(fp16 when asked, engines cached next to the graphs), then the CUDA provider, which runs the graph's own
dtype: at fp16 the graph is exported from the model in float16 on the GPU (see ``evit.backends``).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from evit.export import export_onnx
from service.runners.compiled import CompiledRunner


class OnnxRuntimeRunner(CompiledRunner):
    backend = "onnxruntime"

    def export(self, path: Path, rate: float) -> None:
        if self.device.type == "cuda" and self.precision == "fp16":
            half = copy.deepcopy(self.model).to(self.device, torch.float16)
            export_onnx(half, path, keep_rate=rate)
        else:
            super().export(path, rate)
