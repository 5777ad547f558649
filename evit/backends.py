"""Compiled backends for exported graphs (``evit.export``): ONNX Runtime and OpenVINO, each a callable
``run(x: B, 3, H, W float32 numpy) -> B, classes float32 numpy`` at a chosen precision.

Neither package is needed to import ``evit``; a missing one raises ``BackendMissing`` naming the extra to
install. Precisions: OpenVINO runs fp32 or bf16 on a CPU (its ``INFERENCE_PRECISION_HINT``; bf16 only where
the CPU has it); ONNX Runtime runs the graph's own dtype: fp32 on a CPU, fp32 or
fp16 (a graph exported in fp16) on CUDA, with the TensorRT provider first where it is installed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = ["BACKENDS", "BackendMissing", "GraphFn", "backend_version", "load_graph"]

BACKENDS = ("torch", "onnxruntime", "openvino")
GraphFn = Callable[[np.ndarray], np.ndarray]
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class BackendMissing(RuntimeError):
    """A backend's package is not installed; the message names the extra that installs it."""


def import_backend(backend: str) -> ModuleType:
    """The backend's Python package, or ``BackendMissing`` naming ``pip install evit-serve[BACKEND]``."""
    if backend not in BACKENDS[1:]:
        raise ValueError(f"compiled backend must be one of {BACKENDS[1:]}, got {backend!r}")
    try:
        return importlib.import_module(backend)
    except ImportError as e:
        raise BackendMissing(
            f"backend {backend!r} needs the {backend} package, which is not installed ({e}); "
            f"install it with: pip install 'evit-serve[{backend}]'"
        ) from e


def backend_version(backend: str) -> str:
    """``"torch-2.x"``, ``"onnxruntime-1.x"``, ``"openvino-2026.x"`` (part of a compiled graph's cache key)."""
    if backend == "torch":
        import torch

        return f"torch-{torch.__version__}"
    module = import_backend(backend)
    version = module.get_version() if backend == "openvino" else module.__version__
    return f"{backend}-{version}"


def _onnxruntime(path: Path, precision: str, device: str, threads: int | None, cache_dir: Path | None) -> GraphFn:
    ort = import_backend("onnxruntime")
    if device == "cpu" and precision != "fp32":
        raise ValueError(f"onnxruntime runs fp32 on a CPU, not {precision}; for bf16 use --backend openvino")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        trt = {"device_id": index, "trt_fp16_enable": precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache_dir or path.parent)}
        wanted = [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", {"device_id": index})]
        available = set(ort.get_available_providers())
        providers = [p for p in wanted if p[0] in available] + providers
        if len(providers) == 1:
            raise BackendMissing("onnxruntime has no CUDA provider here: pip install onnxruntime-gpu")
    session = ort.InferenceSession(str(path), opts, providers=providers)
    (inp,) = session.get_inputs()
    dtype = np.float16 if "float16" in inp.type else np.float32

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {inp.name: x.astype(dtype, copy=False)})[0].astype(np.float32, copy=False)

    return run


def _openvino(path: Path, precision: str, device: str, threads: int | None, cache_dir: Path | None) -> GraphFn:
    ov = import_backend("openvino")
    if device != "cpu":
        raise ValueError(f"the openvino backend runs on a CPU, not {device}: on CUDA use onnxruntime or torch")
    core = ov.Core()
    if precision == "fp16":
        raise ValueError("openvino on a CPU runs fp32 or bf16, not fp16")
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        raise ValueError("this CPU has no native bf16: openvino would emulate it; use --precision fp32")
    config = {"INFERENCE_PRECISION_HINT": _OV_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)  # compiled kernels: a restart skips compilation
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()

    def run(x: np.ndarray) -> np.ndarray:
        return np.array(request.infer([np.ascontiguousarray(x, dtype=np.float32)])[0], dtype=np.float32)

    return run


def load_graph(path: str | Path, backend: str, precision: str = "fp32", device: str = "cpu",
               threads: int | None = None, cache_dir: str | Path | None = None) -> GraphFn:
    """Compile the ONNX graph at ``path`` with ``backend`` ("onnxruntime" or "openvino") at ``precision``
    ("fp32", "bf16", "fp16": resolve "auto" with ``evit.precision`` first) on ``device`` ("cpu", "cuda[:N]")."""
    loader = {"onnxruntime": _onnxruntime, "openvino": _openvino}.get(backend)
    if loader is None:
        raise ValueError(f"compiled backend must be onnxruntime or openvino, got {backend!r}")
    return loader(Path(path), precision, device, threads, None if cache_dir is None else Path(cache_dir))
