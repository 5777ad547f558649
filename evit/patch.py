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
from typing import Any

import torch
from torch import nn

from evit.blocks import Packed, Tracker, group_views, run_block
from evit.config import FUSE_INTO, FUSE_WEIGHTS, RANKINGS, EViTConfig, Schedule, check_keep_rate
from evit.cost import Cost, CostSpec, model_cost, rate_tokens
from evit.reorganize import Group, Side, plan_groups
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


@dataclass
class _Tokens:
    """A forward's final tokens, samples in keep-rate order."""

    x: torch.Tensor  # T, C: packed by group, after the final norm
    groups: list[Group]
    perm: torch.Tensor | None  # keep-rate order -> batch position (None: already in batch order)
    tokens: torch.Tensor  # B: tokens the blocks processed per sample (keep-rate order)
    kept: list[torch.Tensor] | None  # per stage, B, num_patches (keep-rate order)


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

        x: B, C, H, W. keep_rate: a float, or one rate per sample (samples with different rates share the
        batch; each gets the logits it would get alone).
        """
        run = self._forward_tokens(x, keep_rate, return_kept)
        logits = torch.cat([self.forward_head(v) for v in group_views(run.x, run.groups)])  # B, classes (sorted)
        tokens, kept = run.tokens, run.kept
        if run.perm is not None:
            inv = torch.argsort(run.perm)
            logits = logits.index_select(0, inv)
            tokens = tokens.index_select(0, inv.cpu())
            kept = [k.index_select(0, inv) for k in kept] if kept else kept
        return EViTOutput(logits=logits, tokens=tokens, kept=kept)

    def forward_features(self, x: torch.Tensor, keep_rate: KeepRate = None) -> torch.Tensor:
        """timm's ``forward_features`` with pruning: the final (normed) tokens, B, N', C, at ``keep_rate``
        (default: the model's), so ``forward_head(forward_features(x, r))`` equals ``forward(x, r)``.

        Every sample must end with the same number of tokens (one keep rate for the batch, or rates that
        keep equal counts); otherwise a ValueError: use ``forward_with_info`` for mixed rates."""
        run = self._forward_tokens(x, keep_rate, False)
        if len(run.groups) != 1:
            counts = sorted({g.tokens for g in run.groups})
            raise ValueError(f"forward_features returns one B, N, C tensor, but these keep rates leave samples "
                             f"with {counts} tokens; call it per keep rate, or use forward_with_info")
        g = run.groups[0]
        feats = run.x.view(g.size, g.tokens, -1)  # B, N', C
        return feats if run.perm is None else feats.index_select(0, torch.argsort(run.perm))

    def forward_intermediates(self, x: torch.Tensor, *args: Any, keep_rate: KeepRate = None,
                              **kwargs: Any) -> Any:
        """timm's ``forward_intermediates``, only where EViT prunes nothing (e.g. ``keep_rate=1.0``): its
        intermediates are spatial maps of every patch, which pruned blocks no longer have. Raises otherwise."""
        rates = set(resolve_keep_rates(keep_rate, x.shape[0], self.evit_cfg.keep_rate))
        spec = CostSpec.from_model(self)
        pruning = sorted(r for r in rates
                         if _pruning_blocks(self.num_patches, self.num_prefix_tokens, self.block_rates(r, spec),
                                            self.evit_cfg.fusion))
        if pruning:
            raise NotImplementedError(
                f"forward_intermediates of an EViT model cannot prune (timm's intermediates are maps of every "
                f"patch), and keep rate {pruning[0]} prunes; pass keep_rate=1.0 for the unpruned model, or use "
                "forward_with_info(x, keep_rate, return_kept=True) / forward_features(x, keep_rate)")
        return super().forward_intermediates(x, *args, **kwargs)  # type: ignore[misc]

    def _forward_tokens(self, x: torch.Tensor, keep_rate: KeepRate, return_kept: bool) -> _Tokens:
        """The blocks with reorganization at the pruning blocks, then the final norm; samples in keep-rate order."""
        cfg, P = self.evit_cfg, self.num_prefix_tokens
        B = x.shape[0]
        rates = resolve_keep_rates(keep_rate, B, cfg.keep_rate)
        rate_t = torch.tensor(rates, dtype=torch.float64)
        uniq, counts = torch.unique(rate_t, sorted=True, return_counts=True)
        uniq_rates = uniq.tolist()
        perm = None if len(uniq) == 1 else torch.argsort(rate_t, stable=True).to(x.device)
        spec = CostSpec.from_model(self)  # read once per forward, not once per keep rate
        plan = {r: self.block_rates(r, spec) for r in uniq_rates}  # requested rate -> keep rate per block
        pruned = {r: self.class_row_blocks(plan[r]) for r in uniq_rates}

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
        per_sample = torch.tensor([tokens[r] for r in uniq_rates]).repeat_interleave(counts)
        return _Tokens(self.norm(packed.x), packed.groups, perm, per_sample, tracker.kept if tracker else None)

    def block_rates(self, keep_rate: float | None = None, spec: CostSpec | None = None) -> tuple[float, ...]:
        """The keep rate of every block (1.0 where it does not prune) for a requested keep rate.

        ``spec``: this model's ``CostSpec`` when the caller has it already (default: read from the model)."""
        cfg = self.evit_cfg
        rate = cfg.keep_rate if keep_rate is None else float(keep_rate)
        resolve_keep_rates(rate, 1, 1.0)
        spec = spec or CostSpec.from_model(self)
        return block_rates(spec, cfg.prune_blocks, cfg.schedule, cfg.fusion, cfg.ranking == "cumulative", rate)

    def class_row_blocks(self, rates: tuple[float, ...]) -> set[int]:
        """The blocks where a sample with these per-block keep rates (``block_rates``) needs the class token's
        attention row: where it prunes (cumulative ranking: every block up to the last that prunes)."""
        cfg = self.evit_cfg
        pruned = _pruning_blocks(self.num_patches, self.num_prefix_tokens, rates, cfg.fusion)
        return set(range(max(pruned) + 1)) if cfg.ranking == "cumulative" and pruned else pruned

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
