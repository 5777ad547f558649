"""Labelled images for the tools, streamed through timm's ``ImageDataset`` and ``create_loader``.

An image folder is an ImageFolder layout (one sub-folder per class, classes indexed in sorted order, empty
folders included) or holds a ``labels.tsv`` (tab-separated, header row, columns ``filename`` and
``class_index``). Only the (path, class) list lives in memory; pixels are decoded batch by batch, by
``-j`` worker processes, so memory does not grow with the number of images.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import ImageDataset, create_loader
from timm.data.readers.reader import Reader
from torch import nn

import evit

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def load_labels(folder: Path) -> list[tuple[Path, int]]:
    """(image path, class index) pairs from ``labels.tsv`` if present, else an ImageFolder layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    tsv = folder / "labels.tsv"
    items = _read_tsv(folder, tsv) if tsv.exists() else _read_tree(folder)
    if not items:
        raise ValueError(f"no labelled images in {folder} (need labels.tsv or one sub-folder per class)")
    return items


def _read_tsv(folder: Path, tsv: Path) -> list[tuple[Path, int]]:
    with tsv.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not {"filename", "class_index"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{tsv} needs a header row with columns 'filename' and 'class_index'")
        items = []
        for line, row in enumerate(reader, start=2):
            path = folder / row["filename"]
            if not path.is_file():
                raise ValueError(f"{tsv}:{line}: no file {row['filename']!r}")
            try:
                items.append((path, int(row["class_index"])))
            except ValueError:
                raise ValueError(f"{tsv}:{line}: class_index {row['class_index']!r} is not an integer") from None
    return items


def _read_tree(folder: Path) -> list[tuple[Path, int]]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir())
    return [
        (p, index)
        for index, d in enumerate(classes)
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]


class LabelsReader(Reader):
    """A timm dataset reader over (path, class index) pairs, so ``ImageDataset`` opens and decodes them."""

    def __init__(self, items: list[tuple[Path, int]]) -> None:
        super().__init__()
        self.samples = items

    def __getitem__(self, index: int) -> tuple:
        path, target = self.samples[index]
        return open(path, "rb"), target  # ImageDataset decodes it, as with timm's folder reader

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        return path.name if basename else str(path.absolute() if absolute else path)


def create_image_loader(
    items: list[tuple[Path, int]], model: nn.Module, batch_size: int, workers: int, device: torch.device,
    prefetch: bool | None = None,
) -> torch.utils.data.DataLoader:
    """timm's eval loader for ``model``'s data config (``evit.data_config``): batches of (B,3,H,W; B).

    ``prefetch`` (default: on CUDA) is timm's prefetching loader (uint8 batches normalized on the device, as
    timm's validate.py); otherwise the plain loader, whose preprocessing is exactly
    ``timm.data.create_transform(**data_config)``.
    """
    prefetch = device.type == "cuda" if prefetch is None else prefetch
    cfg = evit.data_config(model)
    return create_loader(
        ImageDataset("", reader=LabelsReader(items)),
        input_size=cfg["input_size"],
        batch_size=batch_size,
        is_training=False,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        crop_pct=cfg["crop_pct"],
        crop_mode=cfg.get("crop_mode"),
        num_workers=workers,
        device=device,
        use_prefetcher=prefetch,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) on ``device``: B,3,H,W; B."""
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@dataclass
class Source:
    """The images of every pass: timm's loader, re-read each time, or ``cached`` preprocessed images."""

    loader: torch.utils.data.DataLoader | None
    cached: torch.Tensor | None
    batch_size: int
    device: torch.device
    precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.cached is not None:
            for i in range(0, len(self.cached), self.batch_size):
                yield self.cached[i : i + self.batch_size].to(self.device)  # B,3,H,W
        else:
            assert self.loader is not None
            for x, _ in batches(self.loader, self.device):
                yield x


def cached_images(items: list[tuple[Path, int]], model: nn.Module, cache: Path, workers: int) -> torch.Tensor:
    """Preprocessed images (N,3,H,W), from ``cache`` when it holds these files preprocessed the same way."""
    key = {"files": [str(p) for p, _ in items], "config": repr(sorted(evit.data_config(model).items()))}
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved.get("key") == key:
            return saved["images"]
    loader = create_image_loader(items, model, 64, workers, torch.device("cpu"))
    images = torch.cat([x for x, _ in loader])
    torch.save({"key": key, "images": images}, cache)
    return images
