"""facebookresearch/ijepa, restated: the multi-block mask collator, the encoder and predictor forward passes, the
loss and the target-encoder EMA of I-JEPA.

Source: https://github.com/facebookresearch/ijepa at commit 52c1ae95d05f743e000e8f10a1f3a79b10cff048 (the
repository's one commit, 2023-06-13):
- src/masks/multiblock.py: ``MaskCollator`` (``step``, ``_sample_block_size``, ``_sample_block_mask`` with its inner
  ``constrain_mask``, ``__call__``);
- src/masks/utils.py: ``apply_masks``; src/utils/tensors.py: ``repeat_interleave_batch``;
- src/models/vision_transformer.py: ``get_2d_sincos_pos_embed`` (with ``get_2d_sincos_pos_embed_from_grid`` and
  ``get_1d_sincos_pos_embed_from_grid``), ``MLP``, ``Attention``, ``Block``, ``PatchEmbed``,
  ``VisionTransformer.forward`` (with masks), ``VisionTransformerPredictor.forward``, the ``vit_*`` and
  ``vit_predictor`` builders (qkv bias, MLP ratio 4, LayerNorm eps 1e-6);
- src/train.py ``main``: ``forward_target``, ``forward_context`` and ``loss_fn`` inside ``train_step``, the
  ``momentum_scheduler`` generator and "Step 3. momentum update of target encoder".

This is an independent restatement in our own words (the authors' code is not copied here): the same function
boundaries, argument order, random draws and order of floating-point operations, so that a comparison with sslvit
is meaningful. It imports nothing from sslvit.

Environment shims (the math is untouched):
1. One process: ``AllReduce`` in ``loss_fn`` is the identity (world size 1); no ``DistributedDataParallel`` wrappers
   (with one process they change neither the forward nor the gradients).
2. CPU, float32: no ``.cuda()``, no bfloat16 autocast, no ``GradScaler``.
3. The collator's iteration counter is a ``multiprocessing.Value`` shared by the DataLoader workers; here a plain
   integer (one process, no workers). Block positions come from torch's global RNG, as the authors' (inside a
   DataLoader worker that is the worker's RNG): the tests seed it.
4. The collator's "decreasing acceptable-regions" warning is logged as the authors do and also counted in
   ``relaxations``, so that a test can tell that this path ran.
5. No weight initialisation (the authors' ``trunc_normal_`` and ``fix_init_weight``): the tests load sslvit's
   weights. The fixed sin-cos position embeddings are the authors' own tables, built here.
6. Dropout and stochastic depth are left out: every official config runs them at rate 0, where they are identities.
   ``interpolate_pos_encoding`` is left out too: at the model's own resolution (``npatch == N``) it returns the
   table unchanged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# --- src/masks/multiblock.py ----------------------------------------------------------------------------------------


class MaskCollator:
    """Collates images and draws, per batch, ``nenc`` context and ``npred`` target blocks for every image."""

    def __init__(
        self, input_size: int | tuple[int, int] = (224, 224), patch_size: int = 16,
        enc_mask_scale: tuple[float, float] = (0.2, 0.8), pred_mask_scale: tuple[float, float] = (0.2, 0.8),
        aspect_ratio: tuple[float, float] = (0.3, 3.0), nenc: int = 1, npred: int = 2, min_keep: int = 4,
        allow_overlap: bool = False,
    ) -> None:  # fmt: skip
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.patch_size = patch_size
        self.height, self.width = input_size[0] // patch_size, input_size[1] // patch_size
        self.enc_mask_scale = enc_mask_scale
        self.pred_mask_scale = pred_mask_scale
        self.aspect_ratio = aspect_ratio
        self.nenc = nenc
        self.npred = npred
        self.min_keep = min_keep  # a block must keep more patches than this
        self.allow_overlap = allow_overlap  # False: the context blocks avoid every target block
        self._itr_counter = -1  # shim 3
        self.relaxations = 0  # shim 4

    def step(self) -> int:
        """The next value of the call counter (0 on the first call): the seed of that batch's block sizes."""
        self._itr_counter += 1
        return self._itr_counter

    def _sample_block_size(
        self, generator: torch.Generator, scale: Sequence[float], aspect_ratio_scale: Sequence[float]
    ) -> tuple[int, int]:
        """One uniform number sets both the scale and the aspect ratio; each side shrinks until below the grid's."""
        rand = torch.rand(1, generator=generator).item()
        min_s, max_s = scale
        mask_scale = min_s + rand * (max_s - min_s)
        max_keep = int(self.height * self.width * mask_scale)
        min_ar, max_ar = aspect_ratio_scale
        aspect_ratio = min_ar + rand * (max_ar - min_ar)
        h = int(round(math.sqrt(max_keep * aspect_ratio)))
        w = int(round(math.sqrt(max_keep / aspect_ratio)))
        while h >= self.height:
            h -= 1
        while w >= self.width:
            w -= 1
        return h, w

    def _sample_block_mask(self, b_size: tuple[int, int], acceptable_regions: list[Tensor] | None = None
                           ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """Place an ``h x w`` block at a top-left corner from the global RNG, keep only its patches inside every
        acceptable region, and redraw while it keeps ``min_keep`` patches or fewer; after each 20 failed draws one
        more region (from the end of the list) stops counting.

        Returns:
            the kept flat indices ``(K,)`` and the block's complement ``(height, width)`` (int32, 0 on the block).
        """
        h, w = b_size

        def constrain_mask(mask: Tensor, tries: int = 0) -> None:
            """Multiply ``mask`` in place by the first ``len(acceptable_regions) - tries`` regions."""
            assert acceptable_regions is not None
            for k in range(max(int(len(acceptable_regions) - tries), 0)):
                mask *= acceptable_regions[k]

        tries, og_timeout = 0, 20
        timeout = og_timeout
        valid_mask = False
        while not valid_mask:
            top = torch.randint(0, self.height - h, (1,))
            left = torch.randint(0, self.width - w, (1,))
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top : top + h, left : left + w] = 1
            if acceptable_regions is not None:
                constrain_mask(mask, tries)
            mask = torch.nonzero(mask.flatten())
            valid_mask = len(mask) > self.min_keep
            if not valid_mask:
                timeout -= 1
                if timeout == 0:
                    tries += 1
                    timeout = og_timeout
                    self.relaxations += 1
                    logger.warning("Mask generator: no valid mask found, decreasing acceptable regions [%d]", tries)
        mask = mask.squeeze()
        mask_complement = torch.ones((self.height, self.width), dtype=torch.int32)
        mask_complement[top : top + h, left : left + w] = 0
        return mask, mask_complement

    def __call__(self, batch: list[Any]) -> tuple[Any, list[Tensor], list[Tensor]]:
        """Collate ``batch``; the block sizes from a generator seeded by the call counter, the positions per image
        from the global RNG (all ``npred`` targets of an image, then its ``nenc`` context blocks); every mask of a
        kind is cut to the shortest one in the batch.

        Returns:
            ``(collated batch, masks_enc, masks_pred)``: ``nenc`` and ``npred`` tensors ``(B, K)``.
        """
        num_images = len(batch)
        collated_batch = torch.utils.data.default_collate(batch)
        seed = self.step()
        g = torch.Generator()
        g.manual_seed(seed)
        p_size = self._sample_block_size(generator=g, scale=self.pred_mask_scale, aspect_ratio_scale=self.aspect_ratio)
        e_size = self._sample_block_size(generator=g, scale=self.enc_mask_scale, aspect_ratio_scale=(1.0, 1.0))

        collated_masks_pred, collated_masks_enc = [], []
        min_keep_pred = min_keep_enc = self.height * self.width
        for _ in range(num_images):
            masks_p, masks_c = [], []
            for _ in range(self.npred):
                mask, mask_c = self._sample_block_mask(p_size)
                masks_p.append(mask)
                masks_c.append(mask_c)
                min_keep_pred = min(min_keep_pred, len(mask))
            collated_masks_pred.append(masks_p)

            acceptable_regions: list[Tensor] | None = None if self.allow_overlap else masks_c
            masks_e = []
            for _ in range(self.nenc):
                mask, _ = self._sample_block_mask(e_size, acceptable_regions=acceptable_regions)
                masks_e.append(mask)
                min_keep_enc = min(min_keep_enc, len(mask))
            collated_masks_enc.append(masks_e)

        # default_collate turns B lists of n masks into n tensors (B, K)
        pred = torch.utils.data.default_collate([[m[:min_keep_pred] for m in ms] for ms in collated_masks_pred])
        enc = torch.utils.data.default_collate([[m[:min_keep_enc] for m in ms] for ms in collated_masks_enc])
        return collated_batch, enc, pred


