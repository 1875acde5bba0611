"""iBOT: DINO's image-level self-distillation plus masked-patch self-distillation; optionally DINOv2-style.

[0]: Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", ICLR 2022, https://arxiv.org/abs/2111.07832
[1]: bytedance/ibot: main_ibot.py at 564f363d52830fecb416e472ca371e35ea1b5869 (``iBOTLoss``, the argument
     defaults, the training step), loader.py at c24f870dc85c0322200e66399c05af193b8c9554 (``ImageFolderMask``:
     the block masks and their ratios) and models/head.py at the same commit (``iBOTHead``: ``last_layer2``);
     README.md at 2cd42846b0d93b76848b5897eeff0d38c5bfef6d (the ViT-S/16 command). tests/reference pins all of
     them at da316d82636a7a7356835ef224b13d5f3ace0489, where they are unchanged.
[2]: facebookresearch/dinov2 at 05c66df0cfa837710197d4769158c87e36afad2c: dinov2/loss/ibot_patch_loss.py
     (``forward_masked``, ``sinkhorn_knopp_teacher``), koleo_loss.py, configs/ssl_default_config.yaml (separate
     DINO and iBOT heads); Oquab et al., "DINOv2", 2023, https://arxiv.org/abs/2304.07193.

Everything DINO does (:mod:`sslvit.objectives.dino`: views, heads, the CLS-token loss and its centre, teacher
temperature and momentum schedules, frozen last layer, KoLeo, Sinkhorn-Knopp) is inherited from :class:`DINO`;
this module adds [1]'s masked-image-modelling part:

- masks: for each image, a block mask over the patch grid of each of the 2 global crops, drawn inside the per-image
  transform (so per sample, from the RNGs :func:`sslvit.data.seeding.seeded_rng` seeds by (seed, epoch, index), as
  [1] draws them in its dataset's ``__getitem__``). The ratio of a crop is one of ``pred_ratio`` chosen at random,
  each drawn uniformly in ``pred_ratio +- pred_ratio_var``: the README's ``--pred_ratio 0 0.3 --pred_ratio_var 0
  0.2`` masks half the crops, each with a ratio in (0.1, 0.5). The blocks are [1]'s BEiT-style ones (below).
- the student sees the masked global crops (a learned ``mask_token`` replaces each masked patch embedding before
  the position embedding, as [1]'s ``masked_embed``), the teacher the unmasked ones; local crops are never masked.
- the patch loss ([1]'s ``iBOTLoss`` ``v == q`` term): per global crop, the cross-entropy between the teacher's
  centred, sharpened softmax (its own temperature, ``teacher_patch_temp``, whose warmup waits for
  ``pred_start_epoch`` as [1]'s ``teacher_temp2_schedule``) and the student's softmax on
  each *masked* patch, averaged over the masked patches of an image, then over images (an unmasked image counts
  as 0) and the 2 crops. Its centre is an EMA (``center_momentum``) of the mean teacher patch output over *all*
  patches of the global crops ([1]'s ``center2``; [2] centres on the masked ones).
- total = ``lambda1`` x DINO's CLS loss + ``lambda2`` x patch loss (+ KoLeo as in DINO).
- heads, ``patch_head``: ``"shared"`` runs the patch tokens through DINO's head ([1]'s ``--shared_head true``, the
  README's ViT-S/16 and Swin-T commands, the default here); ``"shared_mlp"`` through DINO's head's MLP and L2
  normalisation, then a weight-normalised last layer of their own, ``last_layer2`` (``patch_out_dim`` wide; [1]'s
  ``iBOTHead`` with ``--shared_head false --shared_head_teacher false``), for the student and the teacher alike:
  the teacher's ``last_layer2`` starts as a copy of the student's and follows it by the EMA, and
  ``freeze_last_layer`` drops both last layers' gradients, as [1]'s ``cancel_gradients_last_layer`` does for
  every ``*last_layer*``; ``"separate"`` gives the patch tokens a head of their own of the same shape ([2]'s
  ``ibot_separate_head``: off in dinov2's ssl_default_config.yaml, on in its train/vitl14.yaml; not in [1]).
  The older ``shared_head`` switch still works when ``patch_head`` is not set: true is ``"shared"``, false is
  ``"separate"`` (not [1]'s ``--shared_head false``, which is ``"shared_mlp"``).

lightly's pieces: ``IBOTPatchLoss`` computes the patch loss with the EMA centre (its centre update is moved to
:meth:`after_step`, as DINO moves DINOLoss's, and fed all patches like [1]). Not used, and why:
``random_block_mask`` is [2]'s batch scheme (ratios spread by ``linspace`` over the batch), not [1]'s per-image
choice, and ``random_block_mask_image`` rounds the target down to an integer and raises when it is below the
smallest block, where [1] keeps fractional targets; ``MaskedVisionTransformerTIMM`` re-initialises the ViT (sincos
position embedding) and resamples the position embedding with its own interpolation, not timm's ``_pos_embed``
that the teacher and the export use; ``DINOv2ProjectionHead`` has no ``freeze_last_layer``/``norm_last_layer``,
so the separate head is DINO's ``DINOProjectionHead`` (the same layers, [1]'s options kept).

Deviations from [1] besides DINO's: the teacher has no (unused) mask token; the student's head runs on the masked
patch tokens only (the loss only reads those; the teacher's runs on all patches for the centre); ``pred_start_epoch``
empties the masks in the objective (the transform does not know the epoch); no ``data.augment_on=device`` path
(the masks are drawn in the PIL transform). Of [1]'s two head flags, main_ibot.py's defaults (``--shared_head
false``, ``--shared_head_teacher true``: a student with ``last_layer2`` beside a teacher whose patch tokens use its
CLS last layer, the student's ``last_layer2`` then outside the EMA) are not offered; its README commands set
``--shared_head true`` (``"shared"``), and ``"shared_mlp"`` is the two flags false.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from lightly.loss import IBOTPatchLoss
from lightly.models.modules import DINOProjectionHead
from lightly.models.modules.center import Center
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslvit.backbone import patch_size
from sslvit.errors import RecipeError
from sslvit.objectives.base import Progress
from sslvit.objectives.dino import DINO, DINOConfig
from sslvit.objectives.teacher import ema_update, sinkhorn_knopp, teacher_temperature


@dataclass
class IBOTConfig(DINOConfig):
    """iBOT hyperparameters: DINO's fields (and defaults) plus [1]'s masked-image-modelling ones.

    The added defaults are [1]'s ``main_ibot.py`` defaults, except the masking ratios, which are its README ViT-S/16
    command's (``--pred_ratio 0 0.3 --pred_ratio_var 0 0.2``: half of the crops masked, each at 0.1-0.5).
    """

    name: Literal["ibot"] = "ibot"  # type: ignore[assignment]
    out_dim: int = 8192
    patch_out_dim: int | None = None  # the patch outputs' width; None = out_dim (must be, with patch_head shared)
    # How the patch tokens are projected (see the module docstring): "shared" (the CLS head, [1]'s README),
    # "shared_mlp" (the CLS head's MLP, then a last layer of its own: [1]'s --shared_head false), "separate" (a head
    # of its own: [2]'s ibot.separate_head). None: from the older switch shared_head (true: shared, false: separate).
    patch_head: Literal["shared", "shared_mlp", "separate"] | None = None
    shared_head: bool = True  # kept for existing recipes; patch_head, when set, decides
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float = 0.07  # warms up like teacher_temp, from pred_start_epoch on ([1]'s temp2 schedule)
    lambda1: float = 1.0  # weight of the CLS-token (DINO) loss
    lambda2: float = 1.0  # weight of the masked-patch loss
    # One pair is chosen per crop, then drawn in ratio +- var. Two pairs, as --set parses fixed-length tuples:
    # [1]'s single ratio r +- v is (r, r) +- (v, v) (a choice between two equal draws is the same draw).
    pred_ratio: tuple[float, float] = (0.0, 0.3)
    pred_ratio_var: tuple[float, float] = (0.0, 0.2)
    pred_aspect_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    pred_shape: Literal["block", "rand"] = "block"
    pred_start_epoch: int = 0  # epochs without masking

    def validate(self) -> None:
        super().validate()
        pairs = list(zip(self.pred_ratio, self.pred_ratio_var))
        low, high = self.pred_aspect_ratio
        checks = [
            (len(self.pred_ratio) == len(self.pred_ratio_var) > 0,
             "objective.pred_ratio and pred_ratio_var need the same number of values (at least one)"),
            (all(0 <= v <= r and r + v <= 1 for r, v in pairs),
             "objective.pred_ratio +- pred_ratio_var must stay in [0, 1] (0 <= var <= ratio)"),
            (0 < low <= high, "objective.pred_aspect_ratio=(min, max) needs 0 < min <= max"),
            (self.pred_shape in ("block", "rand"), "objective.pred_shape must be 'block' or 'rand'"),
            (self.pred_start_epoch >= 0, "objective.pred_start_epoch must be >= 0"),
            (self.lambda1 >= 0 and self.lambda2 >= 0, "objective.lambda1 and lambda2 must be >= 0"),
            (min(self.warmup_teacher_patch_temp, self.teacher_patch_temp) > 0,
             "objective.warmup_teacher_patch_temp and teacher_patch_temp must be positive"),
            (self.patch_out_dim is None or self.patch_out_dim > 0, "objective.patch_out_dim must be positive"),
            (self.shared_head or self.patch_head != "shared",
             "objective.shared_head=false contradicts objective.patch_head=shared: set only patch_head"),
            (self.head_mode != "shared" or self.patch_out_dim in (None, self.out_dim),
             "objective.patch_head=shared uses one head: patch_out_dim must be null or equal out_dim"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)

    @property
    def head_mode(self) -> Literal["shared", "shared_mlp", "separate"]:
        """``patch_head``, or what the older ``shared_head`` switch means when it is not set."""
        if self.patch_head is not None:
            return self.patch_head
        return "shared" if self.shared_head else "separate"


def patch_temperature(cfg: IBOTConfig, whole_epoch: int) -> float:
    """[1]'s ``teacher_temp2_schedule``: the CLS temperature's warmup (``warmup_teacher_temp_epochs``, from
    ``warmup_teacher_patch_temp`` to ``teacher_patch_temp``), delayed by ``pred_start_epoch`` epochs held at
    ``warmup_teacher_patch_temp`` (its ``mim_start_epoch``)."""
    if whole_epoch < cfg.pred_start_epoch:
        return cfg.warmup_teacher_patch_temp
    patch_cfg = SimpleNamespace(warmup_teacher_temp=cfg.warmup_teacher_patch_temp, teacher_temp=cfg.teacher_patch_temp,
                                warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs)  # fmt: skip
    return teacher_temperature(patch_cfg, whole_epoch - cfg.pred_start_epoch)


def draw_pred_ratio(cfg: IBOTConfig) -> float:
    """[1]'s ``get_pred_ratio``: one draw per ``(ratio, var)`` pair, uniform in ``ratio +- var``; one chosen."""
    draws = [random.uniform(r - v, r + v) if v > 0 else r for r, v in zip(cfg.pred_ratio, cfg.pred_ratio_var)]
    return random.choice(draws)


