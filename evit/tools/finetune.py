"""`evit-finetune`: fine-tune an EViT model from a pretrained checkpoint, as the EViT paper does.

    torchrun --nproc_per_node 8 -m evit.tools.finetune --model deit_small_patch16_224 --pretrained \\
        --train /data/imagenet/train --val /data/imagenet/val --keep-rate 0.7 --out runs/evit-0.7

The student is the EViT model at the keep rate (fixed, or on the official cosine schedule from 1.0 to the
target); the teacher is the same pretrained model unpruned and frozen, distilled with KL on the logits
(``--distill`` weight, ``--temperature``). AdamW, cosine learning rate with linear warm-up, mixed precision
(bf16, or fp16 with a gradient scaler), DistributedDataParallel under ``torchrun`` (one process without it).
Rank 0 writes, after every epoch, ``model.safetensors`` (timm's keys: ``create_model(checkpoint_path=...)``
and the service load it), ``checkpoint.pth`` (weights, optimizer, scaler, epoch: ``--resume``) and a line
of ``log.jsonl``; ``best.safetensors`` is the epoch with the best validation top-1.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

import evit
from evit.config import check_keep_rate
from evit.tools.augment import train_transform
from evit.tools.cli import add_model_args, add_option_args, blocks, options
from evit.tools.distributed import Dist, amp_dtype


def keep_rate_at(epoch: float, target: float, start_epoch: float, shrink_epochs: float) -> float:
    """The official EViT keep-rate schedule: 1.0 before ``start_epoch``, then a cosine from 1.0 down to
    ``target`` over ``shrink_epochs`` (``epoch`` may be fractional), ``target`` after; 0 epochs: fixed."""
    if shrink_epochs <= 0:
        return target if epoch >= start_epoch else 1.0
    t = (epoch - start_epoch) / shrink_epochs
    if t < 0:
        return 1.0
    if t >= 1:
        return target
    return target + (1.0 - target) * (math.cos(t * math.pi) + 1) / 2


def lr_at(step: int, total: int, warmup: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup`` steps, then a cosine down to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return min_lr + (lr - min_lr) * (math.cos(min(1.0, t) * math.pi) + 1) / 2


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, alpha: float, tau: float, smoothing: float
) -> torch.Tensor:
    """``(1 - alpha) * CE(student, target) + alpha * tau^2 * KL(teacher || student)`` at temperature ``tau``.

    target: B class indices, or B, classes soft targets (mixup / cutmix).
    """
    if target.ndim == 2:
        ce = torch.sum(-target * F.log_softmax(student, dim=-1), dim=-1).mean()
    else:
        ce = F.cross_entropy(student, target, label_smoothing=smoothing)
    if alpha == 0:
        return ce
    kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), reduction="batchmean",
                  log_target=True)
    return (1 - alpha) * ce + alpha * tau * tau * kl


def loaders(args: argparse.Namespace, model: nn.Module, d: Dist) -> tuple[DataLoader, DataLoader | None]:
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    cfg = evit.data_config(model)
    train_tf = train_transform(model, args.aa, args.reprob)
    # class index = position of the folder in sorted order, empty folders included: a subset of the classes
    # (folders 0000..0999 with some empty) keeps the pretrained head's indices
    train = ImageFolder(str(args.train), transform=train_tf, allow_empty=True)
    sampler = DistributedSampler(train, d.world, d.rank, shuffle=True, seed=args.seed, drop_last=True)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=d.device.type == "cuda")
    train_loader = DataLoader(train, sampler=sampler, drop_last=True, persistent_workers=args.workers > 0, **kw)
    if not args.val:
        return train_loader, None
    val = ImageFolder(str(args.val), transform=create_transform(**cfg, is_training=False), allow_empty=True)
    val_sampler = DistributedSampler(val, d.world, d.rank, shuffle=False)  # pads to equal shards
    return train_loader, DataLoader(val, sampler=val_sampler, **kw)


@torch.inference_mode()
def validate(model: nn.Module, loader: DataLoader, keep_rate: float, d: Dist, autocast) -> float:
    model.eval()
    correct = seen = 0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with autocast():
            correct += (model(x, keep_rate=keep_rate).argmax(-1) == y).sum().item()
        seen += len(y)
    model.train()
    correct, seen = d.mean([correct, seen])
    return correct / max(seen, 1)


def save(path: Path, model: nn.Module) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, position embedding and prefix tokens (timm's convention)."""
    skip = set(getattr(model, "no_weight_decay", dict)())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(args: argparse.Namespace) -> dict:
    """Fine-tune; returns the last epoch's log line."""
    from timm.data import Mixup

    d = Dist(args.device)
    torch.manual_seed(args.seed)
    model = evit.create_model(args.model, pretrained=args.pretrained, checkpoint_path=args.checkpoint,
                              prune_blocks=args.prune_blocks, fuse=not args.no_fuse, **options(args),
                              **args.model_kwargs)
    teacher = copy.deepcopy(model).eval().requires_grad_(False).to(d.device) if args.distill > 0 else None
    model.to(d.device).train()
    train_loader, val_loader = loaders(args, model, d)
    per_epoch = len(train_loader)
    if per_epoch == 0:
        raise ValueError(f"{args.train} has fewer images than one batch per process ({args.batch_size})")
    total = args.epochs * per_epoch if not args.max_steps else min(args.epochs * per_epoch, args.max_steps)
    lr = args.lr * args.batch_size * d.world / 512  # --lr is per 512 images, as DeiT / EViT scale it
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=lr)
    dtype = amp_dtype(args.amp, d.device)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)

    def autocast():
        return torch.autocast(d.device.type, dtype=dtype, enabled=dtype is not None)

    net = nn.parallel.DistributedDataParallel(model, device_ids=[d.device] if d.device.type == "cuda" else None) \
        if d.world > 1 else model
    start, step, best = 0, 0, -1.0
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start, step, best = state["epoch"] + 1, state["step"], state["best_top1"]
    mixup = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                      num_classes=model.num_classes)
    out = Path(args.out)
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    line: dict = {}
    for epoch in range(start, args.epochs):
        if step >= total:
            break
        train_loader.sampler.set_epoch(epoch)
        t0, losses, keep = time.perf_counter(), [], 1.0
        for i, (x, y) in enumerate(train_loader):
            if step >= total:
                break
            keep = keep_rate_at(epoch + i / per_epoch, args.keep_rate, args.shrink_start_epoch, args.shrink_epochs)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.warmup_epochs * per_epoch, lr, args.min_lr)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            if mixup is not None:
                x, y = mixup(x, y)
            with autocast():
                with torch.no_grad():
                    soft = teacher(x, keep_rate=1.0).float() if teacher is not None else None
                logits = net(x, keep_rate=keep).float()
            loss = distill_loss(logits, soft, y, args.distill, args.temperature, args.smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(opt)
            scaler.update()
            step += 1
            losses.append(loss.item())
            if d.main and args.log_every and step % args.log_every == 0:
                with (out / "steps.jsonl").open("a") as f:
                    f.write(json.dumps({"step": step, "loss": losses[-1], "keep_rate": keep,
                                        "lr": opt.param_groups[0]["lr"]}) + "\n")
        seconds = time.perf_counter() - t0
        (train_loss,) = d.mean([sum(losses) / max(len(losses), 1)])
        top1 = validate(model, val_loader, args.keep_rate, d, autocast) if val_loader is not None else None
        line = {"epoch": epoch, "step": step, "keep_rate": keep, "lr": opt.param_groups[0]["lr"],
                "train_loss": train_loss, "val_top1": top1, "seconds": seconds,
                "images_per_second": len(losses) * args.batch_size * d.world / seconds}
        if d.main:
            if top1 is not None and top1 > best:
                best = top1
                save(out / "best.safetensors", model)
            save(out / "model.safetensors", model)
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "epoch": epoch, "step": step, "best_top1": best, "args": _jsonable(vars(args))},
                       out / "checkpoint.pth")
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)
    d.close()
    return line


