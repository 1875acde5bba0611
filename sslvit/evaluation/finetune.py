"""Fine-tuning moved to :mod:`sslvit.training.finetune` (it is training); this module keeps the old import path."""

from sslvit.training.finetune import (
    DEFAULT_RECIPE,
    FINETUNE_PREFIX,
    FinetuneConfig,
    build_classifier,
    criterion_and_mixup,
    evaluate,
    finetune,
    list_finetune_recipes,
    load_finetune_recipe,
)
from sslvit.training.finetune_data import train_transform

__all__ = [
    "DEFAULT_RECIPE",
    "FINETUNE_PREFIX",
    "FinetuneConfig",
    "build_classifier",
    "criterion_and_mixup",
    "evaluate",
    "finetune",
    "list_finetune_recipes",
    "load_finetune_recipe",
    "train_transform",
]
