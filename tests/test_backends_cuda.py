"""CUDA paths (``make gpu-check``): fp16 eager, CUDA graphs for the torch backend, ONNX Runtime's CUDA/TensorRT
providers. Each skips with its reason on a machine without a CUDA GPU or without onnxruntime-gpu."""

from __future__ import annotations

import pytest
import torch
from _tiny import images, tiny_pair

import evit
from service.runners.select import build_runner

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
CUDA = torch.device("cuda")


def _model(**options):
    _, model = tiny_pair("vit", depth=8)
    return evit.apply_patch(model, **options)


@pytest.mark.parametrize("options", [{}, evit.ACCURATE], ids=["paper", "accurate"])
def test_fp16_and_cuda_graphs_equal_eager(options: dict) -> None:
    model = _model(**options)
    x = images(5)
    with torch.no_grad():
        ref = model(x, keep_rate=0.7)
    eager = build_runner(_model(**options), CUDA, "torch", "fp16", "tiny")
    graphs = build_runner(_model(**options), CUDA, "torch", "fp16", "tiny", cuda_graphs=True)
    for runner in (eager, graphs):
        runner.model.load_state_dict(model.state_dict())
    a = eager.forward(list(x), [0.7] * 5).logits
    b = graphs.forward(list(x), [0.7] * 5).logits  # captured, then replayed below
    c = graphs.forward(list(x[:3]), [0.7] * 3).logits
    assert (a - ref).abs().max() < 2e-2
    assert (b - a).abs().max() < 1e-3 and (c - a[:3]).abs().max() < 1e-3
    mixed = graphs.forward(list(x), [0.5, 0.7, 1.0, 0.5, 0.7]).logits  # mixed rates: eager, exact per sample
    with torch.no_grad():
        assert (mixed - model(x, keep_rate=[0.5, 0.7, 1.0, 0.5, 0.7])).abs().max() < 2e-2


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnxruntime_cuda_provider_equals_eager(precision: str, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (pip install onnxruntime-gpu)")
    model = _model()
    x = images(4)
    with torch.no_grad():
        ref = model(x, keep_rate=0.5)
    runner = build_runner(model, CUDA, "onnxruntime", precision, "tiny", (0.5, 1.0), tmp_path)
    out = runner.forward(list(x), [0.5] * 4).logits
    assert (out - ref).abs().max() < (1e-3 if precision == "fp32" else 2e-2)