def _jsonable(values: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items()}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evit-finetune", description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    add_model_args(p, "pretrained .pth/.pt/.safetensors to start from")
    p.add_argument("--train", type=Path, required=True, help="ImageFolder: one sub-folder per class")
    p.add_argument("--val", type=Path, help="ImageFolder for top-1 after each epoch (same classes)")
    p.add_argument("--keep-rate", type=float, default=0.7, help="target keep rate")
    p.add_argument("--shrink-start-epoch", type=float, default=0, help="keep rate 1.0 before this epoch")
    p.add_argument("--shrink-epochs", type=float, default=0, help="cosine from 1.0 to the target (0: fixed)")
    p.add_argument("--prune-blocks", type=blocks, help="0-based block indices (default: the paper's)")
    p.add_argument("--no-fuse", action="store_true")
    add_option_args(p)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="per process")
    p.add_argument("--lr", type=float, default=2e-5, help="per 512 images of global batch (scaled linearly)")
    p.add_argument("--min-lr", type=float, default=2e-6)
    p.add_argument("--warmup-epochs", type=float, default=0)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--clip-grad", type=float)
    p.add_argument("--distill", type=float, default=0.5, help="weight of the KL to the unpruned teacher (0: off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--mixup", type=float, default=0.8)
    p.add_argument("--cutmix", type=float, default=1.0)
    p.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm auto-augment policy ('none': off)")
    p.add_argument("--reprob", type=float, default=0.25, help="random erasing probability")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto", help="auto: bf16/fp16 on CUDA")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is there, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", type=Path, help="checkpoint.pth to continue from")
    p.add_argument("--log-every", type=int, default=50, help="steps between lines of steps.jsonl")
    p.add_argument("--out", type=Path, default=Path("runs/finetune"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.aa in ("", "none"):
        args.aa = None
    try:
        check_keep_rate(args.keep_rate, "--keep-rate")
        train(args)
    except (ValueError, OSError, evit.WeightsError) as exc:
        print(f"evit-finetune: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
