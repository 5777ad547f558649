"""evit-eval on cases whose answer is known, and on the real weights when ../shared/assets has them."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _tiny import TINY
from conftest import ASSETS, IMAGES, WEIGHTS
from PIL import Image

import evit
from evit.tools import eval as evit_eval

SAMPLE = IMAGES
ARCH = "vit_tiny_patch16_224"
# The head ignores the image: class 3 always wins, then 5, then 1, ...; class 9 always comes last.
HEAD_BIAS = [8.0, 7.0, 0.0, 10.0, 6.0, 9.0, 5.0, 4.0, 3.0, -5.0]


def write_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def tiny_checkpoint(tmp_path: Path, rigged: bool) -> Path:
    torch.manual_seed(0)
    model = evit.create_model(ARCH, **TINY)
    if rigged:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.copy_(torch.tensor(HEAD_BIAS))
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    return path


def run_eval(tmp_path: Path, ckpt: Path, images: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    args = ["--model", ARCH, "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out), "--quiet"]
    args += ["--model-kwargs", json.dumps(TINY), "--batch-size", "5", *extra]
    assert evit_eval.main(args) == 0
    assert (out / "pareto.png").stat().st_size > 1000 and (out / "results.md").exists()
    return json.loads((out / "results.json").read_text())


def test_known_accuracy_from_labels_tsv(tmp_path):
    """6 labels the rigged head always ranks first, 3 it ranks second, 3 it ranks last: 50% / 75%."""
    paths = write_images(tmp_path / "data", 12)
    labels = [3] * 6 + [5] * 3 + [9] * 3
    rows = ["filename\tclass_index"] + [f"{p.name}\t{c}" for p, c in zip(paths, labels, strict=True)]
    (tmp_path / "data" / "labels.tsv").write_text("\n".join(rows) + "\n")
    start = time.perf_counter()
    res = run_eval(
        tmp_path,
        tiny_checkpoint(tmp_path, rigged=True),
        tmp_path / "data",
        "--keep-rates",
        "1.0,0.5",
        "--fuse-ablation",
    )
    wall = time.perf_counter() - start
    assert [(r["keep_rate"], r["fuse"]) for r in res["rows"]] == [(1.0, True), (0.5, True), (1.0, False), (0.5, False)]
    probes = {fuse: evit.create_model(ARCH, **TINY, fuse=fuse) for fuse in (True, False)}
    for row in res["rows"]:
        assert row["top1"] == 0.5 and row["top5"] == 0.75 and row["images"] == 12
        cost = probes[row["fuse"]].cost(row["keep_rate"])
        assert row["gmacs"] == pytest.approx(cost.gmacs) and row["tokens"] == cost.total_tokens
    # the measured throughputs are consistent with the run: the passes they time fit into its wall time
    assert sum(row["images"] / row["images_per_second"] for row in res["rows"]) < wall
    assert res["rows"][1]["gmacs"] < res["rows"][0]["gmacs"]
    assert res["num_images"] == 12 and res["prune_blocks"] == list(evit.default_prune_blocks(TINY["depth"]))


def test_imagefolder_labels_equal_to_predictions_score_100(tmp_path):
    """Labels taken from the model's own predictions (computed here, outside the tool) must score 100%."""
    ckpt = tiny_checkpoint(tmp_path, rigged=False)
    paths = write_images(tmp_path / "flat", 9, seed=4)
    model = evit.create_model(ARCH, checkpoint_path=ckpt, **TINY, prune_blocks=[1, 2]).eval()
    from timm.data import create_transform

    transform = create_transform(**evit.data_config(model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])  # 9, 3, 32, 32
    with torch.inference_mode():
        predicted = model(x, keep_rate=0.5).argmax(dim=1).tolist()
    for p, c in zip(paths, predicted, strict=True):  # ImageFolder: class k is the k-th sorted sub-folder
        (tmp_path / "tree" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
        p.rename(tmp_path / "tree" / f"class{c:02d}" / p.name)
    for c in range(TINY["num_classes"]):  # empty folders keep the class indices aligned
        (tmp_path / "tree" / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    res = run_eval(tmp_path, ckpt, tmp_path / "tree", "--keep-rates", "0.5", "--prune-blocks", "1,2")
    assert res["rows"][0]["top1"] == 1.0 and res["rows"][0]["fuse"] is True and res["prune_blocks"] == [1, 2]


@pytest.mark.parametrize(
    ("labels_tsv", "message"),
    [
        ("filename\tclass_index\nmissing.png\t1\n", "no file"),
        ("filename\tclass_index\nimg00.png\tseven\n", "not an integer"),
        ("name\tlabel\nimg00.png\t1\n", "header row"),
        ("filename\tclass_index\nimg00.png\t10\n", "class indices must be in [0, 10)"),
    ],
)
def test_bad_labels_exit_2_with_a_message(tmp_path, capsys, labels_tsv, message):
    write_images(tmp_path / "data", 1)
    (tmp_path / "data" / "labels.tsv").write_text(labels_tsv)
    ckpt = tiny_checkpoint(tmp_path, rigged=True)
    args = ["--model", ARCH, "--checkpoint", str(ckpt), "--images", str(tmp_path / "data")]
    assert evit_eval.main([*args, "--model-kwargs", json.dumps(TINY), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_bad_keep_rates_refused():
    with pytest.raises(SystemExit):
        evit_eval.build_parser().parse_args(["--model", ARCH, "--pretrained", "--images", ".", "--keep-rates", "0"])


@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS.exists() and SAMPLE.exists()), reason=f"real assets absent from {ASSETS}")
def test_real_weights_keep_1_equals_plain_timm(tmp_path):
    """ViT-Ti on the first 100 sample images: evit-eval at keep 1.0 scores what plain timm scores.

    100 images keep the suite fast; the library's own tests check all 500 (82.6%) and the pruned rates.
    """
    from safetensors.torch import load_file
    from timm.data import create_transform

    out = tmp_path / "real"
    args = ["--model", ARCH, "--checkpoint", str(WEIGHTS), "--images", str(SAMPLE), "--out", str(out)]
    assert evit_eval.main([*args, "--keep-rates", "1.0", "--limit", "100", "--quiet"]) == 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]

    plain = timm.create_model(ARCH).eval()
    plain.load_state_dict(load_file(WEIGHTS))
    transform = create_transform(**timm.data.resolve_model_data_config(plain))
    items = evit_eval.load_labels(SAMPLE)[:100]
    hits1 = hits5 = 0
    with torch.inference_mode():
        for start in range(0, 100, 50):
            chunk = items[start : start + 50]
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in chunk])  # 50, 3, 224, 224
            y = torch.tensor([c for _, c in chunk])
            top = plain(x).topk(5, dim=1).indices  # 50, 5
            hits1 += (top[:, 0] == y).sum().item()
            hits5 += (top == y[:, None]).any(dim=1).sum().item()
    assert row["images"] == 100 and (row["top1"], row["top5"]) == (hits1 / 100, hits5 / 100)
    assert row["top1"] > 0.7 and row["gmacs"] == pytest.approx(1.26, abs=0.02)  # ViT-Ti: 197 tokens x 12 blocks
