"""facebookresearch/dinov2, restated: the KoLeo regulariser, Sinkhorn-Knopp teacher targets, the DINO and masked-patch
losses of DINOv2, the head, and the way ``SSLMetaArch.forward_backward`` combines them into one loss.

Source: https://github.com/facebookresearch/dinov2 at commit b8931f7bf91576930313be2c6d6af376033b35f0 (the files
below last changed in 81b2b64, Aug 2023, a licence header; their code is that of the commit 05c66df0 sslvit's
docstrings cite):
- dinov2/loss/koleo_loss.py: ``KoLeoLoss`` (``pairwise_NNs_inner``, ``forward``);
- dinov2/loss/dino_clstoken_loss.py: ``DINOLoss`` (``sinkhorn_knopp_teacher``, ``forward``);
- dinov2/loss/ibot_patch_loss.py: ``iBOTPatchLoss`` (``sinkhorn_knopp_teacher``, ``forward_masked``, and the
  ``lossfunc`` it uses);
- dinov2/layers/dino_head.py: ``DINOHead`` and ``_build_mlp``;
- dinov2/models/vision_transformer.py: ``prepare_tokens_with_masks`` and ``forward_features`` of
  ``DinoVisionTransformer`` (here :func:`forward_features`, on a timm ViT's modules: shim 5);
- dinov2/data/collate.py: the mask part of ``collate_data_and_cast`` (here :func:`collate_masks`);
- dinov2/train/ssl_meta_arch.py: ``SSLMetaArch.forward_backward`` from the backbone outputs on, with
  ``train.centering: sinkhorn_knopp`` (here :func:`forward_backward_loss`).

This is an independent restatement in our own words (the authors' code is not copied here): the same function
boundaries, argument order and order of floating-point operations, so that a comparison with sslvit is meaningful.
It imports nothing from sslvit.

Environment shims (the math is untouched):
1. One process: every ``dist.all_reduce`` is the identity and the world size is 1. This includes the unconditional
   ``dist.all_reduce(B)`` of the masked-patch ``sinkhorn_knopp_teacher`` (it needs a process group in the original):
   there ``B`` is the number of masked patches of this process.
2. xformers is not installed: ``lossfunc`` is the plain-torch fallback the authors define for that case (the same
   cross-entropy), and ``fmha.BlockDiagonalMask.from_tensor_list`` / ``split`` around the student head become a
   concatenation along the token axis and a split back (the head acts on each token alone; no attention there).
3. ``KoLeoLoss.forward`` switches autocast off with the current ``torch.autocast(device_type, enabled=False)``
   instead of the deprecated ``torch.cuda.amp.autocast(enabled=False)``.
4. No FSDP, ``.cuda()`` or fp16 grad scaler: CPU, float32. ``nn.utils.weight_norm`` (deprecated) is kept, its
   FutureWarning silenced.
5. The authors' ViT needs xformers: :func:`forward_backward_loss` starts from the backbone outputs
   (``x_norm_clstoken``, ``x_norm_patchtokens``). For the masked global crops :func:`forward_features` restates the
   authors' token preparation (mask token, class token, position embedding) around the patch embedding, blocks
   and norm of the timm ViT sslvit uses; the local crops' class tokens are that timm ViT's own forward (its
   position-embedding resampling differs from the authors' ``interpolate_pos_encoding``, a deviation listed in
   sslvit/objectives/dino.py). The comparison covers the masking, heads, losses and their combination, not the
   authors' blocks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

# --- dinov2/loss/koleo_loss.py --------------------------------------------------------------------------------------


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimate (Sablayrolles et al. 2018): minus the mean log distance of each
    L2-normalised vector to its nearest neighbour in the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:  # noqa: N802 (the authors' name)
        """Index of each row's nearest neighbour among the other rows of unit vectors ``x: (B, D)``: the largest
        inner product, with the diagonal first overwritten by -1 so that a row is not its own neighbour."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # the diagonal of the flattened (n, n) matrix
        _, indices = torch.max(dots, dim=1)
        return indices

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """``student_output: (B, D)`` student backbone features -> scalar loss, in float32 (shim 3)."""
        with torch.autocast(student_output.device.type, enabled=False):
            student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
            indices = self.pairwise_NNs_inner(student_output)
            distances = self.pdist(student_output, student_output[indices])  # (B,)
            loss = -torch.log(distances + eps).mean()
        return loss


# --- dinov2/loss/dino_clstoken_loss.py ------------------------------------------------------------------------------


