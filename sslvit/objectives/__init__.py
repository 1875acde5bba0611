"""The objectives sslvit can pretrain with: an explicit table, one line per objective."""

from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.mae import MAE, MAEConfig

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE}

__all__ = ["OBJECTIVES", "MAE", "MAEConfig", "Objective", "Progress"]