def block_mask(height: int, width: int, ratio: float, aspect: tuple[float, float]) -> np.ndarray:
    """[1]'s block mask (after BEiT's masking generator), restated: rectangles until ``ratio * H * W`` patches.

    The target ``ratio * H * W`` stays fractional. While fewer patches are masked than the target, up to 10
    rectangles are tried: area uniform in [(min(H, W) // 3) ** 2, what is left to mask], log aspect ratio uniform in
    ``log(aspect)``, sides rounded from the square roots; one that fits strictly inside the grid, at a uniform
    position, is taken when it masks between 1 and what is left of new patches. Ten failures end the mask, so a
    mask can fall short of its target, never exceed it. Draws from python's ``random``.
    """
    mask = np.zeros((height, width), dtype=bool)
    target, count = ratio * height * width, 0
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    smallest = (min(height, width) // 3) ** 2
    while count < target:
        left_to_mask, added = target - count, 0
        for _ in range(10):
            area = random.uniform(smallest, left_to_mask)
            shape = math.exp(random.uniform(*log_aspect))
            h, w = int(round(math.sqrt(area * shape))), int(round(math.sqrt(area / shape)))
            if w < width and h < height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                new = h * w - int(mask[top : top + h, left : left + w].sum())
                if 0 < new <= left_to_mask:
                    mask[top : top + h, left : left + w] = True
                    added = new
            if added:
                break
        if not added:
            break
        count += added
    return mask


def random_mask(height: int, width: int, ratio: float) -> np.ndarray:
    """[1]'s ``pred_shape='rand'``: ``int(ratio * H * W)`` patches at random (numpy's RNG, as [1])."""
    flat = np.zeros(height * width, dtype=bool)
    flat[: int(ratio * height * width)] = True
    np.random.shuffle(flat)
    return flat.reshape(height, width)


def weight_normed_last_layer(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """A last layer like lightly's ``DINOProjectionHead``'s (and [1]'s ``last_layer2``): bias-free, torch's default
    linear init, weight-normalised with ``weight_g`` at 1, frozen when ``norm_last_layer``."""
    with warnings.catch_warnings():  # torch's deprecated weight_norm, as lightly's head (weight_g / weight_v keys)
        warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
        layer = nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    layer.weight_g.data.fill_(1)
    layer.weight_g.requires_grad = not norm_last_layer
    return layer


def shared_mlp_forward(head: DINOProjectionHead, last_layer: nn.Module, tokens: Tensor) -> Tensor:
    """[1]'s ``iBOTHead`` patch branch with ``shared_head=False``: the CLS head's MLP and L2 normalisation, then the
    patch tokens' own ``last_layer``."""
    return last_layer(F.normalize(head.layers(tokens), dim=-1, p=2))


class MaskedViews:
    """DINO's views followed by one ``(H/p, W/p)`` bool mask per global crop: ``[g1, g2, locals..., m1, m2]``."""

    def __init__(self, crops: Callable[[Any], list[Tensor]], cfg: IBOTConfig, grid: int) -> None:
        self.crops, self.cfg, self.grid = crops, cfg, grid

    def __call__(self, image: Any) -> list[Tensor]:
        views = list(self.crops(image))
        return views + [self.mask() for _ in range(2)]

    def mask(self) -> Tensor:
        ratio, g = draw_pred_ratio(self.cfg), self.grid
        if self.cfg.pred_shape == "block":
            return torch.from_numpy(block_mask(g, g, ratio, self.cfg.pred_aspect_ratio))
        return torch.from_numpy(random_mask(g, g, ratio))


def vit_tokens(vit: VisionTransformer, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None
               ) -> Tensor:  # fmt: skip
    """timm's ``forward_features`` with the masked patch embeddings replaced by ``mask_token`` -> ``(B, 1 + N, D)``.

    Args:
        mask: ``(B, H/p, W/p)`` bool, True where the patch is masked (None: nothing is masked).
    """
    x = vit.patch_embed(images)  # (B, H, W, D): dynamic_img_size keeps the grid
    if mask is not None and mask_token is not None:
        x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype), x)
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))
    return vit.norm(vit.blocks(x))


