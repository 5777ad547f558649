"""DeiT's training augmentation for evit-finetune, with timm's transforms."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image, ImageOps
from torch import nn

import evit

__all__ = ["train_transform"]


def _posterize(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize, keeping 0 bits (a black image, as Pillow before 13 did) where Pillow 13 raises."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(model: nn.Module, aa: str | None, reprob: float) -> Callable:
    """DeiT's training augmentation with timm's transforms at the model's data config.

    timm's RandAugment ("inc1": PosterizeIncreasing) asks for 0 bits at magnitude 10, which DeiT's
    m9-mstd0.5 reaches about once per 40 posterizes; Pillow 13 refuses that and the epoch dies, so the
    posterize ops get ``_posterize``.
    """
    from timm.data import create_transform

    tf = create_transform(**evit.data_config(model), is_training=True, auto_augment=aa, re_prob=reprob)
    for t in getattr(tf, "transforms", []):
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return tf
