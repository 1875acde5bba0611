"""SimSiam trained with SGD: an example objective that proves the table takes a method with its own optimizer.

[0]: Chen and He, "Exploring Simple Siamese Representation Learning", CVPR 2021, https://arxiv.org/abs/2011.10566
[1]: facebookresearch/simsiam, main_simsiam.py and simsiam/builder.py (SGD, momentum 0.9, weight decay 1e-4,
     lr = 0.05 x batch / 256); an example, not checked against a pinned commit

Built from lightly's modules (``SimSiamProjectionHead``, ``SimSiamPredictionHead``, ``NegativeCosineSimilarity``,
``SimSiamTransform``) around the shared timm ViT's pooled feature. It lives in tests/ as the proof of issue 12:
registering it is one line in :data:`sslvit.objectives.OBJECTIVES` (the tests do it with ``monkeypatch.setitem``),
and :data:`RECIPE` is its recipe.

Deliberate deviations from [1]: biases and norms get no weight decay (the shared ``param_groups``); the predictor's
lr follows the cosine schedule (``--fix-pred-lr`` off, [1]'s default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import SimSiamPredictionHead, SimSiamProjectionHead
from lightly.transforms import SimSiamTransform
from torch import nn

from sslvit.errors import RecipeError
from sslvit.objectives.base import Objective
from sslvit.recipe import ModelConfig, OptimConfig, Recipe, ScheduleConfig
from sslvit.views import IMAGENET_NORMALIZE


@dataclass
class SimSiamConfig:
    """SimSiam's heads and SGD momentum; the defaults are [1]'s ResNet-50 sizes."""

    name: Literal["simsiam"] = "simsiam"
    proj_hidden_dim: int = 2048
    out_dim: int = 2048
    pred_hidden_dim: int = 512
    momentum: float = 0.9

    def validate(self) -> None:
        if min(self.proj_hidden_dim, self.out_dim, self.pred_hidden_dim) < 1:
            raise RecipeError("objective.proj_hidden_dim, out_dim and pred_hidden_dim must be positive")


class SimSiam(Objective):
    """Two views, one encoder and projector; the predictor's output is pulled towards the other view's projection."""

    name = "simsiam"
    Config = SimSiamConfig

    def __init__(self, encoder: nn.Module, cfg: SimSiamConfig) -> None:
        super().__init__()
        self.cfg, self.backbone = cfg, encoder
        self.img_size = encoder.patch_embed.img_size[0]
        self.projection_head = SimSiamProjectionHead(encoder.num_features, cfg.proj_hidden_dim, cfg.out_dim)
        self.prediction_head = SimSiamPredictionHead(cfg.out_dim, cfg.pred_hidden_dim, cfg.out_dim)
        self.criterion = NegativeCosineSimilarity()

    def views(self) -> Callable[[Any], Any]:
        return SimSiamTransform(input_size=self.img_size, normalize=IMAGENET_NORMALIZE)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``batch["views"]``: two ``(N, 3, H, W)`` views -> the symmetric negative cosine loss ([0] Eq. 2)."""
        z0, z1 = (self.projection_head(self.backbone(v)) for v in batch["views"])
        p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))  # stop-gradient
        return {"loss": loss}

    def encoder_for_export(self) -> nn.Module:
        return self.backbone

    def make_optimizer(self, lr: float, optim: OptimConfig) -> torch.optim.Optimizer:
        """[1]'s SGD with momentum (no betas) over the shared parameter groups."""
        return torch.optim.SGD(self.param_groups(optim.weight_decay), lr=lr, momentum=self.cfg.momentum)


# [1]: 100 epochs, lr 0.05 per 256 images, weight decay 1e-4, no warmup, cosine to 0; a ViT-S backbone here.
RECIPE = Recipe(
    objective=SimSiamConfig(),
    model=ModelConfig(name="vit_small_patch16_224"),
    optim=OptimConfig(base_lr=0.05, weight_decay=1e-4, min_lr=0.0),
    schedule=ScheduleConfig(epochs=100, warmup_epochs=0),
    name="simsiam",
)
