"""Masked Autoencoders (MAE).

[0]: He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, https://arxiv.org/abs/2111.06377
[1]: facebookresearch/mae, models_mae.py and main_pretrain.py at commit efb2a8062c206524e35e47d04501ed4f544c0ae8

Per-sample random masking keeps ``int(L * (1 - mask_ratio))`` of the ``L`` patch tokens (as [1] does); the
encoder (the shared timm ViT, through lightly's ``MaskedVisionTransformerTIMM``) runs on the visible tokens
and the class token only; a light decoder (lightly's ``MaskedVisionTransformerDecoderTIMM``: fixed 2-D
sin-cos position embeddings) fills the masked positions with a learned mask token and predicts their pixels.
The loss is the mean squared error on masked patches only, against per-patch normalised pixels when
``norm_pix_loss`` is on.

Deliberate deviations from [1]:
- the class token and mask tokens get no weight decay (as timm's ``no_weight_decay()``); [1] decays them.
- the decoder predicts only the masked patches instead of all patches; the loss is the same, since [1]
  multiplies the per-patch error by the mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightly.models import utils
from lightly.models.modules import MaskedVisionTransformerDecoderTIMM, MaskedVisionTransformerTIMM
from lightly.transforms import MAETransform
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn
from torchvision.utils import make_grid

from sslvit.backbone import patch_size, require_vit
from sslvit.data.augment import Augmentation, ViewSpec
from sslvit.errors import RecipeError
from sslvit.objectives.base import Objective
from sslvit.views import IMAGENET_NORMALIZE, denormalize


@dataclass
class MAEConfig:
    """MAE hyperparameters; the defaults are [1]'s ``mae_vit_base_patch16`` with ``--norm_pix_loss``."""

    name: Literal["mae"] = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    min_crop_scale: float = 0.2  # RandomResizedCrop scale=(min_crop_scale, 1.0), bicubic, + horizontal flip

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise RecipeError(f"objective.mask_ratio={self.mask_ratio} must be strictly between 0 and 1")
        if self.decoder_embed_dim % self.decoder_num_heads:
            raise RecipeError(
                f"objective.decoder_embed_dim={self.decoder_embed_dim} is not divisible by "
                f"objective.decoder_num_heads={self.decoder_num_heads}"
            )
        if self.decoder_depth < 1:
            raise RecipeError("objective.decoder_depth must be >= 1")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise RecipeError("objective.min_crop_scale must be in (0, 1]")


def mae_loss(pred: Tensor, target: Tensor, norm_pix_loss: bool) -> Tensor:
    """Mean squared error over the masked patches.

    Args:
        pred: ``(N, M, p*p*3)`` predicted pixels of the ``M`` masked patches of each image.
        target: ``(N, M, p*p*3)`` the true pixels of those patches.
        norm_pix_loss: normalise each target patch by its own mean and variance first, as in [0] Sec. 4.
    """
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return ((pred - target) ** 2).mean(dim=-1).mean()


class MAE(Objective):
    """MAE around a timm ViT with a class token (``0 is keep, 1 is remove`` nowhere: we use index lists)."""

    name = "mae"
    Config = MAEConfig

    def __init__(self, encoder: VisionTransformer, cfg: MAEConfig) -> None:
        super().__init__()
        require_vit(encoder, "MAE")  # masking needs patch tokens: a CNN, Swin or MLP-Mixer gets one clear error
        if encoder.num_prefix_tokens != 1 or encoder.cls_token is None:
            raise RecipeError("MAE needs a ViT with exactly one class token and no register tokens")
        self.cfg = cfg
        self.patch_size = patch_size(encoder)
        self.img_size = int(encoder.patch_embed.img_size[0])
        # lightly's wrapper: MAE weight init, fixed sin-cos pos_embed, forward on kept token indices only.
        self.backbone = MaskedVisionTransformerTIMM(vit=encoder)
        # The wrapper's own mask token is for SimMIM-style objectives; MAE's lives in the decoder.
        self.backbone.mask_token.requires_grad_(False)
        self.sequence_length = self.backbone.sequence_length  # patches + class token
        self.decoder_embed = nn.Linear(encoder.embed_dim, cfg.decoder_embed_dim)
        self.decoder = MaskedVisionTransformerDecoderTIMM(
            num_patches=encoder.patch_embed.num_patches,
            embed_dim=cfg.decoder_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
        )
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, self.patch_size**2 * 3)
        for layer in (self.decoder_embed, self.decoder_pred):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def views(self) -> Callable[[Any], Any]:
        return MAETransform(input_size=self.img_size, min_scale=self.cfg.min_crop_scale, normalize=IMAGENET_NORMALIZE)

    def augmentation(self) -> Augmentation:
        """:meth:`views` for ``data.augment_on=device``: one RandomResizedCrop and a horizontal flip."""
        view = ViewSpec(self.img_size, (self.cfg.min_crop_scale, 1.0), hflip_prob=0.5)
        return Augmentation((view,), tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"]))

    def encoder_for_export(self) -> VisionTransformer:
        return self.backbone.vit

    def random_mask(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-sample random masking -> ``(idx_keep, idx_mask)`` over the token sequence.

        ``idx_keep: (N, 1 + K)`` always starts with the class token (index 0); ``idx_mask: (N, L - K)``.
        Patch ``j`` of the image is token ``j + 1``.
        """
        return utils.random_token_mask((batch_size, self.sequence_length), self.cfg.mask_ratio, device=device)

    def reconstruct(self, images: Tensor, idx_keep: Tensor, idx_mask: Tensor) -> Tensor:
        """Encode the visible patches and predict the masked ones: ``(N, 3, H, W) -> (N, M, p*p*3)``."""
        latent = self.backbone.encode(images, idx_keep=idx_keep)  # (N, 1 + K, D): visible tokens only
        tokens = utils.repeat_token(self.decoder.mask_token, (images.shape[0], self.sequence_length))
        tokens = utils.set_at_index(tokens, idx_keep, self.decoder_embed(latent).type_as(tokens))
        decoded = self.decoder.decode(self.decoder.add_pos_embed(tokens))
        return self.decoder_pred(utils.get_at_index(decoded, idx_mask))

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["views"][0]
        idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        pred = self.reconstruct(images, idx_keep, idx_mask)
        target = utils.get_at_index(utils.patchify(images, self.patch_size), idx_mask - 1)
        return {"loss": mae_loss(pred.float(), target.float(), self.cfg.norm_pix_loss)}

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One row per image: original | masked input | reconstruction with the visible patches pasted in."""
        images = batch["views"][0]
        idx_keep, idx_mask = self.random_mask(images.shape[0], images.device)
        pred = self.reconstruct(images, idx_keep, idx_mask).float()
        patches = utils.patchify(images, self.patch_size)
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation the decoder learned to predict
            target = utils.get_at_index(patches, idx_mask - 1)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        recon = utils.set_at_index(patches.clone(), idx_mask - 1, pred.type_as(patches))
        hidden = utils.set_at_index(patches.clone(), idx_mask - 1, torch.zeros_like(pred).type_as(patches))
        rows = [images, utils.unpatchify(hidden, self.patch_size), utils.unpatchify(recon, self.patch_size)]
        panels = torch.stack([denormalize(r) for r in rows], dim=1).flatten(0, 1)  # (N*3, 3, H, W)
        return {"mae/reconstructions": make_grid(panels, nrow=3, padding=1, pad_value=1.0)}
