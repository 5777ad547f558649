"""``python -m benchmarks.decode``: the service's JPEG decode + preprocessing, PIL (draft mode) against
``torchvision.io.decode_jpeg`` with torch's resize (``--jpeg-torchvision``), on the sample images.

Both produce the model input (timm's eval transform for ViT-Ti: shorter side to 248, bicubic, centre crop
224, normalise); the torchvision path takes the JPEGs that draft mode would not shrink, PIL the rest.
Reports, alternating the two paths over the images in rounds: wall and CPU milliseconds per image from
``--threads`` decode threads (CPU: the process's, so OpenMP teams that torch ops start in those threads
count), the largest pixel difference, and how often the eager EViT model at keep 0.7 gives the same top-1
class on the two inputs. Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import evit
from benchmarks.servers import ROOT
from benchmarks.service import ASSET_IMAGES
from service.images import ImageLimits, Preprocessor, check_formats
from service.settings import ASSET_CHECKPOINT


def timed(fn: Callable[[bytes], torch.Tensor], images: list[bytes], threads: int) -> tuple[float, float]:
    """Wall and process-CPU milliseconds per image, decoding ``images`` on ``threads`` threads."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, images[:threads]))  # threads started
        wall, cpu = time.perf_counter(), time.process_time()
        list(pool.map(fn, images))
        return 1000 * (time.perf_counter() - wall) / len(images), 1000 * (time.process_time() - cpu) / len(images)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.decode", description=__doc__.splitlines()[0])
    p.add_argument("--images", type=Path, default=ASSET_IMAGES)
    p.add_argument("--checkpoint", type=Path, default=ROOT / ASSET_CHECKPOINT)
    p.add_argument("--threads", type=int, default=2, help="decode threads (the service's default on 2 cores)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    images = [f.read_bytes() for f in sorted(args.images.glob("*.JPEG"))]
    model = evit.create_model("vit_tiny_patch16_224", checkpoint_path=str(args.checkpoint), keep_rate=0.7).eval()
    config = evit.data_config(model)
    formats = check_formats(["JPEG"])
    paths = {"pil": Preprocessor(config, ImageLimits(10**8, formats, jpeg_torchvision=False)),
             "torchvision": Preprocessor(config, ImageLimits(10**8, formats, jpeg_torchvision=True))}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, fn in paths.items():
            times[name].append(timed(fn, images, args.threads))
    for name, ts in times.items():
        wall, cpu = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"{name:14s} {wall:6.2f} ms wall/image  {cpu:6.2f} ms CPU/image  ({args.threads} threads, "
              f"median of {args.rounds} rounds, {len(images)} images)")
    same, diff = 0, 0.0
    with torch.inference_mode():
        for start in range(0, len(images), 50):
            chunk = images[start:start + 50]
            a = torch.stack([paths["pil"](b) for b in chunk])
            b = torch.stack([paths["torchvision"](b) for b in chunk])
            diff = max(diff, float((a - b).abs().max()))
            same += int((model(a).argmax(-1) == model(b).argmax(-1)).sum())
    print(f"max |pixel difference| {diff:.3f} (normalised units); same top-1 on {same}/{len(images)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
