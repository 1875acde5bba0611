"""The objectives sslvit can pretrain with: an explicit table, one line per objective."""

from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.dino import DINO, DINOConfig
from sslvit.objectives.mae import MAE, MAEConfig

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO}

__all__ = ["OBJECTIVES", "DINO", "DINOConfig", "MAE", "MAEConfig", "Objective", "Progress"]
