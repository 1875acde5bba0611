"""Pictures for TensorBoard that work on any saved encoder: the class token's self-attention maps.

:func:`cls_attention_maps` reads the last block's attention of any timm ``VisionTransformer`` with a class
token (the DINO teacher, an MAE encoder, an export), at any input size the model accepts (``dynamic_img_size``
models take any multiple of the patch size). timm's fused attention never materialises the weights, so the
last block's queries and keys are recomputed from its normed input, as facebookresearch/dino's
``visualize_attention.py`` reads ``get_last_selfattention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torchvision.utils import make_grid

from sslvit.views import denormalize


def _tokens_before_last_block(vit: VisionTransformer, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Run ``vit`` up to its last block: ``(N, 3, H, W) -> ((N, T, D) tokens, (h, w) patch grid)``."""
    x = vit.patch_embed(images)  # (N, h, w, D) with dynamic_img_size, else (N, h * w, D)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    for block in vit.blocks[:-1]:
        x = block(x)
    return x, grid


@torch.no_grad()
def cls_attention_maps(vit: VisionTransformer, images: Tensor) -> Tensor:
    """The last block's attention from the class token to every patch token, one map per head.

    Args:
        vit: a timm ViT with a class token (register tokens, if any, are left out of the maps).
        images: ``(N, 3, H, W)`` normalised images; ``H`` and ``W`` multiples of the patch size.

    Returns:
        ``(N, heads, h, w)`` attention weights (each map sums to at most 1; the rest goes to the class and
        register tokens), with ``h = H // patch`` and ``w = W // patch``.
    """
    if vit.cls_token is None:
        raise ValueError("cls_attention_maps needs a ViT with a class token")
    tokens, (h, w) = _tokens_before_last_block(vit, images)
    block = vit.blocks[-1]
    attn = block.attn
    n, t, _ = tokens.shape
    qkv = attn.qkv(block.norm1(tokens)).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    weights = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)  # (N, heads, 1, T)
    return weights[:, :, 0, vit.num_prefix_tokens :].reshape(n, attn.num_heads, h, w)


def attention_grid(images: Tensor, maps: Tensor) -> Tensor:
    """One row per image: the image, then one panel per head (nearest-upsampled, min-max scaled per panel).

    Args:
        images: ``(N, 3, H, W)`` ImageNet-normalised images.
        maps: ``(N, heads, h, w)`` attention maps, e.g. from :func:`cls_attention_maps`.

    Returns:
        ``(3, H', W')`` image grid in [0, 1].
    """
    n, heads = maps.shape[:2]
    panels = F.interpolate(maps.float(), size=images.shape[-2:], mode="nearest")
    low = panels.amin(dim=(-2, -1), keepdim=True)
    high = panels.amax(dim=(-2, -1), keepdim=True)
    panels = ((panels - low) / (high - low).clamp_min(1e-12)).unsqueeze(2).expand(-1, -1, 3, -1, -1)
    rows = torch.cat([denormalize(images).unsqueeze(1), panels], dim=1)  # (N, 1 + heads, 3, H, W)
    return make_grid(rows.flatten(0, 1), nrow=heads + 1, padding=1, pad_value=1.0)
