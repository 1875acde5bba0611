"""The shared backbone: an unchanged timm model, built by its exact timm name.

Objectives compose this model (they never subclass it), so its state-dict keys stay timm's and an export
loads into ``timm.create_model`` with nothing renamed. Masked objectives (MAE) need a timm ``VisionTransformer``;
DINO takes any timm model whose ``num_classes=0`` forward returns one pooled feature per image (ConvNeXt, ResNet,
Swin, MLP-Mixer, ResMLP, ...).

The recipe's ``model.patch_size``, ``depth``, ``embed_dim`` and ``num_heads`` shape ViTs only; every other family
keeps the shape its timm name gives and takes ``model.img_size`` only if its constructor has an ``img_size``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any

import timm
import torch
from timm.models import get_model_input_config
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from sslvit.errors import RecipeError
from sslvit.recipe import ModelConfig

log = logging.getLogger("sslvit")
VIT_OVERRIDES = ("depth", "embed_dim", "num_heads")


@functools.cache
def backbone_class(name: str) -> tuple[type, frozenset[str] | None]:
    """The class timm builds for ``name`` and the keyword arguments its constructor takes (None: any).

    The model is built on the meta device: no memory, no initialisation cost.

    Raises:
        RecipeError: ``name`` is not a timm model.
    """
    if name not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise RecipeError(f"model.name={name!r} is not a timm model{hint}")
    with torch.device("meta"):
        cls = type(timm.create_model(name, pretrained=False, num_classes=0))
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return cls, None
    return cls, frozenset(params)


def is_vit(name: str) -> bool:
    """Whether timm builds a ``VisionTransformer`` (or a subclass, e.g. DeiT) for ``name``."""
    return issubclass(backbone_class(name)[0], VisionTransformer)


def _takes(name: str, key: str) -> bool:
    accepted = backbone_class(name)[1]
    return accepted is None or key in accepted


def model_args(cfg: ModelConfig, **extra: Any) -> dict[str, Any]:
    """The keyword arguments that rebuild this backbone with ``timm.create_model(cfg.name, **args)``.

    They are stored in the export's ``config.json`` so ``local-dir:`` rebuilds the same shape. A ViT gets
    ``img_size``, ``patch_size`` and the set overrides; other families get ``img_size`` if they take one, and only
    the ``extra`` arguments their constructor takes (DINO asks for ``dynamic_img_size``, which a CNN does not need).
    """
    if is_vit(cfg.name):
        args: dict[str, Any] = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "num_classes": 0}
        args.update({key: getattr(cfg, key) for key in VIT_OVERRIDES if getattr(cfg, key) is not None})
        return {**args, **extra}
    args = {"num_classes": 0, **({"img_size": cfg.img_size} if _takes(cfg.name, "img_size") else {})}
    return {**args, **{key: value for key, value in extra.items() if _takes(cfg.name, key)}}


def build_backbone(cfg: ModelConfig, **extra: Any) -> nn.Module:
    """Build the timm model named in ``cfg`` without a classifier head (``num_classes=0``).

    Its ``pretrained_cfg["input_size"]`` is the recipe's image size, so a CNN's export records the resolution it
    was trained at (timm's data config and evaluation read it there).

    Args:
        cfg: the model section of the recipe.
        **extra: further timm keyword arguments, e.g. ``dynamic_img_size=True`` for multi-crop objectives; a
            non-ViT model gets only those its constructor takes.

    Raises:
        RecipeError: the name is not a timm model, or it has no stochastic depth and ``drop_path_rate`` is set.
    """
    cls = backbone_class(cfg.name)[0]
    ignored = [f"model.{key}" for key in VIT_OVERRIDES if getattr(cfg, key) is not None]
    if ignored and not is_vit(cfg.name):
        log.warning("%s shape ViTs only: %s (a %s) keeps the shape its timm name gives", "/".join(ignored), cfg.name,
                    cls.__name__)  # fmt: skip
    if cfg.drop_path_rate and not _takes(cfg.name, "drop_path_rate"):
        raise RecipeError(f"{cfg.name} has no stochastic depth: set model.drop_path_rate=0")
    drop_path = {"drop_path_rate": cfg.drop_path_rate} if _takes(cfg.name, "drop_path_rate") else {}
    overlay = {"input_size": (3, cfg.img_size, cfg.img_size)}
    return timm.create_model(cfg.name, pretrained=False, pretrained_cfg_overlay=overlay, **drop_path,
                             **model_args(cfg, **extra))  # fmt: skip


def build_vit(cfg: ModelConfig, **extra: Any) -> VisionTransformer:
    """:func:`build_backbone` for objectives that need a timm ``VisionTransformer`` (see :func:`require_vit`)."""
    model = build_backbone(cfg, **extra)
    require_vit(model, "this objective")
    return model


def require_vit(model: nn.Module, objective: str) -> None:
    """Refuse a backbone that is not a timm ``VisionTransformer``, naming it.

    Raises:
        RecipeError: ``model`` is another family (a CNN, Swin, MLP-Mixer, ...).
    """
    if not isinstance(model, VisionTransformer):
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise RecipeError(
            f"{objective} needs a timm VisionTransformer, but model.name={name!r} builds a {type(model).__name__}, "
            "which has no patch tokens to mask; pick a vit_* model (other backbones work with DINO)"
        )


def input_size(model: nn.Module) -> int:
    """The side in pixels of the images ``model`` was built for (timm's current input config)."""
    return int(get_model_input_config(model)["input_size"][-1])


def pooled_feature_dim(model: nn.Module, size: int) -> int:
    """Width of the pooled feature ``model`` returns for ``size`` px images: one eval forward on zeros, no grad.

    Raises:
        RecipeError: the model cannot take ``size`` px images, or returns more than one vector per image.
    """
    was_training = model.training
    images = torch.zeros(1, 3, size, size, device=next(model.parameters()).device)
    try:
        with torch.no_grad():
            out = model.eval()(images)
    except (RuntimeError, AssertionError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise RecipeError(f"cannot take {size} px images ({reason})") from err
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise RecipeError(f"returns {tuple(out.shape)} for one image, not one pooled feature vector")
    return int(out.shape[1])


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch timm's fused (SDPA) attention on or off in every timm attention layer of ``model``."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def patch_size(vit: VisionTransformer) -> int:
    """Side of one square patch in pixels."""
    return int(vit.patch_embed.patch_size[0])
