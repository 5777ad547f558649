"""The OpenVINO runner: exported EViT graphs (one per keep-rate bucket) compiled by OpenVINO.

CPU: fp32 or bf16 (``INFERENCE_PRECISION_HINT``; bf16 only on a CPU with native bf16), compiled kernels
cached in the graph cache directory (OpenVINO's ``CACHE_DIR``) so a restart skips compilation too.
"""

from __future__ import annotations

from service.runners.compiled import CompiledRunner


class OpenVinoRunner(CompiledRunner):
    backend = "openvino"
