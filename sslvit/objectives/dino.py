"""Self-distillation with no labels (DINO).

[0]: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021,
     https://arxiv.org/abs/2104.14294
[1]: facebookresearch/dino: main_dino.py at commit cc72fe982d650ff28e974d0f5a7c974fecb56209 (DINOLoss,
     DataAugmentationDINO, train_one_epoch), utils.py at ba9edd18db78a99193005ef991e04d63984b25a8
     (MultiCropWrapper, cosine_scheduler, cancel_gradients_last_layer, clip_gradients) and
     vision_transformer.py at 58aabc09e056689228e5cfff27c2c20e6d19c945 (DINOHead).
[2]: facebookresearch/dinov2: dinov2/loss/dino_clstoken_loss.py (``sinkhorn_knopp_teacher``) and koleo_loss.py at
     05c66df0cfa837710197d4769158c87e36afad2c; Oquab et al., "DINOv2", 2023, https://arxiv.org/abs/2304.07193.

A student (the shared timm backbone + lightly's ``DINOProjectionHead``, which is [1]'s ``DINOHead``: 3-layer GELU MLP,
L2-normalised bottleneck, weight-normalised last layer) sees 2 global and N local crops; crops of one resolution
go through the backbone as one batch, as [1]'s ``MultiCropWrapper`` does. The teacher is an EMA copy of the
student (no gradients, no drop path) that sees only the 2 global crops; its momentum follows [1]'s per-step
cosine from ``momentum_teacher`` to 1. The loss is [1]'s ``DINOLoss``: the cross-entropy between the centred,
sharpened teacher softmax and the student softmax (temperature ``student_temp``) over every (teacher global
crop, student crop) pair of different crops; the centre is an EMA (``center_momentum``) of the teacher output
averaged over the batch and all processes, a registered buffer (``dino_loss.center``) so that it is checkpointed
and resumed with the model. lightly's ``DINOLoss`` computes exactly this when it is given the temperature (its
centre all-reduces across processes like [1]); we pass [1]'s per-epoch temperature and run it in fp32, because
its einsum would otherwise run in bf16 under autocast. The teacher temperature warms up linearly per *epoch*
(``np.linspace`` indexed by the integer epoch, as [1]); the last layer's gradients are dropped while the epoch
is below ``freeze_last_layer``. The export is the teacher's backbone, what [1] evaluates.

Two options from [2], off by default (the official recipes leave them off): ``centering="sinkhorn_knopp"`` replaces
the EMA centre and softmax by [2]'s Sinkhorn-Knopp teacher targets (the pairs and their average stay [1]'s), and
``koleo_weight`` adds [2]'s KoLeo regulariser (lightly's ``KoLeoLoss``) on the student's global-crop features.

Deliberate deviations from [1]:
- gradients are clipped by their global norm (the loop's ``optim.clip_grad``), not per parameter as [1]'s
  ``clip_gradients``; the frozen last layer's gradients are dropped before clipping, so they do not count.
- the class token and position embedding get no weight decay (timm's ``no_weight_decay()``); [1] decays them.
- local crops resample the position embedding with timm's ``dynamic_img_size`` (bicubic to the exact grid);
  the backbone starts from timm's ViT init (class token std 1e-6, [1] uses 0.02).
- the backbone may be any timm model whose ``num_classes=0`` forward returns one pooled feature (a CNN, Swin,
  MLP-Mixer, ...; [1] also trains ResNet-50). Crops a model cannot take (smaller than a ConvNeXt's stride of 32,
  or any size but its own for a fixed-size MLP-Mixer/ResMLP) are made at the global crop size instead, with a
  warning; BatchNorm layers use per-process batch statistics ([1] converts them to SyncBatchNorm).
- mixed precision is bf16 autocast rather than fp16 with a grad scaler; the loss and centre are computed in fp32.
- with gradient accumulation (absent in [1]) the centre moves once per micro-batch; it moves after the optimizer
  step instead of inside the loss (same values), so that a skipped non-finite step leaves it untouched.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightly.loss import DINOLoss, KoLeoLoss
from lightly.models.modules import DINOProjectionHead
from lightly.transforms import DINOTransform
from lightly.utils.debug import std_of_l2_normalized
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from sslvit.backbone import input_size, patch_size, pooled_feature_dim
from sslvit.data.augment import Augmentation, ViewSpec
from sslvit.errors import RecipeError
from sslvit.objectives.base import Objective, Progress
from sslvit.objectives.teacher import (
    disable_drop_path,
    ema_update,
    multicrop_forward,
    sinkhorn_knopp,
    teacher_momentum,
    teacher_temperature,
)
from sslvit.views import IMAGENET_NORMALIZE
from sslvit.viz import attention_grid, cls_attention_maps

log = logging.getLogger("sslvit")


@dataclass
class DINOConfig:
    """DINO hyperparameters; the defaults are [1]'s ``main_dino.py`` argument defaults (ViT-S/16, 100 epochs)."""

    name: Literal["dino"] = "dino"
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    norm_last_layer: bool = True
    use_bn_in_head: bool = False  # [1]'s --use_bn_in_head: BatchNorm after the head's hidden layers
    freeze_last_layer: int = 1  # epochs during which the head's last layer gets no update
    momentum_teacher: float = 0.996  # cosine to 1 over training
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    global_crop_size: int | None = None  # None = model.img_size
    global_crops_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_size: int = 96
    local_crops_scale: tuple[float, float] = (0.05, 0.4)
    local_crops_number: int = 8
    # [1]'s DataAugmentationDINO probabilities (defaults); small grey data such as digits can switch pieces off.
    hflip_prob: float = 0.5
    color_jitter_prob: float = 0.8
    gray_scale_prob: float = 0.2
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # first global, second global, each local crop
    solarization_prob: float = 0.2  # second global crop only
    # Not in [1], off by default. DINOv2's ([2] below) pieces, for recipes that must learn in few steps:
    centering: Literal["ema", "sinkhorn_knopp"] = "ema"  # sinkhorn_knopp: [2]'s teacher targets, no EMA centre
    koleo_weight: float = 0.0  # > 0: + weight x KoLeo on the student's global-crop backbone features, as [2]

    def validate(self) -> None:
        checks = [
            (self.out_dim > 0 and self.hidden_dim > 0 and self.bottleneck_dim > 0,
             "objective.out_dim, hidden_dim and bottleneck_dim must be positive"),
            (self.freeze_last_layer >= 0, "objective.freeze_last_layer must be >= 0 epochs"),
            (0.0 <= self.momentum_teacher <= 1.0, "objective.momentum_teacher must be in [0, 1]"),
            (0.0 <= self.center_momentum < 1.0, "objective.center_momentum must be in [0, 1)"),
            (min(self.warmup_teacher_temp, self.teacher_temp, self.student_temp) > 0,
             "objective.warmup_teacher_temp, teacher_temp and student_temp must be positive"),
            (self.warmup_teacher_temp_epochs >= 0, "objective.warmup_teacher_temp_epochs must be >= 0"),
            (self.global_crop_size is None or self.global_crop_size > 0, "objective.global_crop_size must be > 0"),
            (self.local_crop_size > 0, "objective.local_crop_size must be positive"),
            (self.local_crops_number >= 0, "objective.local_crops_number must be >= 0 (0 = no local crops)"),
            (self.koleo_weight >= 0, "objective.koleo_weight must be >= 0 (0 = off)"),
        ]  # fmt: skip
        for key in ("hflip_prob", "color_jitter_prob", "gray_scale_prob", "solarization_prob"):
            checks.append((0.0 <= getattr(self, key) <= 1.0, f"objective.{key} must be a probability in [0, 1]"))
        checks.append((all(0.0 <= p <= 1.0 for p in self.blur_probs), "objective.blur_probs must be in [0, 1]"))
        for key in ("global_crops_scale", "local_crops_scale"):
            low, high = getattr(self, key)
            checks.append((0.0 < low <= high <= 1.0, f"objective.{key}=({low}, {high}) needs 0 < min <= max <= 1"))
        for ok, message in checks:
            if not ok:
                raise RecipeError(message)


