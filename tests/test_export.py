"""evit.export: an EViT forward at a fixed keep rate as ONNX, run by onnxruntime, equals the eager model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from _tiny import ARCHS, images, tiny_pair
from conftest import WEIGHTS

import evit
from evit.export import FixedRate, export_onnx

OPTION_SETS = {
    "paper": {},
    "drop": dict(fuse=False),
    "mean": dict(fuse_weight="mean"),
    "cumulative_every": dict(ranking="cumulative", schedule="every"),
    "size_attn": dict(size_attn=True),
    "nearest": dict(fuse_into="nearest"),
    "accurate": dict(evit.ACCURATE),
}


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(model: torch.nn.Module, rate: float, path, batches=(1, 3)) -> None:
    session = _session(export_onnx(model, path, keep_rate=rate))
    for b in batches:  # one graph, any batch
        x = images(b, seed=b)
        with torch.no_grad():
            eager = model(x, keep_rate=rate).numpy()
        out = session.run(None, {"x": x.numpy()})[0]
        assert out.shape == eager.shape
        assert np.abs(out - eager).max() < 1e-4, (rate, b)


@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_every_option_set_round_trips(name: str, tmp_path) -> None:
    options = dict(OPTION_SETS[name])
    fuse = options.pop("fuse", True)
    _, model = tiny_pair("vit", depth=8, fuse=fuse)
    evit.apply_patch(model, fuse=fuse, **options)
    _check(model, 0.5, tmp_path / "m.onnx")


@pytest.mark.parametrize("kind", sorted(ARCHS))
@pytest.mark.parametrize("options", [{}, evit.ACCURATE], ids=["paper", "accurate"])
def test_every_architecture_round_trips(kind: str, options: dict, tmp_path) -> None:
    _, model = tiny_pair(kind)
    evit.apply_patch(model, **options)
    _check(model, 0.7, tmp_path / "m.onnx", batches=(2,))


@pytest.mark.parametrize("kind", sorted(ARCHS))
def test_keep_1_graph_and_plain_timm_graph_equal_timm(kind: str, tmp_path) -> None:
    ref, model = tiny_pair(kind)
    x = images(4)
    with torch.no_grad():
        timm_out = ref(x).numpy()
    full = _session(export_onnx(model, tmp_path / "full.onnx", keep_rate=1.0)).run(None, {"x": x.numpy()})[0]
    plain = _session(export_onnx(ref, tmp_path / "timm.onnx")).run(None, {"x": x.numpy()})[0]
    assert np.abs(full - timm_out).max() < 1e-4
    assert np.abs(plain - timm_out).max() < 1e-4


def test_export_rejects_what_it_cannot_export(tmp_path) -> None:
    ref, model = tiny_pair("vit")
    with pytest.raises(TypeError, match="EViT"):
        FixedRate(ref, 0.5)
    with pytest.raises(TypeError, match="keep_rate"):
        export_onnx(ref, tmp_path / "x.onnx", keep_rate=0.5)
    with pytest.raises(ValueError, match="keep_rate"):
        FixedRate(model, 1.5)


@pytest.mark.slow
@pytest.mark.skipif(not WEIGHTS.exists(), reason="real ViT-Ti weights absent (../shared/assets)")
@pytest.mark.parametrize("options", [{}, evit.ACCURATE], ids=["paper", "accurate"])
def test_real_vit_ti_export_equals_eager(options: dict, tmp_path) -> None:
    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=WEIGHTS, **options).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = _session(export_onnx(model, tmp_path / "vit.onnx", keep_rate=0.7)).run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        eager = model(x, keep_rate=0.7).numpy()
    assert np.abs(out - eager).max() < 1e-4


def test_backends_tool_exports_each_rate_once(monkeypatch) -> None:
    """evit.tools.backends compiles one exported graph per option set and rate for every compiled combo."""
    from evit.tools import backends

    exported: list[float] = []

    def counting_export(*args, keep_rate: float, **kwargs):
        exported.append(keep_rate)
        return export_onnx(*args, keep_rate=keep_rate, **kwargs)

    monkeypatch.setattr(backends, "export_onnx", counting_export)
    _, model = tiny_pair("vit")
    x = images(4)
    with torch.no_grad():
        y = model(x, keep_rate=0.5).argmax(-1)
    rows = backends.run(model, x, y, ["torch:fp32", "onnxruntime:fp32", "onnxruntime:fp32"], [1.0, 0.5], ["paper"])
    assert exported == [1.0, 0.5]
    assert [r["agreement"] for r in rows if r["keep_rate"] == 0.5] == [100.0] * 3
