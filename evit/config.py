"""What an EViT forward does besides the weights: ``EViTConfig``, its option names and choices, the
keep-count rule and keep-rate validation. A leaf: it imports nothing from ``evit`` (and no torch), so the
tensor code (``reorganize``, ``blocks``), the cost model and the patch all read it without import cycles.

A *keep rate* is a number in (0, 1] a caller asks for. Under the paper's schedule it is the fraction of
tokens each pruning block keeps; a ``Schedule`` may split it unevenly over the pruning blocks, and with
``match_gmacs`` (e.g. ``evit.ACCURATE``) it names a *cost*: the GMACs the paper's rule spends at that
keep rate, which the schedule's many smaller prunings then match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

FUSE_WEIGHTS = ("attention", "mean")
FUSE_INTO = ("one", "nearest")
RANKINGS = ("block", "cumulative")
# What becomes of the tokens a pruning block does not keep: "one" extra token (the paper), merged into their
# "nearest" kept token, or "drop"ped. Only "one" adds a token.
FUSIONS = ("one", "nearest", "drop")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``, else a ValueError naming the option."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_fusion(fusion: str) -> str:
    return check_choice("fusion", fusion, FUSIONS)


def check_keep_rate(value: object, name: str = "keep_rate") -> float:
    """``value`` as a keep rate: a real number (not a bool) in (0, 1]; else a ValueError naming ``name``.

    The one rule for keep rates everywhere: the library, the CLI flags, the service's settings and API."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 < value <= 1.0  # NaN fails
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def keep_count(keep_rate: float, n: int) -> int:
    """Tokens kept out of ``n``: ``ceil(keep_rate * n)``, at least 1.

    Rounded to 9 decimals first so that float noise (``0.7 * 10 = 7.000000000000001``) cannot keep an
    extra token; for the paper's 196-patch models this equals the official ``math.ceil``.
    """
    return max(1, min(n, math.ceil(round(keep_rate * n, 9))))


def extra_token(fusion: str, kept: int, n: int) -> int:
    """1 if the reorganization of ``n`` tokens keeping ``kept`` adds a fused token, else 0."""
    return 1 if check_fusion(fusion) == "one" and kept < n else 0


@dataclass(frozen=True)
class Schedule:
    """How a requested keep rate is split over the pruning blocks (``EViTConfig.prune_blocks``)."""

    weights: tuple[float, ...] | None = None  # per pruning block, its share of the drop; None: equal shares
    match_gmacs: bool = False  # keep_rate names the paper rule's GMACs at that rate, not a per-stage rate


@dataclass(frozen=True)
class EViTConfig:
    """Everything that decides what an EViT forward does besides the weights; defaults are the paper's rule."""

    prune_blocks: tuple[int, ...]  # 0-based indices into model.blocks (DeiT-S: 3, 6, 9)
    fuse: bool = True  # fuse inattentive tokens into one (False: drop them, the paper's ablation)
    keep_rate: float = 1.0  # default keep rate when a call gives none
    fuse_weight: str = "attention"  # "attention": sum weighted by class attention (official); "mean": weighted mean
    fuse_into: str = "one"  # "one": one extra token (official); "nearest": each into its most similar kept token
    size_attn: bool = False  # proportional attention: log(patches a token stands for) added to its logits
    ranking: str = "block"  # "block": the pruning block's class attention; "cumulative": summed since block 0
    schedule: Schedule = field(default_factory=Schedule)  # how a keep rate is split over prune_blocks

    def __post_init__(self) -> None:
        for name, choices in (("fuse_weight", FUSE_WEIGHTS), ("fuse_into", FUSE_INTO), ("ranking", RANKINGS)):
            check_choice(name, getattr(self, name), choices)
        check_keep_rate(self.keep_rate)
        weights = self.schedule.weights
        if weights is not None and (len(weights) != len(self.prune_blocks) or any(w < 0 for w in weights)):
            raise ValueError(
                f"schedule weights {weights} must be one non-negative number per pruning block {self.prune_blocks}"
            )

    @property
    def fusion(self) -> str:
        """What becomes of the tokens not kept (``FUSIONS``): "one", "nearest" or "drop"."""
        return self.fuse_into if self.fuse else "drop"
