"""The objectives sslvit can pretrain with: an explicit table, one line per objective."""

from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.dino import DINO, DINOConfig
from sslvit.objectives.ibot import IBOT, IBOTConfig
from sslvit.objectives.mae import MAE, MAEConfig

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO, "ibot": IBOT}

__all__ = ["OBJECTIVES", "DINO", "DINOConfig", "IBOT", "IBOTConfig", "MAE", "MAEConfig", "Objective", "Progress"]
