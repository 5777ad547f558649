"""EViT token reorganization for any timm ViT with a class token, keep rate per call or per sample."""

from evit.cost import Cost
from evit.loading import WeightsError
from evit.model import create_model, data_config
from evit.patch import EViTConfig, EViTOutput, apply_patch, default_prune_blocks
from evit.schedule import ACCURATE, Plan, Schedule

__all__ = [
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
