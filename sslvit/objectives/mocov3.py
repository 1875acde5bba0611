"""Momentum Contrast v3 (MoCo v3) for ViTs.

[0]: Chen, Xie and He, "An Empirical Study of Training Self-Supervised Vision Transformers", ICCV 2021,
     https://arxiv.org/abs/2104.02057
[1]: facebookresearch/moco-v3 at commit c349e6e24f40d3fedb22d973f92defa4cedf37a7: moco/builder.py (``MoCo``,
     ``MoCo_ViT``: ``_build_mlp``, ``contrastive_loss``, ``forward``, ``_update_momentum_encoder``), vits.py
     (``VisionTransformerMoCo``: ``stop_grad_conv1``, ``build_2d_sincos_position_embedding``), main_moco.py
     (BYOL-style augmentations, ``adjust_moco_momentum``, ``adjust_learning_rate``), moco/optimizer.py (``LARS``),
     CONFIG.md (the ViT commands).

The base encoder is the shared timm ViT (its pooled class token) + a 3-layer projector; a 2-layer predictor follows
it. Every MLP layer is a bias-free linear layer with BatchNorm (ReLU between layers), the last BatchNorm without
affine parameters, as [1]'s ``_build_mlp`` (built from lightly's ``ProjectionHead``: lightly's
``MoCoProjectionHead`` gives its last BatchNorm an affine scale and shift, which [1] removes). The momentum encoder is
a copy of backbone + projector that gets no gradients; after each step it moves towards the base encoder by the
per-step cosine momentum from ``momentum`` to 1 (``teacher_momentum``, [1]'s ``adjust_moco_momentum`` at the
fractional epoch). The loss is [1]'s symmetric InfoNCE: the predictor's output for each view against the momentum
keys of the other view (all processes' keys, the own image's key is the positive), cross-entropy at temperature
``T`` times ``2 T``. Not lightly's ``NTXentLoss``: it compares each view with both views of the other images (2N - 2
negatives, SimCLR's) or with a memory bank, and has no ``2 T`` factor. The patch projection stays at its random
init (``stop_grad_patch_embed``, [0]'s stability trick) and the position embedding is [1]'s fixed 2-D sin-cos.
The export is the base encoder's backbone, what [1]'s ``main_lincls.py`` and ``convert_to_deit.py`` evaluate.

Deliberate deviations from [1]:
- the momentum update runs after the optimizer step (with the momentum [1] uses at the start of the next step,
  so the keys are the same), not at the start of the next forward; the last step's update is kept in the state.
- BatchNorm uses per-process batch statistics ([1] converts it to SyncBatchNorm).
- biases, norms, the class token and position embedding get no weight decay (the shared ``param_groups``);
  [1]'s AdamW decays every parameter.
- the backbone starts from timm's ViT init; [1] re-initialises the linear layers (xavier, Q/K/V apart).
- the momentum encoder is built without stochastic depth (as every teacher here; [1] trains without any).
- mixed precision is bf16 autocast rather than fp16 with a grad scaler; the loss is computed in fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.models.modules.heads import ProjectionHead
from lightly.transforms import BYOLTransform, BYOLView1Transform, BYOLView2Transform
from lightly.utils import dist as lightly_dist
from lightly.utils.debug import std_of_l2_normalized
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslvit.backbone import input_size
from sslvit.errors import RecipeError
from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.teacher import disable_drop_path, ema_update, teacher_momentum
from sslvit.views import IMAGENET_NORMALIZE


@dataclass
class MoCoV3Config:
    """MoCo v3 hyperparameters; the defaults are CONFIG.md's ViT values in [1] (main_moco.py's where it sets none)."""

    name: Literal["mocov3"] = "mocov3"
    out_dim: int = 256  # --moco-dim
    mlp_dim: int = 4096  # --moco-mlp-dim: hidden width of projector and predictor
    momentum: float = 0.99  # --moco-m: the momentum encoder's momentum at step 0
    momentum_cosine: bool = True  # --moco-m-cos: cosine from `momentum` to 1; False keeps it constant
    temperature: float = 0.2  # --moco-t
    stop_grad_patch_embed: bool = True  # --stop-grad-conv1: the patch projection keeps its random init
    sincos_pos_embed: bool = True  # [1]'s fixed 2-D sin-cos position embedding (not learned)
    crop_size: int | None = None  # None = model.img_size
    crop_min_scale: float = 0.08  # --crop-min: RandomResizedCrop scale (crop_min_scale, 1)
    hflip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    gray_scale_prob: float = 0.2
    blur_probs: tuple[float, float] = (1.0, 0.1)  # first view, second view (BYOL's asymmetric pair)
    solarization_probs: tuple[float, float] = (0.0, 0.2)
    optimizer: Literal["adamw", "lars"] = "adamw"  # --optimizer: CONFIG.md trains ViTs with AdamW
    lars_momentum: float = 0.9  # --momentum, LARS only

    def validate(self) -> None:
        checks = [
            (self.out_dim > 0 and self.mlp_dim > 0, "objective.out_dim and objective.mlp_dim must be positive"),
            (0.0 <= self.momentum <= 1.0, "objective.momentum must be in [0, 1]"),
            (self.temperature > 0, "objective.temperature must be positive"),
            (self.crop_size is None or self.crop_size > 0, "objective.crop_size must be positive (null = img_size)"),
            (0.0 < self.crop_min_scale <= 1.0, "objective.crop_min_scale must be in (0, 1]"),
            (0.0 <= self.lars_momentum < 1.0, "objective.lars_momentum must be in [0, 1)"),
        ]  # fmt: skip
        for key in ("hflip_prob", "color_jitter_prob", "gray_scale_prob"):
            checks.append((0.0 <= getattr(self, key) <= 1.0, f"objective.{key} must be a probability in [0, 1]"))
        for key in ("blur_probs", "solarization_probs"):
            checks.append((all(0.0 <= p <= 1.0 for p in getattr(self, key)), f"objective.{key} must be in [0, 1]"))
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)


class MoCoV3(Objective):
    """MoCo v3 around a timm ViT's pooled feature: base encoder + predictor against a momentum encoder."""

    name = "mocov3"
    Config = MoCoV3Config

    def __init__(self, encoder: nn.Module, cfg: MoCoV3Config) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer):
            raise RecipeError("MoCo v3 needs a timm VisionTransformer (model.name=vit_...): its stability trick "
                              "freezes the patch projection")  # fmt: skip
        self.cfg = cfg
        self.crop_size = cfg.crop_size or input_size(encoder)
        if self.crop_size != input_size(encoder):  # both views go through the ViT at its own image size
            raise RecipeError(f"objective.crop_size={self.crop_size} must equal model.img_size={input_size(encoder)} "
                              "(or be null)")  # fmt: skip
        if cfg.sincos_pos_embed:
            set_sincos_pos_embed(encoder)
        if cfg.stop_grad_patch_embed:
            encoder.patch_embed.proj.requires_grad_(False)
        self.backbone = encoder
        self.projector = mlp(3, encoder.num_features, cfg.mlp_dim, cfg.out_dim)
        self.predictor = mlp(2, cfg.out_dim, cfg.mlp_dim, cfg.out_dim)
        self.momentum_backbone = copy.deepcopy(encoder)
        disable_drop_path(self.momentum_backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for module in (self.momentum_backbone, self.momentum_projector):
            module.requires_grad_(False)

    def views(self) -> Callable[[Any], Any]:
        """[1]'s two BYOL-style views through lightly's ``BYOLTransform``: blur 1.0 / 0.1, solarisation 0 / 0.2.

        lightly applies the flip before the colour operations, [1] after them: the distribution is the same.
        """
        cfg = self.cfg
        views = []
        for view_cls, blur, solarize in zip((BYOLView1Transform, BYOLView2Transform), cfg.blur_probs,
                                            cfg.solarization_probs):  # fmt: skip
            views.append(view_cls(
                input_size=self.crop_size, min_scale=cfg.crop_min_scale, hf_prob=cfg.hflip_prob,
                cj_prob=cfg.color_jitter_prob, cj_strength=1.0, cj_bright=0.4, cj_contrast=0.4, cj_sat=0.2,
                cj_hue=0.1, random_gray_scale=cfg.gray_scale_prob, gaussian_blur=blur, sigmas=(0.1, 2.0),
                solarization_prob=solarize, normalize=IMAGENET_NORMALIZE,
            ))  # fmt: skip
        return BYOLTransform(view_1_transform=views[0], view_2_transform=views[1])

    def encoder_for_export(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``batch["views"]``: two ``(N, 3, H, W)`` views -> [1]'s symmetric contrastive loss and signals.

        The backbone sees both views as one batch (its LayerNorms are per image); the projector and predictor see
        each view alone, so that their BatchNorm statistics are per view, as in [1].
        """
        x1, x2 = batch["views"]
        features = self.backbone(torch.cat([x1, x2]))
        q1, q2 = (self.predictor(self.projector(f)) for f in features.chunk(2))
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(f) for f in self.momentum_backbone(torch.cat([x1, x2])).chunk(2))
        with torch.autocast(q1.device.type, enabled=False):
            q1, q2, k1, k2 = q1.float(), q2.float(), k1.float(), k2.float()
            loss = contrastive_loss(q1, k2, self.cfg.temperature) + contrastive_loss(q2, k1, self.cfg.temperature)
            signals = learning_signals(q1, q2, k1, k2, features.float())
        return {"loss": loss, **signals}

    def after_step(self, progress: Progress) -> dict[str, float]:
        """Move the momentum encoder by the momentum [1] uses at the start of step ``progress.step + 1``."""
        momentum = self.momentum_at(progress.step + 1, progress.total_steps)
        base = [*self.backbone.parameters(), *self.projector.parameters()]
        ema_update([*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()], base, momentum)
        return {"momentum": momentum}

    def momentum_at(self, step: int, total_steps: int) -> float:
        if not self.cfg.momentum_cosine:
            return self.cfg.momentum
        return teacher_momentum(self.cfg.momentum, step, total_steps)

    def make_optimizer(self, lr: float, optim: Any) -> torch.optim.Optimizer:
        """AdamW over the shared parameter groups (CONFIG.md's choice for ViTs), or [1]'s LARS."""
        if self.cfg.optimizer == "lars":
            return LARS(self.param_groups(optim.weight_decay), lr=lr, momentum=self.cfg.lars_momentum)
        return super().make_optimizer(lr, optim)


def mlp(num_layers: int, input_dim: int, hidden_dim: int, output_dim: int) -> ProjectionHead:
    """[1]'s ``_build_mlp`` (``last_bn=True``): bias-free linear + BatchNorm (+ ReLU but last; last BN not affine)."""
    blocks = []
    for layer in range(num_layers):
        last = layer == num_layers - 1
        dim_in, dim_out = input_dim if layer == 0 else hidden_dim, output_dim if last else hidden_dim
        norm = nn.BatchNorm1d(dim_out, affine=not last)
        blocks.append((dim_in, dim_out, norm, None if last else nn.ReLU(), False))
    return ProjectionHead(blocks)


def contrastive_loss(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """[1]'s ``contrastive_loss``: InfoNCE of queries against every process's keys, times ``2 * temperature``.

    Args:
        q: ``(N, D)`` this process's predictor outputs for one view.
        k: ``(N, D)`` this process's momentum keys for the other view (no gradient); image ``i``'s key is the
            positive of query ``i``, the keys of all other images (all processes) are its negatives.
    """
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    keys = torch.cat(lightly_dist.gather(k)) if lightly_dist.world_size() > 1 else k
    logits = q @ keys.t() / temperature
    labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * lightly_dist.rank()
    return F.cross_entropy(logits, labels) * (2 * temperature)


@torch.no_grad()
def learning_signals(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, features: Tensor) -> dict[str, Tensor]:
    """Detached signals that say whether MoCo v3 learns (this process's batch).

    ``contrastive_accuracy``: the share of queries whose most similar key (of the other view, in the batch) is
    their own image's (1/N by chance; rises as it learns); ``positive_cosine``: the mean cosine between a query and
    its positive key; ``feature_std``: the std of the L2-normalised backbone features, the exported ones (0 on
    collapse, about ``1/sqrt(D)`` when spread).
    """
    hits, cosines = [], []
    for q, k in ((q1, k2), (q2, k1)):
        sims = F.normalize(q, dim=1) @ F.normalize(k, dim=1).t()
        hits.append(sims.argmax(dim=1) == torch.arange(q.shape[0], device=q.device))
        cosines.append(sims.diagonal())
    return {
        "contrastive_accuracy": torch.cat(hits).float().mean(),
        "positive_cosine": torch.cat(cosines).mean(),
        "feature_std": std_of_l2_normalized(features),
    }


def sincos_2d(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """[1]'s ``build_2d_sincos_position_embedding`` for the patch tokens -> ``(rows * cols, dim)``.

    A quarter of the channels each: sin and cos of the first coordinate at frequencies
    ``temperature ** (-i / (dim / 4))``, then sin and cos of the second. [1] flattens a ``meshgrid`` of
    ``(arange(w), arange(h))``, so token ``t``'s first coordinate is ``t // h`` and its second ``t % h``.
    """
    rows, cols = grid_size
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    tokens = torch.arange(rows * cols)
    first = (tokens // rows).float()[:, None] * omega
    second = (tokens % rows).float()[:, None] * omega
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)


def set_sincos_pos_embed(encoder: VisionTransformer) -> None:
    """Give the ViT [1]'s fixed sin-cos position embedding (zero for the class token), excluded from training.

    Raises:
        RecipeError: the ViT's position embedding is not one class token + the patch grid, or the width is not a
            multiple of 4.
    """
    grid = tuple(encoder.patch_embed.grid_size)
    dim = encoder.embed_dim
    expected = (1, 1 + grid[0] * grid[1], dim)
    if encoder.pos_embed is None or tuple(encoder.pos_embed.shape) != expected or dim % 4:
        raise RecipeError("objective.sincos_pos_embed=true needs a ViT with one class token, a position embedding "
                          "over it and the patches, and model.embed_dim a multiple of 4; set it to false")  # fmt: skip
    with torch.no_grad():
        encoder.pos_embed[0, 0].zero_()
        encoder.pos_embed[0, 1:].copy_(sincos_2d(grid, dim))
    encoder.pos_embed.requires_grad_(False)


class LARS(torch.optim.Optimizer):
    """[1]'s LARS: SGD with momentum whose update of each matrix is scaled to ``trust * |w| / |g + wd * w|``.

    Parameters of one dimension (biases, norms) get neither weight decay nor the scaling, as in [1]; the loop's
    weight-decay schedule sets each group's ``weight_decay``.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001) -> None:  # fmt: skip
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(update)
                    trust = group["trust_coefficient"] * w_norm / u_norm
                    update = update * torch.where((w_norm > 0) & (u_norm > 0), trust, torch.ones_like(trust))
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