def masked_patch_cross_entropy(targets: Tensor, student_out: Tensor, mask: Tensor, student_temp: float) -> Tensor:
    """[1]'s patch term given teacher targets on the masked patches (and [2]'s ``forward_masked``, the same sum).

    Args:
        targets: ``(M, K)`` teacher distributions of the ``M`` masked patches, in ``mask``'s row-major order.
        student_out: ``(M, K)`` student head outputs of the same patches.
        mask: ``(B, H, W)`` bool masks of every crop (an image without a masked patch counts as 0).
    """
    per_patch = -(targets * torch.log_softmax(student_out / student_temp, dim=-1)).sum(dim=-1)
    weight = (1.0 / mask.flatten(1).sum(dim=1).clamp(min=1)).repeat_interleave(mask.flatten(1).sum(dim=1))
    return (per_patch * weight).sum() / mask.shape[0]


class IBOT(DINO):
    """iBOT around a timm ViT with a class token (``dynamic_img_size=True``); see the module docstring."""

    name = "ibot"
    Config = IBOTConfig
    # No tensor path (data.augment_on=device): DINO's Augmentation renders the crops but not the masks, which are
    # drawn per sample in the PIL transform (views()); auto therefore falls back to the workers.
    augmentation = None  # type: ignore[assignment]

    def __init__(self, encoder: nn.Module, cfg: IBOTConfig) -> None:
        if not isinstance(encoder, VisionTransformer) or encoder.cls_token is None:
            raise RecipeError("iBOT needs a timm ViT with a class token (model.name=vit_...): it masks patch tokens")
        super().__init__(encoder, cfg)
        self.cfg: IBOTConfig = cfg
        self.grid = self.global_crop_size // patch_size(encoder)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))  # [1]'s masked_embed starts at 0
        patch_dim = cfg.patch_out_dim or cfg.out_dim
        # shared: the CLS heads serve the patches too (nothing more is registered)
        self.patch_modules: tuple[str, ...] = ()  # the patch-only modules: student_<name>, teacher_<name>
        if cfg.head_mode == "separate":
            self.student_patch_head = self._head(patch_dim)
            self.teacher_patch_head = self._head(patch_dim)
            self.patch_modules = ("patch_head",)
        elif cfg.head_mode == "shared_mlp":  # [1]'s iBOTHead(shared_head=False) for the student and the teacher
            self.student_last_layer2 = weight_normed_last_layer(cfg.bottleneck_dim, patch_dim, cfg.norm_last_layer)
            self.teacher_last_layer2 = weight_normed_last_layer(cfg.bottleneck_dim, patch_dim, cfg.norm_last_layer)
            self.patch_modules = ("last_layer2",)
        for name in self.patch_modules:  # the teacher starts as a copy of the student
            student, teacher = getattr(self, f"student_{name}"), getattr(self, f"teacher_{name}")
            teacher.load_state_dict(student.state_dict())
            teacher.requires_grad_(False)
        self.patch_loss = IBOTPatchLoss(output_dim=patch_dim, student_temp=cfg.student_temp,
                                        center_momentum=cfg.center_momentum)  # fmt: skip
        # As DINO does with its centre: the loss's own update (masked patches) is replaced by one in after_step,
        # fed every teacher patch output ([1]'s center2), so a skipped step leaves the centre untouched.
        self._pending_patch_centre: list[Tensor] = []
        self.patch_loss.center.update = lambda _masked: None
        self.teacher_patch_temp = self._patch_temperature(0)
        self.masking = cfg.pred_start_epoch == 0

    def _head(self, out_dim: int | None = None) -> nn.Module:
        if out_dim is None or out_dim == self.cfg.out_dim:
            return super()._head()
        saved, self.cfg.out_dim = self.cfg.out_dim, out_dim
        try:
            return super()._head()
        finally:
            self.cfg.out_dim = saved

    def patch_heads(self) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
        """The (student, teacher) projections of the patch tokens, by ``cfg.head_mode``: DINO's heads (shared),
        their MLPs then ``last_layer2`` (shared_mlp), or heads of their own (separate)."""
        mode = self.cfg.head_mode
        if mode == "shared":
            return self.student_head, self.teacher_head
        if mode == "separate":
            return self.student_patch_head, self.teacher_patch_head
        return (partial(shared_mlp_forward, self.student_head, self.student_last_layer2),
                partial(shared_mlp_forward, self.teacher_head, self.teacher_last_layer2))  # fmt: skip

    def _patch_temperature(self, whole_epoch: int) -> float:
        return patch_temperature(self.cfg, whole_epoch)

    def views(self) -> Callable[[Any], Any]:
        """DINO's crops, then a mask per global crop (per sample, as [1]'s ``ImageFolderMask``)."""
        return MaskedViews(super().views(), self.cfg, self.grid)

    def compute_patch_loss(self, student_masked: Tensor, teacher_masked: Tensor, mask: Tensor) -> Tensor:
        """The masked-patch loss at the current patch temperature (EMA centre or Sinkhorn-Knopp targets), fp32."""
        with torch.autocast(student_masked.device.type, enabled=False):
            student_masked, teacher_masked = student_masked.float(), teacher_masked.detach().float()
            if self.cfg.centering == "sinkhorn_knopp":
                targets = sinkhorn_knopp(teacher_masked, self.teacher_patch_temp)
                return masked_patch_cross_entropy(targets, student_masked, mask, self.cfg.student_temp)
            return self.patch_loss(teacher_masked, student_masked, mask, teacher_temp=self.teacher_patch_temp)

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        views = batch["views"]
        crops, mask = views[:-2], torch.cat(views[-2:]).bool()  # (2B, H/p, W/p), crop-major like the crops
        if not self.masking:
            mask = torch.zeros_like(mask)
        flat = mask.flatten(1)
        student_patch_head, teacher_patch_head = self.patch_heads()
        globals_ = torch.cat(crops[:2])
        with torch.no_grad():
            teacher_tokens = vit_tokens(self.teacher_backbone, globals_)
            teacher_out = self.teacher_head(teacher_tokens[:, 0])
            teacher_patches = teacher_patch_head(teacher_tokens[:, 1:])  # (2B, N, K): all, for the centre
        student_tokens = vit_tokens(self.student_backbone, globals_, mask, self.mask_token)
        global_features = student_tokens[:, 0]
        features = [global_features] + ([self.student_backbone(torch.cat(crops[2:]))] if len(crops) > 2 else [])
        student_out = self.student_head(torch.cat(features))
        student_masked = student_patch_head(student_tokens[:, 1:][flat])
        signals = self.collapse_signals(teacher_out, global_features)
        cls_loss = self.compute_loss(student_out, teacher_out)
        patch_loss = self.compute_patch_loss(student_masked, teacher_patches[flat], mask)
        self._pending_patch_centre.append(teacher_patches.detach().flatten(0, 1).float())
        cls_part, patch_part = self.cfg.lambda1 * cls_loss, self.cfg.lambda2 * patch_loss
        loss = cls_part + patch_part
        out = {
            "cls_loss": cls_loss.detach(),
            "patch_loss": patch_loss.detach(),
            "patch_loss_share": (patch_part / (cls_part + patch_part).clamp(min=1e-12)).detach(),
            "mask_ratio": flat.float().mean(),
            **signals,
        }
        if self.koleo is not None:
            with torch.autocast(global_features.device.type, enabled=False):  # [2]: per global crop, summed
                koleo = sum(self.koleo(crop) for crop in global_features.float().chunk(2))
            loss = loss + self.cfg.koleo_weight * koleo
            out["koleo"] = koleo.detach()
        return {"loss": loss, **out}

    def before_step(self, progress: Progress) -> None:
        super().before_step(progress)
        self.teacher_patch_temp = self._patch_temperature(progress.whole_epoch)
        self.masking = progress.whole_epoch >= self.cfg.pred_start_epoch
        self._pending_patch_centre.clear()

    def after_backward(self, progress: Progress) -> None:
        """DINO's frozen last layer, and the patch tokens' own last layer with it (as [1]: ``*last_layer*``)."""
        super().after_backward(progress)
        mode = self.cfg.head_mode
        if mode == "separate":
            self.student_patch_head.cancel_last_layer_gradients(progress.whole_epoch)
        elif mode == "shared_mlp" and progress.whole_epoch < self.cfg.freeze_last_layer:
            for param in self.student_last_layer2.parameters():
                param.grad = None

    def after_step(self, progress: Progress) -> dict[str, float]:
        logged = super().after_step(progress)
        for teacher_patches in self._pending_patch_centre:  # mean over all patches, all-reduced (lightly's Center)
            if self.cfg.centering == "ema":
                Center.update(self.patch_loss.center, teacher_patches)
        self._pending_patch_centre.clear()
        return {**logged, "teacher_patch_temp": self.teacher_patch_temp}

    def update_teacher(self, momentum: float) -> None:
        """DINO's EMA, plus the patch tokens' own head or last layer when there is one."""
        super().update_teacher(momentum)
        for name in self.patch_modules:
            student, teacher = getattr(self, f"student_{name}"), getattr(self, f"teacher_{name}")
            ema_update(teacher.parameters(), student.parameters(), momentum)
