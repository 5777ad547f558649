"""python -m evit.tools.bench: every configuration timed in one run, costs from the cost model, on a tiny model."""

import json

import pytest
import torch
from _tiny import TINY
from torch.utils.flop_counter import FlopCounterMode

import evit
from evit.tools import bench


@pytest.mark.parametrize("flags", [[], ["--accurate"]], ids=["paper", "accurate"])
def test_bench_writes_its_table(tmp_path, capsys, flags):
    out = tmp_path / "bench.json"
    bench.main(["--model", "vit_tiny_patch16_224", "--model-kwargs", json.dumps(TINY), "--batch-size", "4",
                "--keep-rates", "1.0,0.5", "--mixed-rates", "0.5,1.0", "--rounds", "2", "--warmup", "1",
                "--device", "cpu", "--clock", "cpu", "--out", str(out), *flags])
    result = json.loads(out.read_text())
    model = evit.create_model("vit_tiny_patch16_224", **TINY, **result["options"])
    assert result["options"]["fuse_into"] == ("nearest" if flags else "one")
    assert [r["keep_rate"] for r in result["rows"]] == [1.0, 0.5]
    full = counted_gmacs(model, 1.0)
    for r in result["rows"]:
        # an independent count: torch's FlopCounterMode over the pruned forward pass (matmuls, attention,
        # patch conv; it leaves out norms, softmax and GELU, which the cost model counts: within 10 %, plus the
        # table's rounding to 0.001 GMACs) and the ratio to the full model (within 2 %)
        counted = counted_gmacs(model, r["keep_rate"])
        assert r["gmacs"] == pytest.approx(counted, rel=0.10, abs=0.0005)
        assert r["gmac_ratio"] == pytest.approx(full / counted, rel=0.02)
        assert r["tokens"] == model.cost(r["keep_rate"]).total_tokens
        # the table agrees with itself: speedup is the throughput ratio to the same backend's full model, and
        # speedup_over_eager_fp32_timm the ratio to plain timm, both measured in this run
        assert r["speedup"] == pytest.approx(r["images_per_second"] / result["full_images_per_second"], rel=0.02)
        assert r["speedup_over_eager_fp32_timm"] == pytest.approx(
            r["images_per_second"] / result["timm_images_per_second"], rel=0.02)
        assert r["speedup_over_gmac_ratio"] == pytest.approx(r["speedup"] / r["gmac_ratio"], rel=0.02)
    assert result["rows"][1]["tokens"] < result["rows"][0]["tokens"]
    assert result["mixed"]["rates"] == [0.5, 1.0] and result["mixed"]["ratio"] > 0
    assert "mixed batch [0.5, 1.0]" in capsys.readouterr().out


def counted_gmacs(model: torch.nn.Module, keep_rate: float) -> float:
    """GMACs per image of ``model`` at ``keep_rate`` as torch's FlopCounterMode counts them (2 FLOPs a MAC)."""
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.forward_with_info(torch.randn(1, 3, 32, 32), keep_rate=[keep_rate])
    return counter.get_total_flops() / 2 / 1e9