class DINOLoss(nn.Module):
    """DINOv2's CLS-token loss. Only the Sinkhorn-Knopp path is restated (the EMA centre is DINO's, compared in
    test_dino_reference.py)."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """``teacher_output: (B, K)`` -> ``(B, K)`` targets: ``Q = exp(t / T)`` as ``(K, B)`` scaled to total mass 1,
        then ``n_iterations`` times each prototype's row to mass ``1/K`` and each sample's column to ``1/B``;
        finally the columns times ``B``, so each sample's targets sum to 1 (shim 1: one process)."""
        teacher_output = teacher_output.float()
        world_size = 1
        q = torch.exp(teacher_output / teacher_temp).t()
        samples = q.shape[1] * world_size
        prototypes = q.shape[0]
        total = torch.sum(q)  # all-reduced in the original
        q /= total
        for _ in range(n_iterations):
            rows = torch.sum(q, dim=1, keepdim=True)  # all-reduced in the original
            q /= rows
            q /= prototypes
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= samples
        q *= samples
        return q.t()

    def forward(self, student_output_list: list[Tensor], teacher_out_softmaxed_centered_list: Tensor) -> Tensor:
        """Minus the batch-mean of ``sum_k t * log_softmax(s / T_s)``, summed over every (student, teacher) pair of
        the two lists (no pair is skipped: the caller arranges which crops meet)."""
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                loss = torch.sum(t * lsm, dim=-1)
                total_loss -= loss.mean()
        return total_loss


# --- dinov2/loss/ibot_patch_loss.py ---------------------------------------------------------------------------------


