"""Pictures that work on any saved encoder: attention weights, class-token attention maps, attention distances.

timm's fused attention (``scaled_dot_product_attention``) never materialises the attention weights, so
:func:`attention_weights` switches the chosen blocks to timm's own unfused path (``fused_attn = False``) and reads
the softmax output where timm hands it to ``attn_drop``, as ``timm.utils.AttentionExtract`` does. It is wrapped
rather than used because AttentionExtract neither turns fused attention off nor removes its hooks, and these
pictures are drawn from a model that goes on training (the DINO teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torchvision.utils import make_grid

from sslvit.views import denormalize


@contextmanager
def attention_weights(
    vit: VisionTransformer, on_weights: Callable[[int, Tensor], None], blocks: Iterable[int] | None = None
) -> Iterator[None]:
    """While open, every forward of ``vit`` calls ``on_weights(block_index, weights)`` for the chosen blocks.

    Args:
        vit: a timm ViT whose blocks use timm's ``Attention`` (``attn.fused_attn`` and ``attn.attn_drop``).
        on_weights: called with the block index and its ``(N, heads, T, T)`` softmax weights (rows sum to 1,
            before attention dropout); ``T`` counts the prefix tokens (class, registers) first, then the patches.
        blocks: block indices; None means every block.

    Raises:
        ValueError: a block has no timm ``Attention`` to read.
    """
    if not has_timm_attention(vit):
        raise ValueError(f"the blocks of this {type(vit).__name__} do not use timm's Attention; no weights to read")
    chosen = range(len(vit.blocks)) if blocks is None else list(blocks)
    attns = [vit.blocks[i].attn for i in chosen]
    fused = [a.fused_attn for a in attns]
    handles = []
    for i, attn in zip(chosen, attns):
        attn.fused_attn = False
        handles.append(attn.attn_drop.register_forward_pre_hook(lambda m, args, i=i: on_weights(i, args[0])))
    try:
        yield
    finally:
        for attn, was_fused, handle in zip(attns, fused, handles):
            attn.fused_attn = was_fused
            handle.remove()


def has_timm_attention(model: torch.nn.Module) -> bool:
    """Whether :func:`attention_weights` can read ``model``: a ViT whose every block has timm's ``Attention``."""
    blocks = getattr(model, "blocks", None)
    attns = [getattr(block, "attn", None) for block in blocks or []]
    return bool(attns) and all(hasattr(a, "fused_attn") and hasattr(a, "attn_drop") for a in attns)


def patch_grid(vit: VisionTransformer, images: Tensor) -> tuple[int, int]:
    """``(h, w)``: the patch grid that ``images: (N, 3, H, W)`` makes in ``vit``."""
    return tuple(vit.patch_embed.dynamic_feat_size(tuple(images.shape[-2:])))


@torch.no_grad()
def cls_attention_maps(vit: VisionTransformer, images: Tensor) -> Tensor:
    """The last block's attention from the class token to every patch token, one map per head.

    As facebookresearch/dino's ``visualize_attention.py`` reads ``get_last_selfattention``.

    Args:
        vit: a timm ViT with a class token (register tokens, if any, are left out of the maps).
        images: ``(N, 3, H, W)`` normalised images; ``H`` and ``W`` multiples of the patch size (any size the
            model accepts: ``dynamic_img_size`` models take any multiple).

    Returns:
        ``(N, heads, h, w)`` attention weights (each map sums to at most 1; the rest goes to the class and
        register tokens), with ``h = H // patch`` and ``w = W // patch``.
    """
    if vit.cls_token is None:
        raise ValueError("cls_attention_maps needs a ViT with a class token")
    seen: list[Tensor] = []
    with attention_weights(vit, lambda i, w: seen.append(w[:, :, 0, vit.num_prefix_tokens :]), [len(vit.blocks) - 1]):
        vit.forward_features(images)
    n, heads = seen[0].shape[:2]
    return seen[0].float().reshape(n, heads, *patch_grid(vit, images))


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


def attention_distance_figure(distance: np.ndarray, title: str, uniform: float, y_max: float):
    """The ViT paper's Figure 7 for one encoder: mean attention distance of every head against depth.

    Args:
        distance: ``(layers, heads)`` mean attention distance in pixels.
        title: the figure's title (which encoder, which data).
        uniform: the distance a head attending evenly to every patch would have (drawn dashed, for reference).
        y_max: top of the y axis (the largest possible distance), so that plots of one shape compare.

    Returns:
        a matplotlib ``Figure`` (Agg canvas; no pyplot state, no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, heads = distance.shape
    fig = Figure(figsize=(5.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for head in range(heads):
        ax.scatter(np.arange(1, layers + 1), distance[:, head], s=22, label=f"head {head}", alpha=0.85)
    ax.plot(np.arange(1, layers + 1), distance.mean(axis=1), color="black", linewidth=1, label="mean over heads")
    ax.axhline(uniform, color="grey", linestyle="--", linewidth=1, label="uniform attention")
    ax.set(xlabel="network depth (layer)", ylabel="mean attention distance (pixels)", title=title, ylim=(0, y_max),
           xticks=np.arange(1, layers + 1), xlim=(0.5, layers + 0.5))  # fmt: skip
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, loc="lower right", ncol=2 if heads > 6 else 1)
    fig.tight_layout()
    return fig


def figure_to_array(fig) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB pixels of a matplotlib figure with an Agg canvas, for TensorBoard's ``add_image``."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
