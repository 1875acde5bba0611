"""I-JEPA: predict the target encoder's features of masked blocks from a context block, in representation space.

[0]: Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive Architecture", CVPR 2023,
     https://arxiv.org/abs/2301.08243
[1]: facebookresearch/ijepa at commit 52c1ae95d05f743e000e8f10a1f3a79b10cff048: src/masks/multiblock.py
     (``MaskCollator``), src/train.py (the training step, the EMA schedule, the loss), src/models/vision_transformer.py
     (``VisionTransformer.forward`` with masks, ``VisionTransformerPredictor``), src/helper.py (init, parameter
     groups), src/transforms.py, configs/in1k_vith14_ep300.yaml (the defaults below).

Restated from [1] (our words, not its code):

- masks: per batch, one target-block size and one context-block size are drawn from a generator seeded by the
  iteration (scale uniform in ``pred_mask_scale`` / ``enc_mask_scale``, aspect ratio in ``aspect_ratio`` / 1, the
  same uniform number for both, sides rounded from ``sqrt(scale * N * aspect)`` and kept below the grid). Per image,
  ``num_pred_masks`` target blocks are placed at uniform positions, then ``num_enc_masks`` context blocks restricted to
  the patches outside every target block; a block with ``min_keep`` patches or fewer is redrawn, and after each 20
  failures one more target's exclusion is dropped. The index lists of a batch are cut to the shortest one.
- the target encoder (an EMA copy of the context encoder) sees the whole image; its patch features are
  layer-normed (no affine) and the target blocks' ones gathered. The context encoder sees only its block's patches
  (position embedding added before the gather); the predictor (a narrow ViT) gets them plus a mask token at each
  target position and predicts the target features; loss = ``F.smooth_l1_loss`` (mean) as [1]'s train.py (the
  paper writes L2; the code, followed here, uses smooth L1 with beta 1).
- EMA momentum linear from ``ema[0]`` to ``ema[1]`` over all steps, applied after each optimizer step.
- views: RandomResizedCrop (scale ``crop_scale``), no flip, colour or blur ([1]'s config defaults).

lightly's pieces: ``IJEPAPredictorTIMM`` is [1]'s predictor (same forward; its mask token and linear layers are
re-initialised here as [1]'s helper.py does). Not used: ``IJEPAMaskCollator`` (the same math as [1]) is a DataLoader
collate function drawing from the worker's global RNG and a process-shared counter, which a resumed run cannot
replay; the same algorithm is restated below with explicit generators (sizes keyed by the step, positions by a
per-sample seed drawn in :meth:`views` from the RNG :func:`sslvit.data.seeding.seeded_rng` seeds). ``IJEPATransform``
always flips and resizes bicubic; [1]'s default does neither.

Deliberate deviations from [1]: the backbone is timm's ViT (``class_token=False``, average pooling, the final norm on
the tokens; timm's init, the position embedding [1]'s fixed 2-D sin-cos); the mask sizes are seeded by (step,
micro-batch), not by a global iteration counter; the shared parameter groups also exempt the predictor's mask token
from weight decay; the loop's lr/wd schedules are [1]'s one iteration earlier; bf16 autocast, loss in fp32.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from lightly.models import utils as lightly_utils
from lightly.models.modules.ijepa_timm import IJEPAPredictorTIMM
from lightly.utils.debug import std_of_l2_normalized
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslvit.backbone import input_size, patch_size
from sslvit.errors import RecipeError
from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.teacher import disable_drop_path, ema_update
from sslvit.views import IMAGENET_NORMALIZE

SEED_RANGE = 2**31  # the per-sample mask seed drawn in views()


@dataclass
class IJEPAConfig:
    """I-JEPA hyperparameters; the defaults are [1]'s configs/in1k_vith14_ep300.yaml."""

    name: Literal["ijepa"] = "ijepa"
    predictor_embed_dim: int = 384  # meta.pred_emb_dim
    predictor_depth: int = 12  # meta.pred_depth
    predictor_num_heads: int | None = None  # None = the encoder's, as [1]
    num_pred_masks: int = 4  # mask.num_pred_masks: target blocks
    pred_mask_scale: tuple[float, float] = (0.15, 0.2)
    aspect_ratio: tuple[float, float] = (0.75, 1.5)  # of the target blocks (context blocks are square)
    num_enc_masks: int = 1  # mask.num_enc_masks: context blocks
    enc_mask_scale: tuple[float, float] = (0.85, 1.0)
    min_keep: int = 10  # a block must keep more patches than this
    allow_overlap: bool = False  # True: the context block may cover target blocks
    ema: tuple[float, float] = (0.996, 1.0)  # target-encoder momentum, linear over the steps
    crop_size: int | None = None  # None = model.img_size
    crop_scale: tuple[float, float] = (0.3, 1.0)
    hflip_prob: float = 0.0  # data.use_horizontal_flip: false
    sincos_pos_embed: bool = True  # [1]'s fixed 2-D sin-cos position embedding

    def validate(self) -> None:
        checks = [
            (self.predictor_embed_dim > 0 and self.predictor_depth > 0,
             "objective.predictor_embed_dim and predictor_depth must be positive"),
            (self.num_pred_masks >= 1 and self.num_enc_masks >= 1,
             "objective.num_pred_masks and num_enc_masks must be >= 1"),
            (all(0 < lo <= hi <= 1 for lo, hi in (self.pred_mask_scale, self.enc_mask_scale, self.crop_scale)),
             "objective.pred_mask_scale, enc_mask_scale and crop_scale must be (min, max) with 0 < min <= max <= 1"),
            (0 < self.aspect_ratio[0] <= self.aspect_ratio[1],
             "objective.aspect_ratio=(min, max) needs 0 < min <= max"),
            (self.min_keep >= 0, "objective.min_keep must be >= 0"),
            (0 <= self.ema[0] <= self.ema[1] <= 1, "objective.ema=(start, end) needs 0 <= start <= end <= 1"),
            (0.0 <= self.hflip_prob <= 1.0, "objective.hflip_prob must be a probability in [0, 1]"),
            (self.crop_size is None or self.crop_size > 0, "objective.crop_size must be positive (null = img_size)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)


@dataclass(frozen=True)
class MultiBlockMasks:
    """[1]'s ``MaskCollator`` restated over explicit generators (see the module docstring); indices row-major."""

    height: int
    width: int
    pred_scale: tuple[float, float]
    enc_scale: tuple[float, float]
    aspect_ratio: tuple[float, float]
    npred: int
    nenc: int
    min_keep: int
    allow_overlap: bool

    def block_size(self, generator: torch.Generator, scale: Sequence[float], aspect: Sequence[float]
                   ) -> tuple[int, int]:  # fmt: skip
        """One uniform draw sets both the scale and the aspect ratio; sides stay below the grid's."""
        u = torch.rand(1, generator=generator).item()
        keep = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
        ratio = aspect[0] + u * (aspect[1] - aspect[0])
        h, w = int(round(math.sqrt(keep * ratio))), int(round(math.sqrt(keep / ratio)))
        return min(h, self.height - 1), min(w, self.width - 1)

    def block(self, size: tuple[int, int], generator: torch.Generator, allowed: list[Tensor] | None = None
              ) -> tuple[Tensor, Tensor]:  # fmt: skip
        """A block at a uniform top-left corner (``randint(0, H - h)``: never touching the last row/column, as [1]),
        restricted to ``allowed``; redrawn until it keeps more than ``min_keep`` patches, one restriction dropped
        after each 20 failures -> (kept indices ``(K,)``, the block's complement ``(H, W)``)."""
        h, w = size
        relaxed, failures = 0, 0
        while True:
            top = int(torch.randint(0, self.height - h, (1,), generator=generator))
            left = int(torch.randint(0, self.width - w, (1,), generator=generator))
            mask = torch.zeros((self.height, self.width), dtype=torch.int32)
            mask[top : top + h, left : left + w] = 1
            if allowed is not None:
                for region in allowed[: max(len(allowed) - relaxed, 0)]:
                    mask *= region
            kept = torch.nonzero(mask.flatten()).squeeze(1)
            if len(kept) > self.min_keep:
                break
            failures += 1
            if failures == 20:
                relaxed, failures = relaxed + 1, 0
        complement = torch.ones((self.height, self.width), dtype=torch.int32)
        complement[top : top + h, left : left + w] = 0
        return kept, complement

    def sample(self, p_size: tuple[int, int], e_size: tuple[int, int], generator: torch.Generator
               ) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
        """One image: ``npred`` target blocks, then ``nenc`` context blocks outside them -> (targets, contexts)."""
        targets, complements = [], []
        for _ in range(self.npred):
            kept, complement = self.block(p_size, generator)
            targets.append(kept)
            complements.append(complement)
        allowed = None if self.allow_overlap else complements
        contexts = [self.block(e_size, generator, allowed)[0] for _ in range(self.nenc)]
        return targets, contexts

    def __call__(self, size_generator: torch.Generator, generators: Sequence[torch.Generator]
                 ) -> tuple[list[Tensor], list[Tensor]]:  # fmt: skip
        """A batch: sizes from ``size_generator``, image ``i``'s positions from ``generators[i]`` ->
        ``(masks_enc, masks_pred)``: ``nenc`` and ``npred`` tensors ``(B, K)``, cut to the batch's shortest."""
        p_size = self.block_size(size_generator, self.pred_scale, self.aspect_ratio)
        e_size = self.block_size(size_generator, self.enc_scale, (1.0, 1.0))
        drawn = [self.sample(p_size, e_size, g) for g in generators]
        k_pred = min(len(m) for targets, _ in drawn for m in targets)
        k_enc = min(len(m) for _, contexts in drawn for m in contexts)
        masks_pred = [torch.stack([d[0][j][:k_pred] for d in drawn]) for j in range(self.npred)]
        masks_enc = [torch.stack([d[1][j][:k_enc] for d in drawn]) for j in range(self.nenc)]
        return masks_enc, masks_pred

    def smallest_block(self) -> int:
        """The fewest patches a target or context block can have (before restriction), over a fine grid of draws."""
        sizes = []
        for scale, aspect in ((self.pred_scale, self.aspect_ratio), (self.enc_scale, (1.0, 1.0))):
            for u in np.linspace(0.0, 1.0, 2001):
                keep = int(self.height * self.width * (scale[0] + u * (scale[1] - scale[0])))
                ratio = aspect[0] + u * (aspect[1] - aspect[0])
                h = min(int(round(math.sqrt(keep * ratio))), self.height - 1)
                w = min(int(round(math.sqrt(keep / ratio))), self.width - 1)
                sizes.append(h * w)
        return min(sizes)


def encode_context(vit: VisionTransformer, images: Tensor, masks: list[Tensor]) -> Tensor:
    """[1]'s ``VisionTransformer.forward(x, masks)`` on a timm ViT: position embedding, then only the kept patches.

    Args:
        images: ``(B, 3, H, W)``; masks: tensors ``(B, K)`` of kept patch indices.

    Returns:
        ``(len(masks) * B, K, D)``, mask-major.
    """
    x = vit._pos_embed(vit.patch_embed(images))
    x = lightly_utils.apply_masks(x, masks)
    return vit.norm(vit.blocks(vit.norm_pre(x)))


def init_predictor(predictor: IJEPAPredictorTIMM) -> None:
    """[1]'s init (helper.py after vision_transformer.py): linear layers trunc-normal 0.02 with zero bias, LayerNorms
    1 and 0, the mask token trunc-normal 0.02; the fixed sin-cos position embedding stays."""
    for module in predictor.modules():
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    trunc_normal_(predictor.decoder.mask_token, std=0.02)


class CropAndSeed:
    """``image -> [crop (3, H, W), mask seed ()]``, the seed from torch's RNG (seeded per sample by the loader)."""

    def __init__(self, crop: Callable[[Any], Tensor]) -> None:
        self.crop = crop

    def __call__(self, image: Any) -> list[Tensor]:
        return [self.crop(image), torch.randint(0, SEED_RANGE, ())]


class IJEPA(Objective):
    """I-JEPA around a timm ViT without a class token; see the module docstring."""

    name = "ijepa"
    Config = IJEPAConfig

    @classmethod
    def backbone_kwargs(cls, cfg: IJEPAConfig) -> dict[str, Any]:
        """[1]'s encoder has no class token and is evaluated on its average-pooled, normed patch tokens."""
        return {"class_token": False, "global_pool": "avg", "fc_norm": False}

    def __init__(self, encoder: nn.Module, cfg: IJEPAConfig) -> None:
        super().__init__()
        if not isinstance(encoder, VisionTransformer) or encoder.num_prefix_tokens:
            raise RecipeError("I-JEPA needs a timm ViT without class or register tokens (model.name=vit_...)")
        self.cfg = cfg
        self.crop_size = cfg.crop_size or input_size(encoder)
        if self.crop_size != input_size(encoder):
            raise RecipeError(f"objective.crop_size={self.crop_size} must equal model.img_size={input_size(encoder)} "
                              "(or be null)")  # fmt: skip
        grid = self.crop_size // patch_size(encoder)
        self.masks = MultiBlockMasks(grid, grid, cfg.pred_mask_scale, cfg.enc_mask_scale, cfg.aspect_ratio,
                                     cfg.num_pred_masks, cfg.num_enc_masks, cfg.min_keep,
                                     cfg.allow_overlap)  # fmt: skip
        if grid < 2 or self.masks.smallest_block() <= cfg.min_keep:
            raise RecipeError(
                f"objective.min_keep={cfg.min_keep}: on a {grid}x{grid} patch grid the smallest mask "
                "block has too few patches; lower min_keep or raise the mask scales or the image size"
            )
        if cfg.sincos_pos_embed:
            lightly_utils.initialize_2d_sine_cosine_positional_embedding(encoder.pos_embed, num_prefix_tokens=0)
        self.encoder = encoder
        self.predictor = IJEPAPredictorTIMM(
            num_patches=grid * grid, depth=cfg.predictor_depth, mlp_dim=encoder.embed_dim,
            predictor_embed_dim=cfg.predictor_embed_dim,
            num_heads=cfg.predictor_num_heads or encoder.blocks[0].attn.num_heads,
        )  # fmt: skip
        init_predictor(self.predictor)
        self.target_encoder = copy.deepcopy(encoder)
        disable_drop_path(self.target_encoder)
        self.target_encoder.requires_grad_(False)
        self._step, self._micro = 0, 0

    def views(self) -> Callable[[Any], Any]:
        """[1]'s crop (bilinear RandomResizedCrop, ImageNet normalisation) and a per-sample mask seed."""
        ops = [T.RandomResizedCrop(self.crop_size, scale=self.cfg.crop_scale)]
        if self.cfg.hflip_prob:
            ops.append(T.RandomHorizontalFlip(self.cfg.hflip_prob))
        ops += [T.ToTensor(), T.Normalize(IMAGENET_NORMALIZE["mean"], IMAGENET_NORMALIZE["std"])]
        return CropAndSeed(T.Compose(ops))

    def encoder_for_export(self) -> nn.Module:
        return self.target_encoder

    def draw_masks(self, seeds: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The batch's masks: sizes from (step, micro-batch), positions from each sample's seed (on the CPU)."""
        key = np.random.SeedSequence([self._step, self._micro]).generate_state(1)[0]
        self._micro += 1
        sizes = torch.Generator().manual_seed(int(key))
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds.tolist()]
        return self.masks(sizes, generators)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """``batch["views"]``: ``[(B, 3, H, W) crops, (B,) mask seeds]`` -> [1]'s loss and learning signals."""
        images, seeds = batch["views"]
        masks_enc, masks_pred = self.draw_masks(seeds)
        masks_enc = [m.to(images.device) for m in masks_enc]
        masks_pred = [m.to(images.device) for m in masks_pred]
        n = images.shape[0]
        with torch.no_grad():
            features = self.target_encoder.forward_features(images)  # (B, N, D)
            h = F.layer_norm(features, (features.size(-1),))
            h = lightly_utils.apply_masks(h, masks_pred)  # (npred * B, K, D)
            h = lightly_utils.repeat_interleave_batch(h, n, repeat=len(masks_enc))
        z = encode_context(self.encoder, images, masks_enc)
        z = self.predictor(z, masks_enc, masks_pred)  # (npred * nenc * B, K, D)
        with torch.autocast(z.device.type, enabled=False):
            loss = F.smooth_l1_loss(z.float(), h.float())
            target_std = std_of_l2_normalized(features.float().mean(dim=1))
        return {
            "loss": loss,
            "target_feature_std": target_std.detach(),
            "prediction_std": std_of_l2_normalized(z.detach().float().flatten(0, 1)),
            "context_patches": torch.tensor(float(masks_enc[0].shape[1])),
            "target_patches": torch.tensor(float(masks_pred[0].shape[1])),
        }

    def before_step(self, progress: Progress) -> None:
        self._step, self._micro = progress.step, 0

    def after_step(self, progress: Progress) -> dict[str, float]:
        """[1]'s EMA after step ``i``: ``m = ema[0] + i * (ema[1] - ema[0]) / total_steps``."""
        m = self.momentum_at(progress.step, progress.total_steps)
        ema_update(self.target_encoder.parameters(), self.encoder.parameters(), m)
        return {"momentum": m}

    def momentum_at(self, step: int, total_steps: int) -> float:
        start, end = self.cfg.ema
        return start + step * (end - start) / max(total_steps, 1)