def lossfunc(t: Tensor, s: Tensor, temp: float) -> Tensor:
    """The authors' fallback when xformers is missing (shim 2): ``sum_k t * log_softmax(s / temp)`` per row."""
    return torch.sum(t * F.log_softmax(s / temp, dim=-1), dim=-1)


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the authors' name)
    """DINOv2's masked-patch loss: the Sinkhorn-Knopp targets and ``forward_masked`` (what ``SSLMetaArch`` calls)."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_output: Tensor, teacher_temp: float, n_masked_patches_tensor: Tensor, n_iterations: int = 3
    ) -> Tensor:
        """As :meth:`DINOLoss.sinkhorn_knopp_teacher` on the ``(M, K)`` masked teacher patches, except that the number
        of samples is ``n_masked_patches_tensor`` all-reduced (shim 1: this process's ``M``), not the columns times
        the world size."""
        teacher_output = teacher_output.float()
        q = torch.exp(teacher_output / teacher_temp).t()
        samples = n_masked_patches_tensor  # dist.all_reduce(samples) in the original: the identity here
        prototypes = q.shape[0]
        total = torch.sum(q)
        q /= total
        for _ in range(n_iterations):
            rows = torch.sum(q, dim=1, keepdim=True)
            q /= rows
            q /= prototypes
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= samples
        q *= samples
        return q.t()

    def forward_masked(
        self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor, student_masks_flat: Tensor,
        n_masked_patches: int | None = None, masks_weight: Tensor | None = None,
    ) -> Tensor:  # fmt: skip
        """Cross-entropy on the ``M`` masked patches, each weighted by ``1 / (masked patches of its image)``, summed,
        over the number of images ``student_masks_flat.shape[0]`` (an image with no masked patch adds 0)."""
        loss = lossfunc(teacher_patch_tokens_masked, student_patch_tokens_masked, self.student_temp)
        if masks_weight is None:
            per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
            masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[student_masks_flat]
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]


# --- dinov2/layers/dino_head.py -------------------------------------------------------------------------------------


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool = False,
               bias: bool = True) -> nn.Module:  # fmt: skip
    """Linear layers with GELU between them (BatchNorm after each hidden Linear with ``use_bn``)."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=bias)]
    layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
    layers.append(nn.GELU())
    for _ in range(nlayers - 2):
        layers.append(nn.Linear(hidden_dim, hidden_dim, bias=bias))
        layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP to a bottleneck, L2 normalisation (eps 1e-12 in float32), weight-normalised linear layer whose norms
    ``weight_g`` start at 1 and are trained (DINOv2 has no ``norm_last_layer`` option)."""

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, mlp_bias: bool = True) -> None:  # fmt: skip
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim=hidden_dim, use_bn=use_bn, bias=mlp_bias)
        self.apply(self._init_weights)
        with warnings.catch_warnings():  # shim 4
            warnings.filterwarnings("ignore", message=".*weight_norm.* is deprecated", category=FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.weight_g.data.fill_(1)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)


# --- dinov2/models/vision_transformer.py ----------------------------------------------------------------------------


def forward_features(vit: nn.Module, x: Tensor, masks: Tensor, mask_token: Tensor) -> dict[str, Tensor]:
    """``prepare_tokens_with_masks`` then ``forward_features`` (no register tokens) on a timm ViT's modules (shim 5):
    each masked patch embedding replaced by ``mask_token``, the class token prepended, the position embedding
    added (at the size it was built for, where the authors' ``interpolate_pos_encoding`` returns it unchanged),
    the blocks, the final norm.

    Args:
        x: ``(B, 3, H, W)`` images at the ViT's own size; masks: ``(B, N)`` bool, True = masked.
    """
    tokens = vit.patch_embed(x)
    if tokens.ndim == 4:  # timm's dynamic_img_size keeps the (H, W) grid: the authors' PatchEmbed flattens it
        tokens = tokens.flatten(1, 2)
    tokens = torch.where(masks.unsqueeze(-1), mask_token.reshape(1, -1).to(tokens.dtype).unsqueeze(0), tokens)
    tokens = torch.cat((vit.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
    assert vit.pos_embed.shape[1] == tokens.shape[1], "forward_features takes crops of the ViT's own size only"
    tokens = tokens + vit.pos_embed
    for block in vit.blocks:
        tokens = block(tokens)
    normed = vit.norm(tokens)
    return {"x_norm_clstoken": normed[:, 0], "x_norm_patchtokens": normed[:, 1:]}


# --- dinov2/data/collate.py -----------------------------------------------------------------------------------------


def collate_masks(masks_list: list[Tensor], upperbound: int) -> dict[str, Tensor | int]:
    """The mask outputs of ``collate_data_and_cast`` for the given per-crop masks (already drawn and shuffled:
    the authors' mask generator and ratios are not restated), crop-major like the collated global crops.

    ``upperbound`` (the authors' sum of ``int(N * ratio_max)``) only sizes the zero-padded buffers; it must be at
    least the number of masked patches.
    """
    collated_masks = torch.stack(masks_list).flatten(1)  # (2B, N) bool
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    per_image = 1 / collated_masks.sum(-1).clamp(min=1.0)
    masks_weight = per_image.unsqueeze(-1).expand_as(collated_masks)[collated_masks]
    return {
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


# --- dinov2/train/ssl_meta_arch.py ----------------------------------------------------------------------------------


def _teacher_targets(teacher_global: dict[str, Tensor], collated: dict, teacher_dino_head: nn.Module,
                     teacher_ibot_head: nn.Module | None, dino_loss: DINOLoss, ibot_patch_loss: iBOTPatchLoss,
                     teacher_temp: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``get_teacher_output`` with Sinkhorn-Knopp centring: the ``(2, B, K)`` CLS targets, each crop's computed from
    the *other* crop's teacher output (the chunks are swapped before the head), and the ``(M, K)`` patch targets."""
    mask_indices_list, upperbound = collated["mask_indices_list"], collated["upperbound"]
    n_masked_patches = mask_indices_list.shape[0]
    cls_tokens = teacher_global["x_norm_clstoken"].chunk(2)
    cls_tokens = torch.cat((cls_tokens[1], cls_tokens[0]))  # A's student crop meets B's teacher crop
    patch_tokens = teacher_global["x_norm_patchtokens"]
    dim, n_cls = patch_tokens.shape[-1], cls_tokens.shape[0]
    if teacher_ibot_head is None:  # shared head: CLS tokens and masked patches in one buffer
        buffer = patch_tokens.new_zeros(upperbound + n_cls, dim)
        buffer[:n_cls].copy_(cls_tokens)
        torch.index_select(patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list,
                           out=buffer[n_cls : n_cls + n_masked_patches])  # fmt: skip
        after_head = teacher_dino_head(buffer)
        cls_after_head = after_head[:n_cls]
        masked_after_head = after_head[n_cls : n_cls + n_masked_patches]
    else:
        buffer = patch_tokens.new_zeros(upperbound, dim)
        torch.index_select(patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list, out=buffer[:n_masked_patches])
        cls_after_head = teacher_dino_head(cls_tokens)
        masked_after_head = teacher_ibot_head(buffer)[:n_masked_patches]
    cls_targets = dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp)
    cls_targets = cls_targets.view(2, -1, *cls_after_head.shape[1:])
    patch_targets = ibot_patch_loss.sinkhorn_knopp_teacher(
        masked_after_head, teacher_temp=teacher_temp, n_masked_patches_tensor=collated["n_masked_patches"]
    )
    return cls_targets, patch_targets


def forward_backward_loss(
    teacher_global: dict[str, Tensor], student_global: dict[str, Tensor], student_local: dict[str, Tensor],
    collated: dict, heads: dict[str, nn.Module], teacher_temp: float, n_local_crops: int,
    koleo_loss_weight: float, dino_loss_weight: float = 1.0, ibot_loss_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """``SSLMetaArch.forward_backward`` (``train.centering: sinkhorn_knopp``, DINO, KoLeo and iBOT on) up to the
    ``backprop_loss`` call: the summed loss and the authors' ``loss_dict``.

    Args:
        teacher_global: the teacher backbone on the ``2B`` unmasked global crops: ``x_norm_clstoken (2B, D)``,
            ``x_norm_patchtokens (2B, N, D)``.
        student_global: the student backbone on the masked global crops (same keys).
        student_local: the student backbone on the ``n_local_crops * B`` local crops: ``x_norm_clstoken``.
        collated: :func:`collate_masks`'s output.
        heads: ``student_dino_head``, ``teacher_dino_head`` and, for ``ibot.separate_head``, ``student_ibot_head``
            and ``teacher_ibot_head``.
    """
    separate = "student_ibot_head" in heads
    out_dim = heads["student_dino_head"].last_layer.weight_v.shape[0]
    ibot_dim = heads["student_ibot_head"].last_layer.weight_v.shape[0] if separate else out_dim
    dino_loss, ibot_patch_loss, koleo = DINOLoss(out_dim), iBOTPatchLoss(ibot_dim), KoLeoLoss()
    n_global_crops = 2
    masks, masks_weight = collated["collated_masks"], collated["masks_weight"]
    mask_indices_list, upperbound = collated["mask_indices_list"], collated["upperbound"]
    n_masked_patches = mask_indices_list.shape[0]
    n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    ibot_loss_scale = 1.0 / n_global_crops
    with torch.no_grad():
        cls_targets, patch_targets = _teacher_targets(
            teacher_global, collated, heads["teacher_dino_head"], heads.get("teacher_ibot_head"), dino_loss,
            ibot_patch_loss, teacher_temp,
        )  # fmt: skip

    loss_dict: dict[str, Tensor] = {}
    loss_accumulator = 0
    inputs = [student_local["x_norm_clstoken"].unsqueeze(0), student_global["x_norm_clstoken"].unsqueeze(0)]
    dim = student_global["x_norm_clstoken"].shape[-1]
    patch_tokens = student_global["x_norm_patchtokens"]
    buffer = patch_tokens.new_zeros(upperbound, dim)
    buffer[:n_masked_patches].copy_(torch.index_select(patch_tokens.flatten(0, 1), dim=0, index=mask_indices_list))
    if not separate:
        inputs.append(buffer.unsqueeze(0))
    else:
        student_masked_after_head = heads["student_ibot_head"](buffer)[:n_masked_patches]
    # shim 2: BlockDiagonalMask.from_tensor_list / split = concatenate the tokens, split them back
    lengths = [t.shape[1] for t in inputs]
    outputs = list(heads["student_dino_head"](torch.cat(inputs, dim=1)).split(lengths, dim=1))
    local_after_head = outputs.pop(0).squeeze(0)
    global_after_head = outputs.pop(0).squeeze(0)
    if not separate:
        student_masked_after_head = outputs.pop(0).squeeze(0)[:n_masked_patches]

    if n_local_crops > 0:
        local_loss = dino_loss(
            student_output_list=local_after_head.chunk(n_local_crops), teacher_out_softmaxed_centered_list=cls_targets
        ) / (n_global_crops_loss_terms + n_local_crops_loss_terms)
        loss_dict["dino_local_crops_loss"] = local_loss
        loss_accumulator += dino_loss_weight * local_loss
    loss_scales = 2  # both global crops in one term
    both_targets = [cls_targets.flatten(0, 1)]  # crop A's students meet crop B's targets and vice versa
    global_loss = (
        dino_loss(student_output_list=[global_after_head], teacher_out_softmaxed_centered_list=both_targets)
        * loss_scales
        / (n_global_crops_loss_terms + n_local_crops_loss_terms)
    )  # fmt: skip
    loss_dict["dino_global_crops_loss"] = global_loss
    loss_accumulator += dino_loss_weight * global_loss
    koleo_loss = koleo_loss_weight * sum(koleo(p) for p in student_global["x_norm_clstoken"].chunk(2))
    loss_accumulator += koleo_loss
    loss_dict["koleo_loss"] = koleo_loss / loss_scales
    ibot_loss = (
        ibot_patch_loss.forward_masked(student_masked_after_head, patch_targets, student_masks_flat=masks,
                                       n_masked_patches=n_masked_patches, masks_weight=masks_weight)
        * loss_scales
        * ibot_loss_scale
    )  # fmt: skip
    loss_dict["ibot_loss"] = ibot_loss / 2
    loss_accumulator += ibot_loss_weight * ibot_loss
    return loss_accumulator, loss_dict
