"""facebookresearch/mae, restated: the model and loss that sslvit's MAE objective must reproduce.

Source: https://github.com/facebookresearch/mae at commit efb2a8062c206524e35e47d04501ed4f544c0ae8
- models_mae.py: ``MaskedAutoencoderViT`` (``patchify``, ``random_masking``, ``forward_encoder``,
  ``forward_decoder``, ``forward_loss``, ``forward``);
- util/pos_embed.py: ``get_2d_sincos_pos_embed`` and its two helpers;
- util/lr_sched.py: ``adjust_learning_rate``.

This is an independent restatement in our own words (the authors' code is not copied here): the same function
boundaries, argument order and order of floating-point operations, so that a comparison with sslvit is meaningful.
It imports nothing from sslvit; like the authors' file it builds on timm's ``PatchEmbed`` and ``Block``.

Environment shims (the math is untouched):
1. timm's ``Block`` no longer takes ``qk_scale`` (removed in timm 0.6); the authors pass ``qk_scale=None``, which
   was the default (scale ``head_dim ** -0.5``), so the argument is dropped.
2. numpy removed the ``np.float`` alias (numpy 1.24) used in ``get_1d_sincos_pos_embed_from_grid``; it meant
   Python's float, i.e. ``np.float64``, which is used instead.
3. ``MaskedAutoencoderViT.__init__`` builds the layers and fills the fixed sin-cos position embeddings; the
   authors' random initialisation of the other weights is left out, because every test loads sslvit's weights into
   this model before comparing.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
from timm.models.vision_transformer import Block, PatchEmbed
from torch import Tensor, nn

# --- util/pos_embed.py -------------------------------------------------------------------------------------------


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """Sines then cosines of ``pos * omega_d`` with ``omega_d = 1 / 10000 ** (d / (D / 2))``: ``(M,) -> (M, D)``."""
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64)  # shim 2: np.float in the authors' code
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", pos.reshape(-1), omega)  # outer product, (M, D/2)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """First half of the channels encodes ``grid[0]``, the second half ``grid[1]``."""
    assert embed_dim % 2 == 0
    first = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    second = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([first, second], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """``(grid_size**2 [+ 1], embed_dim)`` float64 embeddings; the class token's row (first) is all zeros."""
    axis = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis), axis=0)  # the authors pass (w, h): the width coordinate comes first
    grid = grid.reshape([2, 1, grid_size, grid_size])
    embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        embed = np.concatenate([np.zeros([1, embed_dim]), embed], axis=0)
    return embed


# --- util/lr_sched.py ----------------------------------------------------------------------------------------------


def adjust_learning_rate(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """The rate ``adjust_learning_rate`` sets at fractional ``epoch`` (its ``args`` fields passed one by one):
    ``lr * epoch / warmup_epochs`` during warmup, then a half-cycle cosine from ``lr`` down to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


# --- models_mae.py -------------------------------------------------------------------------------------------------


class MaskedAutoencoderViT(nn.Module):
    """The authors' MAE: a ViT encoder on the visible patches, a light ViT decoder over all positions.

    Parameter names are the authors' (``blocks.*``, ``decoder_blocks.*``, ``decoder_pos_embed``, ...), so that an
    official checkpoint's keys would load; the tests map sslvit's names onto them.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: type[nn.Module] = nn.LayerNorm,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        # shim 1: no qk_scale argument
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self.norm_pix_loss = norm_pix_loss
        # the fixed sin-cos embeddings of initialize_weights (shim 3: the random init of the rest is left out)
        side = int(num_patches**0.5)
        for param in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(param.shape[-1], side, cls_token=True)
            param.data.copy_(torch.from_numpy(table).float().unsqueeze(0))

    def patchify(self, imgs: Tensor) -> Tensor:
        """``imgs: (N, 3, H, W) -> (N, L, p*p*3)``, each patch flattened as (row, column, channel)."""
        p = self.patch_embed.patch_size[0]
        assert imgs.shape[2] == imgs.shape[3] and imgs.shape[2] % p == 0
        side = imgs.shape[2] // p
        x = imgs.reshape(shape=(imgs.shape[0], 3, side, p, side, p))
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(shape=(imgs.shape[0], side * side, p**2 * 3))

    def random_masking(self, x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample shuffle by sorting uniform noise; keep the ``int(L * (1 - mask_ratio))`` smallest.

        ``x: (N, L, D)`` -> the kept tokens ``(N, K, D)`` in noise order, ``mask: (N, L)`` (0 is keep, 1 is remove)
        and ``ids_restore: (N, L)`` that undoes the shuffle. The noise comes from ``torch.rand(N, L)``.
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
        return x_masked, mask, ids_restore

    def forward_encoder(self, x: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor, Tensor]:
        """Embed the patches, add their position embedding, mask, prepend the class token, run the blocks."""
        x = self.patch_embed(x)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: Tensor, ids_restore: Tensor) -> Tensor:
        """Project the latent, append mask tokens, unshuffle to patch order, decode: ``-> (N, L, p*p*3)``."""
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # without the class token
        patches = torch.gather(patches, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)
        return x[:, 1:, :]  # drop the class token

    def forward_loss(self, imgs: Tensor, pred: Tensor, mask: Tensor) -> Tensor:
        """Per-patch mean squared error, averaged over the removed patches (``mask`` 1) only.

        ``imgs: (N, 3, H, W)``, ``pred: (N, L, p*p*3)``, ``mask: (N, L)``.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (N, L)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: Tensor, mask_ratio: float = 0.75) -> tuple[Tensor, Tensor, Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


def reference_mae(
    img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, decoder_embed_dim: int,
    decoder_depth: int, decoder_num_heads: int, norm_pix_loss: bool,
) -> MaskedAutoencoderViT:  # fmt: skip
    """A small ``MaskedAutoencoderViT`` built like the authors' ``mae_vit_*`` factories (LayerNorm eps 1e-6)."""
    return MaskedAutoencoderViT(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth, decoder_num_heads=decoder_num_heads,
        mlp_ratio=4, norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=norm_pix_loss,
    )  # fmt: skip
