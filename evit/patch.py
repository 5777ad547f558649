"""The thin layer over timm: run a timm ViT's own blocks with EViT reorganization at a few of them.

``apply_patch(model)`` swaps the class of a timm ``VisionTransformer`` (or a subclass: distilled, register
tokens, ...) for a subclass whose ``forward`` takes a keep rate, as ToMe does. Parameters, state-dict keys,
``forward_head`` and the pretrained config are timm's. Blocks must follow timm's ``Block`` layout
(norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2) with a fused-qkv ``Attention``; ``evit.blocks``
runs them on packed tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from evit.blocks import Packed, Tracker, group_views, run_block
from evit.config import FUSE_INTO, FUSE_WEIGHTS, RANKINGS, EViTConfig, Schedule, check_keep_rate
from evit.cost import Cost, CostSpec, model_cost, rate_tokens
from evit.reorganize import Side, plan_groups
from evit.schedule import Plan, block_rates, default_prune_blocks, plan_for_gmacs, preset

KeepRate = float | Sequence[float] | torch.Tensor | None

__all__ = ["FUSE_INTO", "FUSE_WEIGHTS", "RANKINGS", "EViTConfig", "EViTMixin", "EViTOutput", "apply_patch",
           "default_prune_blocks", "resolve_keep_rates"]

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
_ATTN_PARTS = ("qkv", "q_norm", "k_norm", "proj", "num_heads", "head_dim", "scale")


@dataclass
class EViTOutput:
    logits: torch.Tensor  # B, num_classes
    tokens: torch.Tensor  # B: tokens the blocks processed per sample, summed over blocks
    kept: list[torch.Tensor] | None = None  # per stage, B, num_patches: patch still its own token


def resolve_keep_rates(keep_rate: KeepRate, batch_size: int, default: float) -> list[float]:
    """One float keep rate per sample, validated: each in (0, 1]."""
    if keep_rate is None:
        keep_rate = default
    if isinstance(keep_rate, int | float):
        rates = [float(keep_rate)] * batch_size
    else:
        t = torch.as_tensor(keep_rate, dtype=torch.float64).detach().cpu()
        if t.ndim != 1 or t.numel() != batch_size:
            raise ValueError(
                f"keep_rate must be a float or a 1-D sequence with one rate per sample "
                f"({batch_size}), got shape {tuple(t.shape)}"
            )
        rates = t.tolist()
    return [check_keep_rate(r) for r in rates]


class EViTMixin:
    """Methods added to a timm ViT by ``apply_patch``; ``forward`` takes a per-call or per-sample keep rate."""

    evit_cfg: EViTConfig

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward(self, x: torch.Tensor, keep_rate: KeepRate = None) -> torch.Tensor:
        return self.forward_with_info(x, keep_rate).logits

    def forward_with_info(
        self, x: torch.Tensor, keep_rate: KeepRate = None, return_kept: bool = False
    ) -> EViTOutput:
        """Logits, tokens processed per sample and, if asked, which patches each stage kept.

        x: B, 3, H, W. keep_rate: a float, or one rate per sample (samples with different rates share the
        batch; each gets the logits it would get alone).
        """
        cfg, P = self.evit_cfg, self.num_prefix_tokens
        B = x.shape[0]
        rates = resolve_keep_rates(keep_rate, B, cfg.keep_rate)
        rate_t = torch.tensor(rates, dtype=torch.float64)
        uniq, counts = torch.unique(rate_t, sorted=True, return_counts=True)
        uniq_rates = uniq.tolist()
        perm = None if len(uniq) == 1 else torch.argsort(rate_t, stable=True).to(x.device)
        spec = CostSpec.from_model(self)  # read once per forward, not once per keep rate
        plan = {r: self.block_rates(r, spec) for r in uniq_rates}  # requested rate -> keep rate per block
        # blocks where each sample needs the class row: where it prunes (cumulative ranking: up to the last)
        pruned = {r: _pruning_blocks(self.num_patches, P, plan[r], cfg.fusion) for r in uniq_rates}
        if cfg.ranking == "cumulative":
            pruned = {r: set(range(max(b) + 1)) if b else b for r, b in pruned.items()}

        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))  # B, N, C
        if perm is not None:
            x = x.index_select(0, perm)
        n = x.shape[1] - P
        ids = torch.arange(n, device=x.device).expand(B, -1) if return_kept else None
        groups = plan_groups(list(zip(uniq_rates, counts.tolist(), strict=True)), P + n)
        packed = Packed(x.reshape(-1, x.shape[-1]), groups, [Side(ids=ids)])  # T, C: packed
        tracker = Tracker(n) if return_kept else None
        tokens = dict.fromkeys(uniq_rates, 0)
        for i, blk in enumerate(self.blocks):
            for g in packed.groups:
                for rate, _ in g.rates:
                    tokens[rate] += g.tokens
            stage = {r: plan[r][i] for r in uniq_rates}
            need = [any(i in pruned[r] for r, _ in g.rates) for g in packed.groups]
            packed = run_block(blk, packed, i in cfg.prune_blocks, stage, need, P, cfg, tracker)
        x = self.norm(packed.x)
        logits = torch.cat([self.forward_head(v) for v in group_views(x, packed.groups)])  # B, classes (sorted)
        per_sample = torch.tensor([tokens[r] for r in uniq_rates]).repeat_interleave(counts)
        kept = tracker.kept if tracker else None
        if perm is not None:
            inv = torch.argsort(perm)
            logits = logits.index_select(0, inv)
            per_sample = per_sample.index_select(0, inv.cpu())
            kept = [k.index_select(0, inv) for k in kept] if kept else kept
        return EViTOutput(logits=logits, tokens=per_sample, kept=kept)

    def block_rates(self, keep_rate: float | None = None, spec: CostSpec | None = None) -> tuple[float, ...]:
        """The keep rate of every block (1.0 where it does not prune) for a requested keep rate.

        ``spec``: this model's ``CostSpec`` when the caller has it already (default: read from the model)."""
        cfg = self.evit_cfg
        rate = cfg.keep_rate if keep_rate is None else float(keep_rate)
        resolve_keep_rates(rate, 1, 1.0)
        spec = spec or CostSpec.from_model(self)
        return block_rates(spec, cfg.prune_blocks, cfg.schedule, cfg.fusion, cfg.ranking == "cumulative", rate)

    def stage_rates(self, keep_rate: float | None = None) -> tuple[float, ...]:
        """What each pruning block (``evit_cfg.prune_blocks``) keeps for a requested keep rate."""
        rates = self.block_rates(keep_rate)
        return tuple(rates[b] for b in self.evit_cfg.prune_blocks)

    def cost(self, keep_rate: float | None = None) -> Cost:
        """Tokens per block and GMACs per image at ``keep_rate`` (default: the model's)."""
        return model_cost(self, self.evit_cfg.keep_rate if keep_rate is None else keep_rate)

    def schedule_for_gmacs(self, gmacs: float) -> Plan:
        """The keep rate to request so that a forward costs at most ``gmacs`` per image, with what each
        pruning block then keeps; ValueError if the budget is below the cheapest the schedule runs."""
        return plan_for_gmacs(gmacs, self.cost, self.stage_rates)