# --- src/masks/utils.py, src/utils/tensors.py -----------------------------------------------------------------------


def apply_masks(x: Tensor, masks: list[Tensor]) -> Tensor:
    """``x: (B, N, D)``, each mask ``(B, K)`` of patch indices -> the gathered patches ``(len(masks) * B, K, D)``,
    mask-major."""
    gathered = []
    for m in masks:
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        gathered.append(torch.gather(x, dim=1, index=index))
    return torch.cat(gathered, dim=0)


def repeat_interleave_batch(x: Tensor, B: int, repeat: int) -> Tensor:  # noqa: N803 (the authors' name)
    """Each consecutive chunk of ``B`` rows repeated ``repeat`` times in place: ``[a, b] -> [a, a, b, b]``."""
    chunks = len(x) // B
    return torch.cat([torch.cat([x[i * B : (i + 1) * B]] * repeat, dim=0) for i in range(chunks)], dim=0)


# --- src/models/vision_transformer.py -------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """``(M,)`` positions -> ``(M, embed_dim)``: sines then cosines of ``pos * 10000^(-2i / embed_dim)``."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=float)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """The first half of the dimensions encodes ``grid[0]``, the second half ``grid[1]``."""
    assert embed_dim % 2 == 0
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """The fixed table ``(grid_size**2, embed_dim)`` in float64 (a zero row first with ``cls_token``)."""
    grid_h, grid_w = np.arange(grid_size, dtype=float), np.arange(grid_size, dtype=float)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # the width coordinate first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


