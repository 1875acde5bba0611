"""bytedance/ibot, restated: iBOT's head, masked multi-crop forward, loss (both centres, both temperature schedules),
frozen last layers and teacher update.

Source: https://github.com/bytedance/ibot at commit da316d82636a7a7356835ef224b13d5f3ace0489
- main_ibot.py: ``iBOTLoss`` (``__init__``'s two teacher-temperature schedules, ``forward``, ``update_center``) and
  the teacher's EMA over the parameters the student and teacher have in common, in ``train_one_epoch`` (here
  :func:`common_parameters` and :func:`ema_update_teacher`). ``iBOTLoss`` is unchanged since commit 564f363d, the
  one sslvit/objectives/ibot.py cites; da316d82 only hoisted the common-parameter lists out of the step loop.
- models/head.py (c24f870d, unchanged since): ``DINOHead`` and ``iBOTHead`` (``shared_head`` true: the patch
  tokens use the CLS token's last layer; false: the MLP is shared, the patch tokens get their own weight-normalised
  ``last_layer2``).
- utils.py (c24f870d): ``MultiCropWrapper`` (with its per-resolution ``mask``), ``cancel_gradients_last_layer``,
  ``cosine_scheduler`` (the teacher momentum).
- models/vision_transformer.py (c24f870d): ``VisionTransformer.mask_model`` and the masking step of
  ``prepare_tokens``, restated on a timm ViT by :class:`MaskedViT` (shim 5).

This is an independent restatement in our own words (the authors' code is not copied here): the same function
boundaries, argument order and order of floating-point operations, so that a comparison with sslvit is meaningful.
It imports nothing from sslvit.

Environment shims (the math is untouched):
1. One process: ``dist.all_reduce`` in ``update_center`` is the identity and ``dist.get_world_size()`` is 1.
2. ``DINOHead`` / ``iBOTHead`` keep only the options iBOT's ViT commands use: ``norm=None`` (no norm in the MLP),
   ``act='gelu'``, ``last_norm=None``, ``bottleneck_dim > 0``; the other branches (BatchNorm variants, ReLU, no
   bottleneck) are left out, not changed. With no norm layer the authors' ``CustomSequential`` is a plain
   ``nn.Sequential``. Weights are initialised with timm's ``trunc_normal_`` (the authors' ``utils.trunc_normal_``
   is the same truncated normal); the tests overwrite them with sslvit's anyway.
3. ``nn.utils.weight_norm`` is deprecated in recent torch; the authors' call is kept (its ``weight_g`` /
   ``weight_v`` names) and only its FutureWarning is silenced.
4. No ``.cuda()``, DDP or fp16 autocast: everything runs on the CPU in float32.
5. The backbone is a timm ViT (``dynamic_img_size=True``), the one sslvit uses, instead of the authors' own ViT (a
   deliberate deviation listed in sslvit/objectives/dino.py). :class:`MaskedViT` gives it the authors' interface
   (``forward(x, mask=None)`` returning every token, a ``masked_im_modeling`` switch) and restates the authors'
   masking on it: the patch embeddings at masked positions are overwritten in place by ``masked_embed`` before
   the class token and position embedding are added. timm's patch embedding is already channels-last, which is
   what the authors' ``permute(0, 2, 3, 1)`` view gives.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from tests.reference import dino_reference

# --- models/vision_transformer.py (shim 5) --------------------------------------------------------------------------


class MaskedViT(nn.Module):
    """A timm ViT behind the authors' ViT interface: every token out, masked patches replaced by ``masked_embed``."""

    def __init__(self, vit: nn.Module, masked_im_modeling: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.masked_im_modeling = masked_im_modeling
        if masked_im_modeling:  # as the authors: only a model built for masked image modelling has the embedding
            self.masked_embed = nn.Parameter(torch.zeros(1, vit.embed_dim))

    def mask_model(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x``: ``(B, H, W, D)`` patch embeddings, ``mask``: ``(B, H, W)`` bool; masked rows set in place."""
        x[mask, :] = self.masked_embed.to(x.dtype)
        return x

    def prepare_tokens(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.vit.patch_embed(x)
        if mask is not None:
            x = self.mask_model(x, mask)
        return self.vit.norm_pre(self.vit.patch_drop(self.vit._pos_embed(x)))  # class token, position embedding

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.masked_im_modeling:
            assert mask is not None
            x = self.prepare_tokens(x, mask=mask)
        else:
            x = self.prepare_tokens(x)
        return self.vit.norm(self.vit.blocks(x))  # return_all_tokens=True: (B, 1 + N, D)


# --- utils.py -------------------------------------------------------------------------------------------------------


# bytedance/ibot utils.py's ``cosine_scheduler`` and ``cancel_gradients_last_layer`` are, line for line,
# facebookresearch/dino utils.py's (compared at both pinned commits): the DINO restatement serves both. Its
# ``*last_layer*`` name match also drops iBOT's ``last_layer2``.
cosine_scheduler = dino_reference.cosine_scheduler
cancel_gradients_last_layer = dino_reference.cancel_gradients_last_layer


class MultiCropWrapper(nn.Module):
    """One backbone forward per run of consecutive crops of equal width (with their masks, when given), the head
    once on the concatenated outputs."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()  # no classification layers
        self.backbone = backbone
        self.head = head

    def forward(self, x: Tensor | list[Tensor], mask: list[Tensor] | None = None, **kwargs):
        if not isinstance(x, list):
            x = [x]
            mask = [mask] if mask is not None else None
        widths = torch.tensor([crop.shape[-1] for crop in x])
        ends = torch.cumsum(torch.unique_consecutive(widths, return_counts=True)[1], 0)
        start, output = 0, torch.empty(0)
        for end in ends:
            batch = torch.cat(x[start:end])
            if mask is not None:
                kwargs.update(mask=torch.cat(mask[start:end]))
            out = self.backbone(batch, **kwargs)
            output = out if start == 0 else torch.cat((output, out))
            start = end
        return self.head(output)


# --- models/head.py (shim 2) ----------------------------------------------------------------------------------------


def _weight_normed_linear(in_dim: int, out_dim: int, norm_last_layer: bool) -> nn.Module:
    """A bias-free linear layer under weight normalisation, its norm ``weight_g`` at 1 (frozen if normalised)."""
    with warnings.catch_warnings():  # shim 3
        warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
        layer = nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    layer.weight_g.data.fill_(1)
    if norm_last_layer:
        layer.weight_g.requires_grad = False
    return layer


class DINOHead(nn.Module):
    """iBOT's DINOHead: Linear-GELU (-Linear-GELU) x (nlayers - 2) -Linear to the bottleneck, L2 normalisation,
    weight-normalised last layer."""

    def __init__(
        self, in_dim: int, out_dim: int, nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(self._init_weights)
        self.last_layer = _weight_normed_linear(bottleneck_dim, out_dim, norm_last_layer)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


class iBOTHead(DINOHead):  # noqa: N801 (the authors' name)
    """DINOHead for the CLS token plus a patch-token branch: with ``shared_head`` the same last layer (one head);
    without, the shared MLP and normalisation followed by a last layer of its own, ``last_layer2``
    (``patch_out_dim`` wide, weight-normalised and frozen like ``last_layer``)."""

    def __init__(
        self, in_dim: int, out_dim: int, patch_out_dim: int = 8192, nlayers: int = 3, hidden_dim: int = 2048,
        bottleneck_dim: int = 256, norm_last_layer: bool = True, shared_head: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(in_dim, out_dim, nlayers, hidden_dim, bottleneck_dim, norm_last_layer)
        if not shared_head:
            self.last_layer2 = _weight_normed_linear(bottleneck_dim, patch_out_dim, norm_last_layer)
        else:
            self.last_layer2 = self.last_layer  # the same module (named_parameters lists it once, as last_layer)

    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """``(B, D)``: DINOHead's output; ``(B, 1 + N, D)``: (CLS output ``(B, K)``, patch outputs ``(B, N, K2)``)."""
        if x.dim() == 2:
            return super().forward(x)
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x[:, 0]), self.last_layer2(x[:, 1:])


# --- main_ibot.py ---------------------------------------------------------------------------------------------------


class iBOTLoss(nn.Module):  # noqa: N801 (the authors' name)
    """DINO's CLS cross-entropy over crop pairs ``v != q`` plus the masked-patch cross-entropy for ``v == q``,
    weighted by ``lambda1`` and ``lambda2``; each with its own centre and teacher temperature schedule."""

    def __init__(
        self, out_dim: int, patch_out_dim: int, ngcrops: int, nlcrops: int, warmup_teacher_temp: float,
        teacher_temp: float, warmup_teacher_temp2: float, teacher_temp2: float, warmup_teacher_temp_epochs: int,
        nepochs: int, student_temp: float = 0.1, center_momentum: float = 0.9, center_momentum2: float = 0.9,
        lambda1: float = 1.0, lambda2: float = 1.0, mim_start_epoch: int = 0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum, self.center_momentum2 = center_momentum, center_momentum2
        self.ngcrops, self.nlcrops = ngcrops, nlcrops
        self.ncrops = ngcrops + nlcrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("center2", torch.zeros(1, 1, patch_out_dim))
        self.lambda1, self.lambda2 = lambda1, lambda2
        # per epoch: the CLS temperature warms up linearly over warmup_teacher_temp_epochs, then stays
        self.teacher_temp_schedule = np.concatenate(
            (
                np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
            )
        )
        # the patch temperature likewise, but held at its warmup value for the mim_start_epoch epochs first
        if mim_start_epoch == 0:
            parts = (
                np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp2,
            )
        else:
            parts = (
                np.ones(mim_start_epoch) * warmup_teacher_temp2,
                np.linspace(warmup_teacher_temp2, teacher_temp2, warmup_teacher_temp_epochs),
                np.ones(nepochs - warmup_teacher_temp_epochs - mim_start_epoch) * teacher_temp2,
            )
        self.teacher_temp2_schedule = np.concatenate(parts)

    def forward(
        self, student_output: tuple[Tensor, Tensor], teacher_output: tuple[Tensor, Tensor],
        student_local_cls: Tensor | None, student_mask: list[Tensor], epoch: int,
    ) -> dict[str, Tensor]:  # fmt: skip
        """``student_output`` / ``teacher_output``: (CLS ``(ngcrops * B, K)``, patches ``(ngcrops * B, N, K2)``)
        of the global crops, crop-major; ``student_local_cls``: ``(nlcrops * B, K)``; ``student_mask``: one
        ``(B, H, W)`` bool per global crop. Moves both centres."""
        student_cls, student_patch = student_output
        teacher_cls, teacher_patch = teacher_output
        if student_local_cls is not None:
            student_cls = torch.cat([student_cls, student_local_cls])

        student_cls = student_cls / self.student_temp
        student_cls_c = student_cls.chunk(self.ncrops)
        student_patch = student_patch / self.student_temp
        student_patch_c = student_patch.chunk(self.ngcrops)

        temp = self.teacher_temp_schedule[epoch]
        temp2 = self.teacher_temp2_schedule[epoch]
        teacher_cls_c = F.softmax((teacher_cls - self.center) / temp, dim=-1).detach().chunk(self.ngcrops)
        teacher_patch_c = F.softmax((teacher_patch - self.center2) / temp2, dim=-1).detach().chunk(self.ngcrops)

        total_loss1, n_loss_terms1 = 0, 0
        total_loss2, n_loss_terms2 = 0, 0
        for q in range(len(teacher_cls_c)):
            for v in range(len(student_cls_c)):
                if v == q:  # the same global crop: masked patches against the teacher's unmasked ones
                    loss2 = torch.sum(-teacher_patch_c[q] * F.log_softmax(student_patch_c[v], dim=-1), dim=-1)
                    mask = student_mask[v].flatten(-2, -1)
                    loss2 = torch.sum(loss2 * mask.float(), dim=-1) / mask.sum(dim=-1).clamp(min=1.0)
                    total_loss2 += loss2.mean()
                    n_loss_terms2 += 1
                else:
                    loss1 = torch.sum(-teacher_cls_c[q] * F.log_softmax(student_cls_c[v], dim=-1), dim=-1)
                    total_loss1 += loss1.mean()
                    n_loss_terms1 += 1
        total_loss1 = total_loss1 / n_loss_terms1 * self.lambda1
        total_loss2 = total_loss2 / n_loss_terms2 * self.lambda2
        total = {"cls": total_loss1, "patch": total_loss2, "loss": total_loss1 + total_loss2}
        self.update_center(teacher_cls, teacher_patch)
        return total

    @torch.no_grad()
    def update_center(self, teacher_cls: Tensor, teacher_patch: Tensor) -> None:
        """EMAs of the batch mean CLS output and of the batch mean of each image's mean patch output (shim 1)."""
        world_size = 1  # dist.all_reduce is the identity in one process
        cls_center = torch.sum(teacher_cls, dim=0, keepdim=True)
        cls_center = cls_center / (len(teacher_cls) * world_size)
        self.center = self.center * self.center_momentum + cls_center * (1 - self.center_momentum)

        patch_center = torch.sum(teacher_patch.mean(1), dim=0, keepdim=True)
        patch_center = patch_center / (len(teacher_patch) * world_size)
        self.center2 = self.center2 * self.center_momentum2 + patch_center * (1 - self.center_momentum2)


def common_parameters(student: nn.Module, teacher: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """train_one_epoch's "common params": the student's and the teacher's parameters whose names both have, each in
    its own module's order (so a student-only ``last_layer2`` is left out when the teacher shares its head)."""
    names_q, params_q = zip(*student.named_parameters())
    names_k, params_k = zip(*teacher.named_parameters())
    common = set(names_q) & set(names_k)
    return (
        [p for n, p in zip(names_q, params_q) if n in common],
        [p for n, p in zip(names_k, params_k) if n in common],
    )


def ema_update_teacher(params_q: list[Tensor], params_k: list[Tensor], m: float) -> None:
    """train_one_epoch's "EMA update for the teacher": ``param_k = param_k * m + (1 - m) * param_q`` in place, over
    the common parameters paired in order (``m`` is ``momentum_schedule[it]``)."""
    with torch.no_grad():
        for param_q, param_k in zip(params_q, params_k):
            param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
