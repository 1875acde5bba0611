"""The objectives sslvit can pretrain with: an explicit table, one line per objective."""

from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.dino import DINO, DINOConfig
from sslvit.objectives.ibot import IBOT, IBOTConfig
from sslvit.objectives.ijepa import IJEPA, IJEPAConfig
from sslvit.objectives.mae import MAE, MAEConfig
from sslvit.objectives.mocov3 import MoCoV3, MoCoV3Config

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO, "ibot": IBOT, "mocov3": MoCoV3, "ijepa": IJEPA}

__all__ = [
    "OBJECTIVES",
    "DINO",
    "DINOConfig",
    "IBOT",
    "IBOTConfig",
    "IJEPA",
    "IJEPAConfig",
    "MAE",
    "MAEConfig",
    "MoCoV3",
    "MoCoV3Config",
    "Objective",
    "Progress",
]