class MLP(nn.Module):
    """fc1, GELU, fc2 (dropout at rate 0 left out: shim 6)."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention written out: ``softmax(q k^T * head_dim^-0.5) v``, then a projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, N, C = x.shape  # noqa: N806 (the authors' names)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x), attn


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (no drop path: shim 6)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, norm_layer: Any) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = norm_layer(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        y, _ = self.attn(self.norm1(x))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """A ``patch_size``-strided convolution, flattened to ``(B, N, embed_dim)`` tokens."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _fixed_pos_embed(num_patches: int, dim: int) -> nn.Parameter:
    """The authors' frozen ``(1, N, dim)`` parameter holding ``get_2d_sincos_pos_embed`` in float32."""
    table = get_2d_sincos_pos_embed(dim, int(num_patches**0.5), cls_token=False)
    return nn.Parameter(torch.from_numpy(table).float().unsqueeze(0), requires_grad=False)


class VisionTransformer(nn.Module):
    """The encoder (context and target): patches + fixed position embedding, optionally only the masked-in patches,
    the blocks, a final LayerNorm. No class token."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_layer: Any = nn.LayerNorm) -> None:  # fmt: skip
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.patch_embed = PatchEmbed(img_size, patch_size, 3, embed_dim)
        self.pos_embed = _fixed_pos_embed(self.patch_embed.num_patches, embed_dim)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)

    def forward(self, x: Tensor, masks: list[Tensor] | Tensor | None = None) -> Tensor:
        """``x: (B, 3, H, W)`` -> ``(B, N, D)``, or with masks ``(len(masks) * B, K, D)``."""
        if masks is not None and not isinstance(masks, list):
            masks = [masks]
        x = self.patch_embed(x)
        x = x + self.pos_embed  # shim 6: interpolate_pos_encoding is the identity at this size
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


def vit_encoder(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int) -> VisionTransformer:
    """What every ``vit_*`` builder passes: MLP ratio 4, qkv bias, LayerNorm eps 1e-6."""
    return VisionTransformer(img_size, patch_size, embed_dim, depth, num_heads, mlp_ratio=4, qkv_bias=True,
                             norm_layer=partial(nn.LayerNorm, eps=1e-6))  # fmt: skip


class VisionTransformerPredictor(nn.Module):
    """The narrow predictor: context tokens embedded to ``predictor_embed_dim`` plus their position, one mask token
    (plus position) per target patch, the blocks, a LayerNorm, and a projection of the target tokens back."""

    def __init__(self, num_patches: int, embed_dim: int, predictor_embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, norm_layer: Any = nn.LayerNorm) -> None:  # fmt: skip
        super().__init__()
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        self.predictor_pos_embed = _fixed_pos_embed(num_patches, predictor_embed_dim)
        self.predictor_blocks = nn.ModuleList(
            [Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer) for _ in range(depth)]
        )
        self.predictor_norm = norm_layer(predictor_embed_dim)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim, bias=True)

    def forward(self, x: Tensor, masks_x: list[Tensor] | Tensor, masks: list[Tensor] | Tensor) -> Tensor:
        """``x: (len(masks_x) * B, K_ctx, D)`` -> predictions ``(len(masks) * len(masks_x) * B, K_tgt, D)``: row
        block ``j`` pairs context mask ``j % len(masks_x)`` with target mask ``j // len(masks_x)``."""
        masks_x = masks_x if isinstance(masks_x, list) else [masks_x]
        masks = masks if isinstance(masks, list) else [masks]
        B = len(x) // len(masks_x)  # noqa: N806 (the authors' name)
        x = self.predictor_embed(x)
        x += apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks_x)
        _, n_ctxt, _ = x.shape
        pos_embs = apply_masks(self.predictor_pos_embed.repeat(B, 1, 1), masks)
        pos_embs = repeat_interleave_batch(pos_embs, B, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos_embs.size(0), pos_embs.size(1), 1)
        pred_tokens += pos_embs
        x = torch.cat([x.repeat(len(masks), 1, 1), pred_tokens], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, n_ctxt:])


