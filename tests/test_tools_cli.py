"""The tools' timm-style flags: --model-kwargs key=value, DIR / --data-dir, --output, -b/-j, --device, --precision."""

import argparse
import json

import pytest
import torch
from _tiny import TINY
from test_eval import HEAD_BIAS, run_eval, tiny_checkpoint, write_images

from evit.tools import cli
from evit.tools import eval as evit_eval


def parse(*argv: str) -> argparse.Namespace:
    return evit_eval.build_parser().parse_args(["--model", "m", "--pretrained", *argv])


def test_model_kwargs_as_timm_and_as_json():
    args = parse("--model-kwargs", "img_size=32", "drop_path_rate=0.1", "global_pool=token", "qk_norm=True")
    assert args.model_kwargs == {"img_size": 32, "drop_path_rate": 0.1, "global_pool": "token", "qk_norm": True}
    assert parse("--model-kwargs", json.dumps({"img_size": 32, "num_classes": 10})).model_kwargs == {
        "img_size": 32, "num_classes": 10}
    assert parse().model_kwargs == {}
    for bad in ("img_size", "=3", "{not json", "[1, 2]"):
        with pytest.raises(SystemExit):
            parse("--model-kwargs", bad)


def test_timm_names_and_old_aliases(tmp_path):
    args = parse(str(tmp_path), "-b", "8", "-j", "3", "--output", "o")
    assert (cli.data_dir(args), args.batch_size, args.workers, str(args.output)) == (tmp_path, 8, 3, "o")
    old = parse("--images", str(tmp_path), "--batch-size", "8", "--workers", "0", "--out", "x")
    assert (cli.data_dir(old), old.batch_size, old.workers, str(old.output)) == (tmp_path, 8, 0, "x")
    assert cli.data_dir(parse("--data-dir", str(tmp_path))) == tmp_path
    for given in ((), (str(tmp_path), "--data-dir", str(tmp_path / "other"))):
        with pytest.raises(ValueError, match="DIR"):
            cli.data_dir(parse(*given))
    text = evit_eval.build_parser().format_help()
    assert "--output" in text and "--out " not in text and "(default: 64)" in text


def test_device_checked(monkeypatch):
    assert cli.device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        cli.device("cuda")
    with pytest.raises(ValueError, match="--device"):
        cli.device("warp-drive")


def test_precision_flag_and_its_deprecated_amp_alias():
    """--precision resolves with evit.precision (fp16 on a CPU refused); --amp [--amp-dtype] maps onto it."""
    parser = argparse.ArgumentParser()
    cli.add_runtime_args(parser)
    cpu = torch.device("cpu")
    assert cli.precision(parser.parse_args([]), cpu) == torch.float32
    assert cli.precision(parser.parse_args(["--precision", "bf16"]), cpu) == torch.bfloat16
    with pytest.warns(DeprecationWarning, match="--precision"):
        assert cli.precision(parser.parse_args(["--amp", "--amp-dtype", "bfloat16"]), cpu) == torch.bfloat16
    with pytest.raises(ValueError, match=r"--precision: .*fp16"):
        cli.precision(parser.parse_args(["--precision", "fp16"]), cpu)
    with cli.autocast(cpu, torch.float32):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.float32


def test_precision_bf16_on_cpu(tmp_path):
    """Under autocast the forward runs in bfloat16 (logits dtype), and the rigged head's ranking survives it."""
    with cli.autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16
    paths = write_images(tmp_path / "data", 8)
    labels = [3] * 4 + [5] * 2 + [9] * 2  # first, second and last choice of the rigged head
    rows = ["filename\tclass_index"] + [f"{p.name}\t{c}" for p, c in zip(paths, labels, strict=True)]
    (tmp_path / "data" / "labels.tsv").write_text("\n".join(rows) + "\n")
    assert HEAD_BIAS[3] == max(HEAD_BIAS)
    res = run_eval(tmp_path, tiny_checkpoint(tmp_path, rigged=True), tmp_path / "data", "--keep-rates", "0.5",
                   "--precision", "bf16", "-j", "0")
    assert res["precision"] == "bf16" and res["device"] == "cpu" and res["workers"] == 0
    assert (res["rows"][0]["top1"], res["rows"][0]["top5"]) == (0.5, 0.75)


def test_model_kwargs_key_value_end_to_end(tmp_path):
    """The same run with timm-style kwargs and with JSON kwargs gives the same rows."""
    write_images(tmp_path / "data" / "a", 3)
    ckpt = tiny_checkpoint(tmp_path, rigged=False)
    as_json = run_eval(tmp_path / "j", ckpt, tmp_path / "data", "--keep-rates", "0.5", "-j", "0")
    kv = [f"{k}={v}" for k, v in TINY.items()]
    out = tmp_path / "kv"
    args = [str(tmp_path / "data"), "--model", "vit_tiny_patch16_224", "--checkpoint", str(ckpt), "--quiet",
            "--keep-rates", "0.5", "-j", "0", "-b", "5", "--output", str(out), "--model-kwargs", *kv]
    assert evit_eval.main(args) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["top1"], r["tokens"]) for r in rows] == [(r["top1"], r["tokens"]) for r in as_json["rows"]]


def test_prefetching_loader_matches_the_plain_one(tmp_path):
    """The loader the tools use on CUDA (timm's prefetcher: normalization after batching, on the device) gives
    the plain loader's tensors; run here on the CPU device, as no GPU is required."""
    import evit
    from evit.tools.data import create_image_loader, load_labels

    write_images(tmp_path / "data" / "a", 5, seed=1)
    write_images(tmp_path / "data" / "b", 2, seed=2)
    items = load_labels(tmp_path / "data")
    model = evit.create_model("vit_tiny_patch16_224", **TINY)
    cpu = torch.device("cpu")
    plain = list(create_image_loader(items, model, 3, 0, cpu, prefetch=False))
    fetched = list(create_image_loader(items, model, 3, 0, cpu, prefetch=True))
    assert [len(y) for _, y in plain] == [3, 3, 1] and [y.tolist() for _, y in plain] == [[0, 0, 0], [0, 0, 1], [1]]
    for (x, y), (fx, fy) in zip(plain, fetched, strict=True):
        assert x.shape == fx.shape == (len(y), 3, 32, 32) and fx.dtype == torch.float32
        torch.testing.assert_close(fx, x, atol=1e-5, rtol=0)
        assert torch.equal(fy, y)


def test_tools_doc_names_every_console_script() -> None:
    """docs/tools.md says how many console scripts the package installs, and names each of pyproject's."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    doc = (root / "docs" / "tools.md").read_text()
    words = {3: "Three", 4: "Four", 5: "Five", 6: "Six", 7: "Seven"}
    assert re.search(rf"\b{words[len(scripts)]} console scripts\b", doc), len(scripts)
    assert all(f"`{name}`" in doc for name in scripts), [n for n in scripts if f"`{n}`" not in doc]