class DINO(Objective):
    """DINO around a timm model's pooled feature (``num_classes=0`` forward).

    A ViT needs a class token and ``dynamic_img_size=True`` (see :meth:`backbone_kwargs`); any other timm backbone
    (CNN, Swin, MLP-Mixer, ...) is used through its pooled output, and :meth:`visualize` logs nothing for it.
    """

    name = "dino"
    Config = DINOConfig
    warmup_reaches_base_at_last_step = True  # [1]'s lr warmup is np.linspace(0, lr, W)

    def __init__(self, encoder: nn.Module, cfg: DINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.global_crop_size = cfg.global_crop_size or input_size(encoder)
        if isinstance(encoder, VisionTransformer):
            if encoder.cls_token is None or not getattr(encoder, "dynamic_img_size", False):
                raise RecipeError("DINO needs a timm ViT with a class token built with dynamic_img_size=True")
            patch = patch_size(encoder)
            for key, size in (("global_crop_size", self.global_crop_size), ("local_crop_size", cfg.local_crop_size)):
                if size % patch:
                    raise RecipeError(f"objective.{key}={size} is not a multiple of model.patch_size={patch}")
        self.feature_dim, self.local_crop_size = self._crop_sizes(encoder)
        self.student_backbone = encoder
        self.student_head = self._head()
        self.teacher_backbone = copy.deepcopy(encoder)
        disable_drop_path(self.teacher_backbone)
        self.teacher_head = self._head()  # weight norm cannot be deep-copied: build it, then copy the weights
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)
        self.dino_loss = DINOLoss(
            output_dim=cfg.out_dim,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum,
        )
        self.teacher_temp = teacher_temperature(cfg, 0)  # set per step by before_step
        # The loss hands its teacher outputs to update_center; we apply them in after_step instead, so a step the
        # loop skips (non-finite loss or gradients) moves neither the teacher nor the centre.
        self._pending_centre: list[Tensor] = []
        self.dino_loss.update_center = self._pending_centre.append
        self.koleo = KoLeoLoss() if cfg.koleo_weight else None

    def _crop_sizes(self, encoder: nn.Module) -> tuple[int, int]:
        """The backbone's pooled feature width, and the local crop size it takes (else the global crop size).

        A ViT (checked above) takes any multiple of its patch size: only other families are probed, by one forward
        per crop size (:func:`~sslvit.backbone.pooled_feature_dim`).

        Raises:
            RecipeError: the backbone cannot take the global crops, or returns no pooled feature.
        """
        if isinstance(encoder, VisionTransformer):
            return encoder.embed_dim, self.cfg.local_crop_size
        name = getattr(encoder, "pretrained_cfg", {}).get("architecture", type(encoder).__name__)
        try:
            dim = pooled_feature_dim(encoder, self.global_crop_size)
        except RecipeError as err:
            raise RecipeError(f"DINO's backbone {name} {err}: set objective.global_crop_size (null = model.img_size) "
                              "to a size it takes, or pick another model.name") from None  # fmt: skip
        local = self.cfg.local_crop_size
        if self.cfg.local_crops_number and local != self.global_crop_size:
            try:
                pooled_feature_dim(encoder, local)
            except RecipeError as err:
                log.warning("%s %s: local crops are made at the global crop size, %d px (slower); set "
                            "objective.local_crop_size to a size it takes, or objective.local_crops_number=0",
                            name, err, self.global_crop_size)  # fmt: skip
                local = self.global_crop_size
        return dim, local

    def _head(self) -> DINOProjectionHead:
        # lightly's head uses torch's deprecated weight_norm, whose weight_g / weight_v keys are [1]'s own
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
            return DINOProjectionHead(
                input_dim=self.feature_dim,
                hidden_dim=self.cfg.hidden_dim,
                bottleneck_dim=self.cfg.bottleneck_dim,
                output_dim=self.cfg.out_dim,
                freeze_last_layer=self.cfg.freeze_last_layer,
                norm_last_layer=self.cfg.norm_last_layer,
                batch_norm=self.cfg.use_bn_in_head,
            )

    @classmethod
    def backbone_kwargs(cls, cfg: DINOConfig) -> dict[str, Any]:
        return {"dynamic_img_size": True}  # local crops are smaller than the model's image size

    def views(self) -> Callable[[Any], Any]:
        """[1]'s ``DataAugmentationDINO`` through lightly's ``DINOTransform``, with the config's probabilities.

        lightly's colour jitter is ``cj_strength * (cj_bright, cj_contrast, cj_sat, cj_hue)`` = [1]'s
        (0.4, 0.4, 0.2, 0.1); its second global crop ignores ``cj_strength`` and uses the default 0.5, so 0.5 it is.
        """
        cfg = self.cfg
        return DINOTransform(
            global_crop_size=self.global_crop_size, global_crop_scale=cfg.global_crops_scale,
            local_crop_size=self.local_crop_size, local_crop_scale=cfg.local_crops_scale,
            n_local_views=cfg.local_crops_number, hf_prob=cfg.hflip_prob, vf_prob=0.0, rr_prob=0.0,
            cj_prob=cfg.color_jitter_prob, cj_strength=0.5, cj_bright=0.8, cj_contrast=0.8, cj_sat=0.4, cj_hue=0.2,
            random_gray_scale=cfg.gray_scale_prob, gaussian_blur=cfg.blur_probs, sigmas=(0.1, 2.0),
            solarization_prob=cfg.solarization_prob,
            normalize=IMAGENET_NORMALIZE,
        )  # fmt: skip

    def augmentation(self) -> Augmentation:
        """The same views as :meth:`views` for ``data.augment_on=device``: 2 global crops then the local ones."""
        cfg, jitter = self.cfg, (0.4, 0.4, 0.2, 0.1)  # cj_strength 0.5 * (0.8, 0.8, 0.4, 0.2), as views()
        common = dict(hflip_prob=cfg.hflip_prob, jitter_prob=cfg.color_jitter_prob, jitter=jitter,
                      gray_prob=cfg.gray_scale_prob, sigmas=(0.1, 2.0))  # fmt: skip
        first = ViewSpec(self.global_crop_size, cfg.global_crops_scale, blur_prob=cfg.blur_probs[0], **common)
        second = ViewSpec(
            self.global_crop_size, cfg.global_crops_scale, blur_prob=cfg.blur_probs[1],
            solarize_prob=cfg.solarization_prob, **common,
        )  # fmt: skip
        local = ViewSpec(self.local_crop_size, cfg.local_crops_scale, blur_prob=cfg.blur_probs[2], **common)
        views = (first, second) + (local,) * cfg.local_crops_number
        return Augmentation(views, tuple(IMAGENET_NORMALIZE["mean"]), tuple(IMAGENET_NORMALIZE["std"]))

    def encoder_for_export(self) -> nn.Module:
        return self.teacher_backbone

    def compute_loss(self, student_out: Tensor, teacher_out: Tensor) -> Tensor:
        """[1]'s DINO loss at the current teacher temperature; queues the centre update for :meth:`after_step`.

        Args:
            student_out: ``(V * B, out_dim)`` student head outputs, crop-major (2 global crops first).
            teacher_out: ``(2 * B, out_dim)`` teacher head outputs for the 2 global crops.
        """
        n_crops = student_out.shape[0] // (teacher_out.shape[0] // 2)
        with torch.autocast(student_out.device.type, enabled=False):
            if self.cfg.centering == "sinkhorn_knopp":
                targets = sinkhorn_knopp(teacher_out.detach(), self.teacher_temp)
                return cross_entropy_pairs(targets.chunk(2), student_out.float().chunk(n_crops), self.cfg.student_temp)
            return self.dino_loss(
                teacher_out=list(teacher_out.detach().float().chunk(2)),
                student_out=list(student_out.float().chunk(n_crops)),
                teacher_temp=self.teacher_temp,
            )

    @torch.no_grad()
    def collapse_signals(self, teacher_out: Tensor, student_features: Tensor) -> dict[str, Tensor]:
        """Detached collapse monitors (in nats; ``log(out_dim)`` is uniform).

        ``teacher_batch_entropy``: entropy of the batch-mean teacher distribution (falls on collapse to one
        dimension); ``teacher_sample_entropy``: mean per-sample entropy (rises to ``log(out_dim)`` on collapse to
        uniform); ``student_feature_std``: std of the L2-normalised student backbone features (0 on collapse,
        about ``1/sqrt(D)`` when spread).
        """
        if self.cfg.centering == "sinkhorn_knopp":
            probs = sinkhorn_knopp(teacher_out, self.teacher_temp)
        else:
            probs = torch.softmax((teacher_out.float() - self.dino_loss.center.view(1, -1)) / self.teacher_temp, dim=-1)
        return {
            "teacher_batch_entropy": torch.special.entr(probs.mean(dim=0)).sum(),
            "teacher_sample_entropy": torch.special.entr(probs).sum(dim=-1).mean(),
            "student_feature_std": std_of_l2_normalized(student_features.float()),
        }

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        views = batch["views"]
        with torch.no_grad():
            _, teacher_out = multicrop_forward(self.teacher_backbone, self.teacher_head, views[:2])
        student_features, student_out = multicrop_forward(self.student_backbone, self.student_head, views)
        global_features = student_features[: teacher_out.shape[0]]
        signals = self.collapse_signals(teacher_out, global_features)  # before centring
        loss = self.compute_loss(student_out, teacher_out)
        if self.koleo is None:
            return {"loss": loss, **signals}
        with torch.autocast(global_features.device.type, enabled=False):  # [2]: per global crop, summed
            koleo = sum(self.koleo(crop) for crop in global_features.float().chunk(2))
        return {"loss": loss + self.cfg.koleo_weight * koleo, "koleo": koleo.detach(), **signals}

    def before_step(self, progress: Progress) -> None:
        self.teacher_temp = teacher_temperature(self.cfg, progress.whole_epoch)
        self._pending_centre.clear()  # outputs of a skipped step never reach the centre

    def after_backward(self, progress: Progress) -> None:
        """Drop the last layer's gradients during the first ``freeze_last_layer`` epochs (as [1])."""
        self.student_head.cancel_last_layer_gradients(progress.whole_epoch)

    def after_step(self, progress: Progress) -> dict[str, float]:
        momentum = teacher_momentum(self.cfg.momentum_teacher, progress.step, progress.total_steps)
        self.update_teacher(momentum)
        for teacher_out in self._pending_centre:  # lightly's EMA of the (all-reduced) batch centre
            if self.cfg.centering == "ema":
                DINOLoss.update_center(self.dino_loss, teacher_out)
        self._pending_centre.clear()
        return {"momentum": momentum, "teacher_temp": self.teacher_temp}

    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student, over every parameter (as [1])."""
        student = [*self.student_backbone.parameters(), *self.student_head.parameters()]
        ema_update([*self.teacher_backbone.parameters(), *self.teacher_head.parameters()], student, momentum)

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The teacher's last-block class-token attention on the first global crop: one row per image.

        Other backbones have no class-token attention to show: nothing is logged for them.
        """
        if not isinstance(self.teacher_backbone, VisionTransformer):
            return {}
        images = batch["views"][0]
        return {"dino/teacher_attention": attention_grid(images, cls_attention_maps(self.teacher_backbone, images))}


def cross_entropy_pairs(targets: tuple[Tensor, ...], student_out: tuple[Tensor, ...], student_temp: float) -> Tensor:
    """[1]'s loss given teacher targets: ``-sum t * log_softmax(s / T)`` averaged over every (teacher crop, student
    crop) pair of different crops and over the batch, exactly as lightly's ``DINOLoss`` averages it.

    Args:
        targets: one ``(B, K)`` distribution per teacher (global) crop.
        student_out: one ``(B, K)`` output per student crop, global crops first.
    """
    log_probs = torch.stack([F.log_softmax(s / student_temp, dim=-1) for s in student_out])  # (S, B, K)
    loss = -torch.einsum("tbk,sbk->ts", torch.stack(list(targets)), log_probs)  # (T, S) sums over the batch
    loss.fill_diagonal_(0)  # a crop is not compared with itself
    pairs = loss.numel() - min(loss.shape)
    return loss.sum() / (pairs * log_probs.shape[1])
