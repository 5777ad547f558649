"""Compiled backends in the service: buckets, the graph cache, per-rate passes, numerics, a missing package.

The tests that open OpenVINO / ONNX Runtime sessions are ``isolated`` (tests/_isolated.py): they run in one
child pytest, so those runtimes' native threads never live in the main test process."""

from __future__ import annotations

import sys

import pytest
import torch
from _tiny import images, tiny_pair

import evit
from service.registry import ModelLoadError, load_registry
from service.runners.compiled import CompiledRunner
from service.runners.select import build_runner, runner_precision

BACKENDS = ["onnxruntime", "openvino"]
BUCKETS = (0.5, 0.7, 1.0)


def runner(backend: str, tmp_path, precision: str = "fp32", **options) -> CompiledRunner:
    _, model = tiny_pair("vit")
    evit.apply_patch(model, **options)
    return build_runner(model, torch.device("cpu"), backend, precision, "tiny", BUCKETS, tmp_path)


@pytest.mark.isolated  # an OpenVINO / ONNX Runtime session: in a child process
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, evit.ACCURATE], ids=["paper", "accurate"])
def test_mixed_rates_split_per_rate_equal_eager_and_solo(backend: str, options: dict, tmp_path) -> None:
    r = runner(backend, tmp_path, **options)
    x = images(5)
    rates = [0.5, 1.0, 0.7, 0.5, 0.6]  # 0.6 snaps to the 0.7 bucket
    out = r.forward(list(x), rates)
    snapped = [r.snap(q) for q in rates]
    assert snapped == [0.5, 1.0, 0.7, 0.5, 0.7]
    with torch.no_grad():
        eager = r.model(x, keep_rate=snapped)
    assert (out.logits - eager).abs().max() < 1e-4  # fp32 graphs equal the eager model
    for i, rate in enumerate(snapped):  # each answer is what the image gets alone
        alone = r.forward([x[i]], [rate]).logits[0]
        assert (alone - out.logits[i]).abs().max() < 1e-5
    assert out.tokens == [r.model.cost(q).total_tokens for q in snapped]
    kept = r.forward([x[4], x[1]], [0.6, 1.0], return_kept=True)  # visualization: eager at the snapped rate
    assert kept.kept is not None and len(kept.kept[0]) == len(r.info.prune_blocks)
    assert (kept.logits - eager[[4, 1]]).abs().max() < 1e-4


@pytest.mark.isolated  # an OpenVINO / ONNX Runtime session: in a child process
def test_openvino_bf16_close_to_fp32(tmp_path) -> None:
    if runner_precision("auto", torch.device("cpu")) != "bf16":
        pytest.skip("this CPU has no native bf16")
    r = runner("openvino", tmp_path, "bf16")
    x = images(8)
    with torch.no_grad():
        eager = r.model(x, keep_rate=0.7)
    out = r.forward(list(x), [0.7] * 8).logits
    assert (out - eager).abs().max() < 0.1 * eager.abs().max()
    assert r.info.precision == "bf16"


@pytest.mark.isolated  # an OpenVINO / ONNX Runtime session: in a child process
def test_graph_cache_second_start_loads_changed_option_rebuilds(tmp_path, monkeypatch) -> None:
    exported: list[float] = []
    original = CompiledRunner.export
    monkeypatch.setattr(CompiledRunner, "export", lambda self, path, rate: (exported.append(rate),
                                                                           original(self, path, rate)))
    first = runner("onnxruntime", tmp_path)
    first.warm_up()
    assert sorted(exported) == list(BUCKETS) and len(list(tmp_path.glob("*.onnx"))) == 3
    runner("onnxruntime", tmp_path).warm_up()  # a restart: every graph from the cache
    assert len(exported) == 3
    runner("onnxruntime", tmp_path, fuse_into="nearest").warm_up()  # another option: new graphs
    assert len(exported) == 6 and len(list(tmp_path.glob("*.onnx"))) == 6
    other = runner("onnxruntime", tmp_path)
    with torch.no_grad():
        for p in other.model.parameters():
            p.add_(0.01)  # other weights: new graphs
    other.warm_up()
    assert len(exported) == 9


def test_missing_backend_package_names_the_extra(tiny_settings, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'evit-serve\[openvino\]'"):
        load_registry(tiny_settings(backend="openvino"))


def test_precision_rules(monkeypatch) -> None:
    from evit import precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runner_precision(None, cpu) == "fp32" and runner_precision(None, cuda) == "fp16"
    assert runner_precision("auto", cuda) == "fp16" and runner_precision("auto", cuda, half=False) == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda: False)
    assert runner_precision("auto", cpu) == "fp32"  # no native bf16: fp32 stays the default
    monkeypatch.setattr(precision, "native_bf16", lambda: True)
    assert runner_precision("auto", cpu) == "bf16"
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        precision.resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision must be one of"):
        precision.resolve_precision("int8", cpu)



@pytest.mark.isolated  # an OpenVINO / ONNX Runtime session: in a child process
@pytest.mark.anyio
@pytest.mark.parametrize("backend", BACKENDS)
async def test_service_snaps_to_a_bucket_and_reports_it(backend, serve, tiny_settings, image_bytes, tmp_path):
    settings = tiny_settings(backend=backend, precision="fp32", keep_rates=BUCKETS, graph_cache_dir=tmp_path)
    async with serve(settings) as (app, client):
        info = (await client.get("/models")).json()["models"][0]
        assert info["backend"] == backend and info["precision"] == "fp32" and info["keep_rates"] == list(BUCKETS)
        r = await client.post("/classify?keep_rate=0.55&top_k=2", content=image_bytes(),
                              headers={"content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        body = r.json()
        runner = app.state.service.registry.get("tiny").runner
        assert body["keep_rate"] == 0.7 and body["tokens"] == runner.cost(0.7).total_tokens
        text = (await client.get("/metrics")).text  # build info names the backend that runs the passes
        assert f'backend="{backend}"' in next(line for line in text.splitlines() if line.startswith("evit_build_info"))


def test_backend_settings_from_flags_and_env(monkeypatch) -> None:
    from pydantic import ValidationError

    from service.flags import parse_settings

    monkeypatch.setenv("EVIT_BACKEND", "openvino")
    monkeypatch.setenv("EVIT_KEEP_RATES", "0.5,0.7")
    s = parse_settings([])
    assert (s.backend, s.precision, s.keep_rates) == ("openvino", None, (0.5, 0.7))
    s = parse_settings(["--backend", "auto", "--precision", "bf16", "--keep-rates", "0.6,1.0"])
    assert (s.backend, s.precision, s.keep_rates) == ("auto", "bf16", (0.6, 1.0))
    with pytest.raises(ValidationError, match="keep-rate buckets"):
        parse_settings(["--keep-rates", "0,1.0"])


@pytest.mark.anyio
async def test_ready_service_has_frozen_its_startup_objects(serve, tiny_settings) -> None:
    import gc

    gc.unfreeze()
    async with serve(tiny_settings()) as (_, client):
        assert (await client.get("/readyz")).status_code == 200
        assert gc.get_freeze_count() > 10_000  # a full collection no longer walks torch/timm/app objects
    gc.unfreeze()
