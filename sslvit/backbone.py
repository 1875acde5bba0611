"""The shared backbone: an unchanged timm ``VisionTransformer``, built by its exact timm name.

Objectives compose this model (they never subclass it), so its state-dict keys stay timm's and an export
loads into ``timm.create_model`` with nothing renamed.
"""

from __future__ import annotations

from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer

from sslvit.errors import RecipeError
from sslvit.recipe import ModelConfig


def model_args(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The keyword arguments that rebuild this backbone with ``timm.create_model(cfg.name, **args)``.

    They are stored in the export's ``config.json`` so ``local-dir:`` rebuilds the same shape.
    """
    args: dict[str, Any] = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "num_classes": 0}
    for key in ("depth", "embed_dim", "num_heads"):
        if getattr(cfg, key) is not None:
            args[key] = getattr(cfg, key)
    args.update(extra)
    return args


def build_vit(cfg: ModelConfig, **extra: Any) -> VisionTransformer:
    """Build the timm ViT named in ``cfg`` without a classifier head (``num_classes=0``).

    Args:
        cfg: the model section of the recipe.
        **extra: further timm keyword arguments, e.g. ``dynamic_img_size=True`` for multi-crop objectives.

    Raises:
        RecipeError: the name is not a timm model, or not a Vision Transformer.
    """
    if cfg.name not in timm.list_models():
        close = timm.list_models(f"*{cfg.name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise RecipeError(f"model.name={cfg.name!r} is not a timm model{hint}")
    model = timm.create_model(cfg.name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **model_args(cfg, **extra))
    if not isinstance(model, VisionTransformer):
        raise RecipeError(
            f"model.name={cfg.name!r} is a {type(model).__name__}, not a timm VisionTransformer; "
            "pick a vit_* model (masked objectives need patch tokens)"
        )
    return model


def patch_size(vit: VisionTransformer) -> int:
    """Side of one square patch in pixels."""
    return int(vit.patch_embed.patch_size[0])
