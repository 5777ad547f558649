"""An EViT forward at a fixed keep rate as an ONNX graph with a dynamic batch axis, for compiled backends.

At a fixed keep rate every sample keeps the same tokens per block, so the graph is static except for the
batch: ``FixedRate`` runs the model's own blocks (``evit.blocks.run_block``) on one group whose size is the
traced batch dimension. ``export_onnx`` writes it with the TorchScript exporter (opset 17). A plain timm
model (or keep rate 1.0) exports the same way and is the baseline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from evit.blocks import Packed, group_views, run_block
from evit.patch import EViTMixin, resolve_keep_rates
from evit.reorganize import Side, plan_groups

__all__ = ["OPSET", "FixedRate", "export_onnx"]

OPSET = 17


class FixedRate(nn.Module):
    """``model`` (an EViT model) at one keep rate: ``forward(x) -> logits`` (B, classes), batch-agnostic."""

    def __init__(self, model: nn.Module, keep_rate: float) -> None:
        super().__init__()
        if not isinstance(model, EViTMixin):
            raise TypeError(f"FixedRate needs an EViT model (evit.create_model / apply_patch), got {type(model)}")
        resolve_keep_rates(keep_rate, 1, 1.0)
        self.model = model
        self.keep_rate = float(keep_rate)
        self._plan = model.block_rates(self.keep_rate)  # keep rate per block
        self._need_cls = model.class_row_blocks(self._plan)
        self._plain = not self._need_cls  # nothing is pruned (keep 1.0): timm's own forward, timm's own graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # B, 3, H, W -> B, classes
        m, r = self.model, self.keep_rate
        if self._plain:  # timm's forward_features body with timm's own blocks, whatever the patch overrides
            x = m.norm(m.blocks(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))))  # B, N, C
            return m.forward_head(x)
        cfg, P = m.evit_cfg, m.num_prefix_tokens
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))  # B, N, C
        B, N = x.shape[0], P + m.num_patches  # B traced (a dynamic axis of the graph), N a constant
        packed = Packed(x.reshape(-1, x.shape[-1]), plan_groups([(r, B)], N), [Side()])  # T, C
        for i, blk in enumerate(m.blocks):
            need = [i in self._need_cls] * len(packed.groups)
            packed = run_block(blk, packed, i in cfg.prune_blocks, {r: self._plan[i]}, need, P, cfg, None)
        x = m.norm(packed.x)
        (view,) = group_views(x, packed.groups)  # one group: every sample keeps the same tokens
        return m.forward_head(view)


def export_onnx(model: nn.Module, path: str | Path, keep_rate: float | None = None, opset: int = OPSET) -> Path:
    """Write ``model`` as ONNX (input ``x``: B, 3, H, W float32; output ``logits``), batch axis dynamic.

    ``model``: an EViT model, run at ``keep_rate`` (default: its configured one), or any plain module
    (``keep_rate`` must then be None). The model should be float32 and in eval mode; a backend picks the
    precision when it compiles the graph.
    """
    path = Path(path)
    if isinstance(model, EViTMixin):
        module = FixedRate(model, model.evit_cfg.keep_rate if keep_rate is None else keep_rate)
    elif keep_rate is not None:
        raise TypeError("keep_rate needs an EViT model; a plain timm model runs every token")
    else:
        module = model
    size = model.patch_embed.proj.in_channels, *model.patch_embed.img_size
    param = next(module.parameters())
    example = torch.zeros(2, *size, dtype=param.dtype, device=param.device)  # the graph's input dtype
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
                          dynamo=False)
    return path
