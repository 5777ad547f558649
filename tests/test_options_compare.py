"""python -m evit.tools.compare: every variant at the paper rule's GMACs, on a tiny model and generated images."""

import json

import pytest
from _tiny import TINY
from test_eval import tiny_checkpoint, write_images

import evit
from evit.tools import compare


def test_variants_run_within_the_papers_budget(tmp_path):
    for c in "abc":
        write_images(tmp_path / "data" / c, 2, seed=ord(c))
    out = tmp_path / "out"
    args = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(tmp_path, rigged=False)),
            "--images", str(tmp_path / "data"), "--model-kwargs", json.dumps(TINY), "--budgets", "0.7,0.4",
            "--variants", "paper,every+mean,mean+cumulative", "--curve", "0.5", "--cache", str(tmp_path / "c.pt"),
            "--out", str(out), "--flip"]
    assert compare.main(args) == 0
    res = json.loads((out / "compare.json").read_text())
    paper = evit.create_model("vit_tiny_patch16_224", **TINY)
    assert [(r["variant"], r["budget_keep_rate"]) for r in res["rows"]] == [
        (v, b) for b in (0.7, 0.4) for v in ("paper", "every+mean", "mean+cumulative")
    ]
    for r in res["rows"]:
        assert r["gmacs"] <= r["budget_gmacs"] == paper.cost(r["budget_keep_rate"]).gmacs
        assert r["top1"] == pytest.approx(sum(r["top1_halves"]) / 2)  # 6 images: two halves of 3
        assert r["top1_flipped"] in {i / 6 for i in range(7)}  # the mirrored images: a second top-1
        assert r["kl_to_full"] >= 0 and r["same_top1_as_full"] in {i / 6 for i in range(7)}
    assert res["full"]["kl_to_full"] == pytest.approx(0, abs=1e-6) and res["full"]["same_top1_as_full"] == 1
    # the 4-block model's every-from-3 schedule prunes at 2 blocks only: it cannot get as cheap as keep 0.5
    assert [r["variant"] for r in res["curve"]] == ["paper", "every+drop"]
    table = (out / "compare.md").read_text()
    assert table.count("\n") == 2 + 6 + 1 + 2 + 1 and "| every+mean | schedule=every, fuse_weight=mean | 0.7 |" in table
    assert "| mirrored: top-1, vs full |" in table.splitlines()[0]
    first = res["rows"][0]
    assert table.splitlines()[2].endswith(
        f" {100 * first['top1_flipped']:.1f}%, {100 * (first['top1_flipped'] - res['full']['top1_flipped']):+.1f} |")
    assert table.endswith(f"| 0.5 | {paper.cost(0.5).gmacs:.3f} | " + " | ".join(
        f"{100 * r['top1']:.1f}%" for r in res["curve"]) + " | - |\n")
    assert (out / "compare.png").stat().st_size > 1000 and (tmp_path / "c.pt").exists()
    assert compare.main(args) == 0  # images from the cache


def test_rows_of_an_earlier_run_are_reused(tmp_path, monkeypatch):
    for c in "ab":
        write_images(tmp_path / "data" / c, 2, seed=ord(c))
    args = ["--model", "vit_tiny_patch16_224", "--checkpoint", str(tiny_checkpoint(tmp_path, rigged=False)),
            "--images", str(tmp_path / "data"), "--model-kwargs", json.dumps(TINY), "--budgets", "0.6",
            "--variants", "paper,every+drop"]
    assert compare.main([*args, "--out", str(tmp_path / "first")]) == 0
    calls = []
    real = compare.predict
    monkeypatch.setattr(compare, "predict", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    first = tmp_path / "first" / "compare.json"
    assert compare.main([*args, "--variants", "paper,every+drop,mean", "--reuse", str(first),
                         "--out", str(tmp_path / "second")]) == 0
    assert len(calls) == 1 + 1  # the full model, and the new variant
    old, new = (json.loads(p.read_text())["rows"] for p in (first, tmp_path / "second" / "compare.json"))
    assert new[:2] == old and new[2]["variant"] == "mean"


def test_unknown_variant_is_refused(tmp_path, capsys):
    args = ["--model", "m", "--checkpoint", "w", "--images", str(tmp_path), "--variants", "paper,magic"]
    assert compare.main(args) == 2 and "magic" in capsys.readouterr().err