def _pruning_blocks(num_patches: int, num_prefix_tokens: int, rates: tuple[float, ...], fusion: str) -> set[int]:
    """The blocks where a sample with these per-block keep rates drops tokens."""
    blocks = rate_tokens(num_patches, num_prefix_tokens, rates, fusion)
    return {i for i, (_, _, pruned) in enumerate(blocks) if pruned}


_PATCHED: dict[type, type] = {}


def _check_compatible(model: nn.Module) -> None:
    if getattr(model, "cls_token", None) is None:
        raise ValueError(
            f"EViT ranks tokens by the class token's attention, but {type(model).__name__} has no class token "
            "(class_token=False / global_pool without a class token); use a ViT with a class token"
        )
    for i, blk in enumerate(getattr(model, "blocks", [])):
        missing = [p for p in _BLOCK_PARTS if not hasattr(blk, p)]
        missing += [f"attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(blk, "attn", None), p)]
        if missing or not isinstance(blk.attn.qkv, nn.Linear):
            raise ValueError(
                f"block {i} ({type(blk).__name__}/{type(getattr(blk, 'attn', None)).__name__}) does not follow "
                f"timm's Block/Attention layout (missing {missing or ['fused qkv Linear']}); EViT cannot patch it"
            )


def apply_patch(
    model: nn.Module,
    prune_blocks: Sequence[int] | None = None,
    fuse: bool = True,
    keep_rate: float = 1.0,
    schedule: str | Schedule = "paper",
    fuse_weight: str = "attention",
    size_attn: bool = False,
    ranking: str = "block",
    fuse_into: str = "one",
) -> nn.Module:
    """Make a timm ViT an EViT model in place: same parameters, ``forward(x, keep_rate)``.

    ``schedule``: a preset name (``evit.schedule.PRESETS``: "paper", "every", "every-from-3") that gives the
    pruning blocks and how a keep rate is split over them, or a ``Schedule`` for ``prune_blocks``; explicit
    ``prune_blocks`` override a preset's. The other options are ``EViTConfig``'s; every default is the paper's rule.
    """
    _check_compatible(model)
    depth = len(model.blocks)
    if isinstance(schedule, str):
        preset_blocks, schedule = preset(schedule, depth)
    else:
        preset_blocks = default_prune_blocks(depth)
    blocks = preset_blocks if prune_blocks is None else tuple(sorted(set(prune_blocks)))
    if any(not 0 <= b < depth for b in blocks):
        raise ValueError(f"prune_blocks {blocks} must be 0-based block indices in [0, {depth})")
    resolve_keep_rates(keep_rate, 1, 1.0)
    base = type(model)
    if issubclass(base, EViTMixin):
        base = base.__mro__[2]
    if base not in _PATCHED:
        _PATCHED[base] = type(f"EViT{base.__name__}", (EViTMixin, base), {})
    cfg = EViTConfig(blocks, fuse, float(keep_rate), fuse_weight, fuse_into, size_attn, ranking, schedule)  # validates
    model.__class__ = _PATCHED[base]
    model.evit_cfg = cfg
    return model