def vit_predictor(**kwargs: Any) -> VisionTransformerPredictor:
    """MLP ratio 4, qkv bias, LayerNorm eps 1e-6; ``init_model`` gives it the encoder's width and head count."""
    return VisionTransformerPredictor(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# --- src/train.py ---------------------------------------------------------------------------------------------------


def forward_target(target_encoder: nn.Module, imgs: Tensor, masks_enc: list[Tensor], masks_pred: list[Tensor]
                   ) -> Tensor:  # fmt: skip
    """The targets: the target encoder's features of the whole image, layer-normed over the feature dimension
    (no affine), the target blocks gathered and each repeated once per context mask."""
    with torch.no_grad():
        h = target_encoder(imgs)
        h = F.layer_norm(h, (h.size(-1),))
        B = len(h)  # noqa: N806 (the authors' name)
        h = apply_masks(h, masks_pred)
        return repeat_interleave_batch(h, B, repeat=len(masks_enc))


def forward_context(encoder: nn.Module, predictor: nn.Module, imgs: Tensor, masks_enc: list[Tensor],
                    masks_pred: list[Tensor]) -> Tensor:  # fmt: skip
    """The predictions: the context encoder on the context blocks, then the predictor at the target positions."""
    z = encoder(imgs, masks_enc)
    return predictor(z, masks_enc, masks_pred)


def loss_fn(z: Tensor, h: Tensor) -> Tensor:
    """Smooth L1 (beta 1, mean over every element); ``AllReduce`` is the identity in one process (shim 1)."""
    return F.smooth_l1_loss(z, h)


def momentum_scheduler(ema: Sequence[float], ipe: int, num_epochs: int, ipe_scale: float) -> Iterator[float]:
    """One momentum per iteration, linear from ``ema[0]`` (iteration 0) towards ``ema[1]``, reached after
    ``ipe * num_epochs * ipe_scale`` iterations; ``int(...) + 1`` values in all."""
    total = ipe * num_epochs * ipe_scale
    return (ema[0] + i * (ema[1] - ema[0]) / total for i in range(int(total) + 1))


def momentum_update(encoder: nn.Module, target_encoder: nn.Module, m: float) -> None:
    """Step 3 of ``train_step``, after the optimizer step: ``param_k = param_k * m + (1 - m) * param_q`` in place,
    over the two encoders' parameters in order (``m = next(momentum_scheduler)``)."""
    with torch.no_grad():
        for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):
            param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
