"""evit-finetune: the schedules and the loss by hand, and a smoke run on generated images with a tiny model
(loss decreases, the keep rate follows its cosine, checkpoints load with create_model, resume, torchrun)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _tiny import TINY
from PIL import Image

import evit
from evit.tools.finetune import distill_loss, keep_rate_at, lr_at
from evit.tools.finetune import main as finetune

ARCH = "vit_tiny_patch16_224"


def test_keep_rate_schedule_is_the_official_cosine():
    assert keep_rate_at(0.0, 0.7, start_epoch=10, shrink_epochs=100) == 1.0
    assert keep_rate_at(9.99, 0.7, 10, 100) == 1.0
    assert keep_rate_at(10.0, 0.7, 10, 100) == 1.0
    assert keep_rate_at(60.0, 0.7, 10, 100) == pytest.approx(0.85)  # half-way: the mean of 1.0 and 0.7
    assert keep_rate_at(35.0, 0.7, 10, 100) == pytest.approx(0.7 + 0.3 * (math.cos(math.pi / 4) + 1) / 2)
    assert keep_rate_at(110.0, 0.7, 10, 100) == keep_rate_at(300.0, 0.7, 10, 100) == 0.7
    assert keep_rate_at(0.0, 0.5, 0, 0) == 0.5  # fixed, as the official fine-tuning recipe runs


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def test_distill_loss_by_hand():
    student = torch.tensor([[2.0, 0.0, 0.0]])
    target = torch.tensor([0])
    ce = F.cross_entropy(student, target).item()
    assert distill_loss(student, None, target, 0.0, 1.0, 0.0).item() == pytest.approx(ce)
    # the teacher agrees exactly: the KL term is zero and only (1 - alpha) of the CE is left
    assert distill_loss(student, student, target, 0.5, 2.0, 0.0).item() == pytest.approx(0.5 * ce)
    teacher = torch.tensor([[0.0, 0.0, 0.0]])  # uniform: KL(u || p) = -log 3 - mean(log p)
    p = student.log_softmax(-1)
    kl = (-math.log(3) - p.mean()).item()
    assert distill_loss(student, teacher, target, 1.0, 1.0, 0.0).item() == pytest.approx(kl)
    soft = torch.tensor([[0.5, 0.5, 0.0]])  # mixup targets
    assert distill_loss(student, None, soft, 0.0, 1.0, 0.0).item() == pytest.approx(-(0.5 * p[0, 0] + 0.5 * p[0, 1]))


def make_dataset(root: Path, per_class: int, seed: int) -> Path:
    """Three classes told apart by their dominant colour, plus noise: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    for c in range(3):
        folder = root / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 90, (32, 32, 3))
            img[..., c] += 160
            Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    torch.manual_seed(0)
    start = root / "pretrained.pth"
    torch.save(evit.create_model(ARCH, **TINY).state_dict(), start)
    return root, start, make_dataset(root / "train", 12, 0), make_dataset(root / "val", 3, 1)


def args_for(data, out: Path, *extra: str) -> list[str]:
    _, start, train, val = data
    return ["--model", ARCH, "--checkpoint", str(start), "--train", str(train), "--val", str(val),
            "--model-kwargs", json.dumps(TINY), "--batch-size", "8", "--lr", "0.064", "--min-lr", "1e-4",
            "--weight-decay", "0.05", "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0",
            "--smoothing", "0", "--amp", "none", "--workers", "0", "--log-every", "1", "--out", str(out), *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_smoke_loss_decreases_and_checkpoints_round_trip(data, tmp_path):
    out = tmp_path / "run"
    extra = ["--epochs", "4", "--keep-rate", "0.5", "--shrink-epochs", "2", "--distill", "0.5"]
    assert finetune(args_for(data, out, *extra)) == 0
    steps, epochs = read_jsonl(out / "steps.jsonl"), read_jsonl(out / "log.jsonl")
    assert len(steps) == 4 * 4 and [e["epoch"] for e in epochs] == [0, 1, 2, 3]  # 36 images / batch 8
    losses = [s["loss"] for s in steps]
    # the teacher is the random "pretrained" model: its KL term keeps the loss from reaching 0
    assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), losses
    rates = [s["keep_rate"] for s in steps]
    assert rates[0] == 1.0 and rates == sorted(rates, reverse=True) and rates[-8:] == [0.5] * 8
    assert epochs[-1]["val_top1"] >= 0.9  # three colours, chance is 1/3

    trained = evit.create_model(ARCH, checkpoint_path=out / "model.safetensors", **TINY).eval()
    from_pth = evit.create_model(ARCH, checkpoint_path=out / "checkpoint.pth", **TINY).eval()
    start = evit.create_model(ARCH, checkpoint_path=data[1], **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(trained(x, keep_rate=0.5), from_pth(x, keep_rate=0.5))
        assert not torch.allclose(trained(x, keep_rate=0.5), start(x, keep_rate=0.5), atol=1e-3)
    assert (out / "best.safetensors").exists()

    # resume: one more epoch continues the step count and the log
    assert finetune(args_for(data, out, *extra[:1], "5", *extra[2:], "--resume", str(out / "checkpoint.pth"))) == 0
    epochs = read_jsonl(out / "log.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3, 4] and epochs[-1]["step"] == 5 * 4


def test_bad_arguments(data, tmp_path, capsys):
    assert finetune(args_for(data, tmp_path / "a", "--keep-rate", "0")) == 2
    assert "keep-rate" in capsys.readouterr().err
    assert finetune(args_for(data, tmp_path / "b", "--batch-size", "64")) == 2  # 36 images: not one batch
    assert "fewer images than one batch" in capsys.readouterr().err


def test_torchrun_two_processes_bf16(data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "evit.tools.finetune",
           *args_for(data, out, "--epochs", "1", "--batch-size", "4", "--amp", "bf16", "--accurate")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (epoch,) = read_jsonl(out / "log.jsonl")
    assert epoch["step"] == 36 // (2 * 4)  # each process sees half of the images per epoch (nearest fusion, DDP)
    evit.create_model(ARCH, checkpoint_path=out / "model.safetensors", **TINY)


def test_randaugment_posterize_to_zero_bits_does_not_kill_the_epoch():
    """timm's RandAugment asks for 0 bits at magnitude 10 (DeiT's m9-mstd0.5 gets there); Pillow 13 refuses."""
    import random

    import PIL
    from PIL import Image
    from timm.data import create_transform

    from evit.tools.augment import train_transform

    model = evit.create_model(ARCH, **TINY)
    policy = "rand-m10-n4-mstd0-inc1"  # magnitude 10 every time: posterize keeps 0 bits
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    random.seed(0)
    np.random.seed(0)
    tf = train_transform(model, policy, 0.0)
    out = [tf(img) for _ in range(60)]  # 240 ops of 15: posterize many times
    assert all(o.shape == (3, 32, 32) and torch.isfinite(o).all() for o in out)
    if int(PIL.__version__.split(".")[0]) >= 13:  # what the fix is for: timm's own op raises
        raw = create_transform(**evit.data_config(model), is_training=True, auto_augment=policy, re_prob=0.0)
        with pytest.raises(ValueError, match="bits"):
            for _ in range(60):
                raw(img)
