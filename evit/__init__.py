"""EViT token reorganization for any timm ViT with a class token, keep rate per call or per sample.

The names below load on first use (PEP 562), so ``import evit.config`` (keep-rate validation, option names)
costs no torch import: the load tester's clients use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evit.cost import Cost
    from evit.loading import WeightsError
    from evit.model import create_model, data_config
    from evit.patch import EViTConfig, EViTOutput, apply_patch, default_prune_blocks
    from evit.schedule import ACCURATE, Plan, Schedule

_HOMES = {
    "ACCURATE": "evit.schedule",
    "Cost": "evit.cost",
    "EViTConfig": "evit.patch",
    "EViTOutput": "evit.patch",
    "Plan": "evit.schedule",
    "Schedule": "evit.schedule",
    "WeightsError": "evit.loading",
    "apply_patch": "evit.patch",
    "create_model": "evit.model",
    "data_config": "evit.model",
    "default_prune_blocks": "evit.patch",
}
__all__ = [  # the keys of _HOMES
    "ACCURATE",
    "Cost",
    "EViTConfig",
    "EViTOutput",
    "Plan",
    "Schedule",
    "WeightsError",
    "apply_patch",
    "create_model",
    "data_config",
    "default_prune_blocks",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'evit' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # loaded once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
