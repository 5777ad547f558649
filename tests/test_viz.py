"""evit-viz: the PNG's size, its greyed patches per stage, and the class-attention heatmap."""

import json
import math

import numpy as np
import pytest
import timm
import torch
from _tiny import TINY
from conftest import ASSETS, WEIGHTS
from PIL import Image
from test_eval import tiny_checkpoint, write_images

import evit
from evit.tools import viz

ARCH = "vit_tiny_patch16_224"
BIRD = ASSETS / "imagenet-sample" / "n01530575_brambling.JPEG"


def greyed_cells(png: Image.Image, panel: int, side: int, grid: tuple[int, int]) -> int:
    """Patches of panel ``panel`` (0-based) painted entirely GREY."""
    pixels = np.asarray(png.convert("RGB"))
    x0 = viz.GAP + panel * (side + viz.GAP)
    area = pixels[viz.TITLE_H : viz.TITLE_H + side, x0 : x0 + side]  # side, side, 3
    ch, cw = side // grid[0], side // grid[1]
    return sum(
        bool((area[r * ch : (r + 1) * ch, c * cw : (c + 1) * cw] == viz.GREY).all())
        for r in range(grid[0])
        for c in range(grid[1])
    )


@pytest.fixture
def tiny(tmp_path):
    """(a tiny random checkpoint, a 48x40 noise PNG): test_eval's helpers."""
    return tiny_checkpoint(tmp_path, rigged=False), write_images(tmp_path, 1)[0]


def test_png_size_and_greyed_patches_per_stage(tmp_path, tiny):
    ckpt, image = tiny
    out = tmp_path / "v" / "viz.png"
    args = ["--model", ARCH, "--checkpoint", str(ckpt), "--image", str(image), "--keep-rate", "0.5"]
    assert viz.main([*args, "--model-kwargs", json.dumps(TINY), "--out", str(out)]) == 0

    model = evit.create_model(ARCH, checkpoint_path=ckpt, **TINY).eval()
    x, _ = viz.model_input(model, Image.open(image))
    with torch.inference_mode():
        kept = model.forward_with_info(x, keep_rate=0.5, return_kept=True).kept  # per stage: 1, 16
    stages = len(model.evit_cfg.prune_blocks)
    assert stages == len(kept) == 3

    png = Image.open(out)
    side = 32 * round(224 / 32)  # 32-pixel input magnified 7x
    assert png.size == ((2 + stages) * (side + viz.GAP) + viz.GAP, viz.TITLE_H + side + viz.GAP)
    greyed = [greyed_cells(png, 2 + i, side, (4, 4)) for i in range(stages)]
    assert greyed == [int((~k).sum()) for k in kept]
    assert greyed[0] == 16 - math.ceil(0.5 * 16)  # stage 1 keeps the top 8 of 16 patches
    assert greyed == sorted(greyed) and greyed[-1] < 16
    assert greyed_cells(png, 0, side, (4, 4)) == 0  # the input panel is untouched

    info = json.loads(out.with_suffix(".json").read_text())
    assert info["greyed_per_stage"] == greyed and info["kept"]["grid"] == [4, 4]
    assert [len(s["patches"]) for s in info["kept"]["stages"]] == [16 - g for g in greyed]
    assert [s["block"] for s in info["kept"]["stages"]] == list(model.evit_cfg.prune_blocks)


def test_heatmap_is_the_class_attention_of_the_first_pruning_block(tiny):
    """Checked against timm's own (unfused) attention probabilities, captured independently."""
    ckpt, image = tiny
    model = evit.create_model(ARCH, checkpoint_path=ckpt, **TINY).eval()
    result = viz.visualize(model, Image.open(image), keep_rate=0.5)
    first = model.evit_cfg.prune_blocks[0]

    ref = timm.create_model(ARCH, **TINY).eval()
    ref.load_state_dict(model.state_dict())
    ref.blocks[first].attn.fused_attn = False
    probs = {}
    ref.blocks[first].attn.attn_drop.register_forward_hook(lambda _m, _i, out: probs.setdefault("a", out))
    with torch.inference_mode():
        ref(viz.model_input(model, Image.open(image))[0])
    expected = probs["a"][0, :, 0, 1:].mean(dim=0).reshape(4, 4).numpy()  # heads averaged, class row
    assert result.attention.shape == (4, 4)
    np.testing.assert_allclose(result.attention, expected, atol=1e-6)
    # Stage 1 keeps exactly the 8 patches with the highest class attention.
    top8 = np.argsort(-expected.ravel(), kind="stable")[:8]
    assert set(np.flatnonzero(result.kept[0])) == set(top8.tolist())


