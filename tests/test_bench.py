"""python -m evit.tools.bench: every configuration timed in one run, costs from the cost model, on a tiny model."""

import json

import pytest
from _tiny import TINY

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
    for r in result["rows"]:
        cost = model.cost(r["keep_rate"])
        assert r["tokens"] == cost.total_tokens and r["gmacs"] == round(cost.gmacs, 3)
        assert r["gmac_ratio"] == round(model.cost(1.0).gmacs / cost.gmacs, 3) and r["speedup"] > 0
    assert result["rows"][1]["tokens"] < result["rows"][0]["tokens"]
    assert result["mixed"]["rates"] == [0.5, 1.0] and result["mixed"]["ratio"] > 0
    assert "mixed batch [0.5, 1.0]" in capsys.readouterr().out