def test_draws_a_saved_service_answer(tmp_path, tiny):
    _, image = tiny
    answer = {
        "keep_rate": 0.5,
        "predictions": [{"label": "x", "class_index": 3, "probability": 0.9}],
        "kept": {"grid": [4, 4], "stages": [{"block": 1, "patches": list(range(8))}, {"block": 2, "patches": [0]}]},
    }
    (tmp_path / "answer.json").write_text(json.dumps(answer))
    out = tmp_path / "from_answer.png"
    args = ["--model", ARCH, "--model-kwargs", json.dumps(TINY), "--image", str(image)]
    assert viz.main([*args, "--response", str(tmp_path / "answer.json"), "--out", str(out)]) == 0
    png = Image.open(out)
    side = 32 * 7
    assert png.size == (3 * (side + viz.GAP) + viz.GAP, viz.TITLE_H + side + viz.GAP)  # no heatmap panel
    assert [greyed_cells(png, 1 + i, side, (4, 4)) for i in range(2)] == [8, 15]
    assert json.loads(out.with_suffix(".json").read_text())["greyed_per_stage"] == [8, 15]


def test_errors_are_clear(tmp_path, tiny, capsys):
    ckpt, image = tiny
    base = ["--model", ARCH, "--model-kwargs", json.dumps(TINY), "--out", str(tmp_path / "x.png")]
    assert viz.main([*base, "--image", str(image)]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert viz.main([*base, "--image", str(tmp_path / "missing.png"), "--checkpoint", str(ckpt)]) == 2
    assert viz.main([*base, "--image", str(image), "--checkpoint", str(ckpt), "--keep-rate", "1.5"]) == 2
    assert "keep_rate" in capsys.readouterr().err
    (tmp_path / "a.json").write_text(json.dumps({"keep_rate": 1.0}))
    assert viz.main([*base, "--image", str(image), "--response", str(tmp_path / "a.json")]) == 2
    assert "return_tokens" in capsys.readouterr().err


@pytest.mark.skipif(not (WEIGHTS.exists() and BIRD.exists()), reason=f"real assets absent from {ASSETS}")
def test_real_weights_bird(tmp_path):
    out = tmp_path / "bird.png"
    args = ["--model", ARCH, "--checkpoint", str(WEIGHTS), "--image", str(BIRD), "--keep-rate", "0.7"]
    assert viz.main([*args, "--out", str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["top5"][0]["class_index"] == 10  # brambling
    assert info["greyed_per_stage"][0] == 196 - math.ceil(0.7 * 196)
    assert Image.open(out).size == (5 * (224 + viz.GAP) + viz.GAP, viz.TITLE_H + 224 + viz.GAP)


def test_many_stages_wrap_into_rows():
    panels = [(f"p{i}", np.full((4, 4, 3), 10 * i, dtype=np.uint8)) for i in range(8)]  # e.g. ACCURATE: 6 stages
    png = viz.compose(panels, scale=2)
    row = viz.TITLE_H + 8 + viz.GAP
    assert png.size == (viz.COLUMNS * (8 + viz.GAP) + viz.GAP, 2 * row)
    x7, y7 = viz.GAP + (7 % viz.COLUMNS) * (8 + viz.GAP), row + viz.TITLE_H  # the 8th panel: 2nd row, 2nd column
    assert png.getpixel((x7 + 3, y7 + 3)) == (70, 70, 70)
