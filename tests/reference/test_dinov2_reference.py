"""sslvit's DINOv2-style pieces against facebookresearch/dinov2 (restated in dinov2_reference.py): KoLeo, the
Sinkhorn-Knopp teacher targets (CLS tokens and masked patches, one process and two), the masked-patch loss, and a
whole DINOv2-style iBOT step (``centering="sinkhorn_knopp"``, KoLeo, shared or separate heads) against
``SSLMetaArch.forward_backward``: loss and every student gradient, to float32 rounding.

Run with ``-s`` to see the largest differences measured.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
from types import SimpleNamespace

import pytest
import torch

import sslvit.objectives.teacher as teacher_module
from sslvit.backbone import build_vit
from sslvit.objectives import Progress
from sslvit.objectives.dino import KoLeoLoss as SslvitKoLeo  # the KoLeo DINO and iBOT use (lightly's)
from sslvit.objectives.ibot import IBOT, IBOTConfig
from sslvit.objectives.teacher import sinkhorn_knopp
from sslvit.recipe import ModelConfig
from tests.reference.dinov2_reference import (
    DINOHead,
    DINOLoss,
    KoLeoLoss,
    collate_masks,
    forward_backward_loss,
    forward_features,
    iBOTPatchLoss,
)
from tests.reference.tolerance import FLOAT32_EPS, assert_float32_close

# Tolerances: float32 rounding, in units of float32 eps (1.19e-7) times the largest magnitude compared
# (tests/reference/tolerance.py). KoLeo is the same sequence of operations on both sides. sslvit's Sinkhorn-Knopp
# subtracts the largest logit before exp (a documented deviation, so a low temperature cannot overflow): rounding
# ``l / T - peak`` moves each exp by up to an ulp of ``|l / T|``, so targets are compared in ulps of the largest
# target times ``max(1, max |l / T|)``. The losses sum (teacher crop, student crop) pairs in another order (one
# einsum in sslvit, a loop in DINOv2): a few ulps; gradients through them: ulps of the largest gradient.
KOLEO_ULPS = 4
TARGET_ULPS = 4
LOSS_ULPS = 8
GRAD_ULPS = 16

MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
BATCH, LOCAL_CROPS = 4, 2
# DINOv2 has one teacher temperature for CLS and patches: the patch temperatures equal the CLS ones.
CFG = IBOTConfig(out_dim=64, hidden_dim=48, bottleneck_dim=16, norm_last_layer=False, freeze_last_layer=0,
                 local_crop_size=16, local_crops_number=LOCAL_CROPS, warmup_teacher_temp=0.04, teacher_temp=0.07,
                 warmup_teacher_patch_temp=0.04, teacher_patch_temp=0.07, warmup_teacher_temp_epochs=3,
                 student_temp=0.1, centering="sinkhorn_knopp", koleo_weight=0.1, lambda1=1.0, lambda2=1.0,
                 shared_head=True)  # fmt: skip


def cosine_logits(rows: int, prototypes: int, seed: int, dim: int = 16) -> torch.Tensor:
    """Head outputs as DINOv2's head makes them at init: unit bottleneck times unit prototypes, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=generator), dim=-1)
    return x @ w.t()


def target_scale(reference: torch.Tensor, logits: torch.Tensor, temp: float) -> float:
    return reference.abs().max().item() * max(1.0, (logits / temp).abs().max().item())


# --- KoLeo ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "dim", "spread"), [(8, 16, 1.0), (64, 384, 1.0), (16, 8, 1e-4)],
                         ids=["tiny", "batch64_vits", "near_duplicates"])  # fmt: skip
def test_koleo_equals_dinov2s_koleo_loss(rows, dim, spread):
    """Loss and input gradient of the KoLeo sslvit uses (lightly's) against the authors' ``KoLeoLoss``; the last
    case puts the vectors within 1e-4 of one direction, where the distances approach the eps."""
    generator = torch.Generator().manual_seed(rows)
    base = torch.randn(1, dim, generator=generator) * 3
    x = base + spread * torch.randn(rows, dim, generator=generator)
    ours_in, ref_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours, ref = SslvitKoLeo()(ours_in), KoLeoLoss()(ref_in)
    ours.backward()
    ref.backward()
    loss_diff = assert_float32_close(ours, ref, KOLEO_ULPS, "KoLeo loss")
    grad_diff = assert_float32_close(ours_in.grad, ref_in.grad, KOLEO_ULPS, "KoLeo gradient")
    largest = ref_in.grad.abs().max().item()
    print(f"\nKoLeo {rows}x{dim} spread {spread:g}: largest difference (largest magnitude): loss {loss_diff:.3g} "
          f"({ref.abs().item():.3g}), input gradient {grad_diff:.3g} ({largest:.3g})")  # fmt: skip


# --- Sinkhorn-Knopp -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temp", [0.04, 0.07])
@pytest.mark.parametrize(("rows", "prototypes"), [(8, 64), (8, 65536)], ids=["K64", "K65536"])
def test_cls_sinkhorn_knopp_equals_dinov2s_sinkhorn_knopp_teacher(rows, prototypes, temp):
    logits = cosine_logits(rows, prototypes, seed=prototypes)
    ours = sinkhorn_knopp(logits, temp)
    ref = DINOLoss(prototypes).sinkhorn_knopp_teacher(logits, temp)
    diff = assert_float32_close(ours, ref, TARGET_ULPS, "CLS targets", scale=target_scale(ref, logits, temp))
    assert (ref.sum(dim=0) - rows / prototypes).abs().max() < (torch.softmax(logits / temp, -1).sum(0)
                                                               - rows / prototypes).abs().max()  # fmt: skip
    print(f"\nSinkhorn-Knopp CLS {rows}x{prototypes} T={temp}: largest difference {diff:.3g} (largest target "
          f"{ref.max().item():.3g}, max |l/T| {(logits / temp).abs().max().item():.3g})")  # fmt: skip


@pytest.mark.parametrize(("masked", "prototypes"), [(23, 64), (37, 65536)], ids=["K64", "K65536"])
def test_patch_sinkhorn_knopp_equals_dinov2s_masked_patch_variant(masked, prototypes):
    logits, temp = cosine_logits(masked, prototypes, seed=masked), 0.055
    ours = sinkhorn_knopp(logits, temp)
    ref = iBOTPatchLoss(prototypes).sinkhorn_knopp_teacher(logits, temp, torch.full((1,), masked, dtype=torch.long))
    diff = assert_float32_close(ours, ref, TARGET_ULPS, "patch targets", scale=target_scale(ref, logits, temp))
    print(f"\nSinkhorn-Knopp patches {masked}x{prototypes}: largest difference {diff:.3g} (largest target "
          f"{ref.max().item():.3g})")  # fmt: skip


class TwoRanks:
    """A stand-in for ``torch.distributed`` with two ranks as two threads: ``all_reduce`` waits for both, then
    gives both the same sum (or max), added in rank order."""

    ReduceOp = SimpleNamespace(SUM="sum", MAX="max")

    def __init__(self) -> None:
        self.barrier, self.slots, self.local = threading.Barrier(2, timeout=30), [None, None], threading.local()

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return 2

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        self.slots[self.local.rank] = tensor.clone()
        self.barrier.wait()
        first, second = self.slots
        reduced = torch.maximum(first, second) if op == "max" else first + second
        self.barrier.wait()
        tensor.copy_(reduced)


def test_two_processes_with_different_numbers_of_masked_patches_get_dinov2s_targets(monkeypatch):
    """DINOv2 normalises the patch targets by the masked patches of *all* processes (their all-reduced count):
    with 9 on one rank and 20 on the other, each rank's share equals the one-process targets of all 29."""
    fake = TwoRanks()
    monkeypatch.setattr(teacher_module, "dist", fake)
    temp, counts = 0.04, (9, 20)
    logits = cosine_logits(sum(counts), 64, seed=5)
    shares, results = logits.split(counts), [None, None]

    def rank(r: int) -> None:
        fake.local.rank = r
        results[r] = sinkhorn_knopp(shares[r], temp)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ref = iBOTPatchLoss(64).sinkhorn_knopp_teacher(logits, temp, torch.full((1,), sum(counts), dtype=torch.long))
    ours = torch.cat(results)
    diff = assert_float32_close(ours, ref, TARGET_ULPS, "two-rank patch targets", scale=target_scale(ref, logits, temp))
    print(f"\nSinkhorn-Knopp over 2 ranks ({counts} masked patches): largest difference {diff:.3g}")


# --- the masked-patch loss and a whole step -------------------------------------------------------------------------


def masks_for(seed: int) -> list[torch.Tensor]:
    """``2 * BATCH`` crop masks on the 4 x 4 grid, crop-major: random ratios, one crop without a masked patch."""
    generator = torch.Generator().manual_seed(seed)
    masks = [torch.rand(4, 4, generator=generator) < ratio for ratio in torch.linspace(0.1, 0.6, 2 * BATCH)]
    masks[3] = torch.zeros(4, 4, dtype=torch.bool)
    masks[5][0, 0] = True  # at least one masked patch elsewhere
    return masks


def test_the_dinov2_patch_loss_equals_forward_masked_on_sinkhorn_knopp_targets():
    ours = IBOT(build_vit(MODEL, **IBOT.backbone_kwargs(CFG)), CFG)
    ours.teacher_patch_temp = 0.05
    masks = torch.stack(masks_for(1))  # (2B, 4, 4)
    collated = collate_masks(list(masks), upperbound=0)
    m = int(collated["n_masked_patches"])
    generator = torch.Generator().manual_seed(2)
    teacher = torch.randn(m, CFG.out_dim, generator=generator).clamp(-3, 3) * 0.3
    student = torch.randn(m, CFG.out_dim, generator=generator)
    ours_in, ref_in = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = ours.compute_patch_loss(ours_in, teacher, masks)
    loss_module = iBOTPatchLoss(CFG.out_dim)
    targets = loss_module.sinkhorn_knopp_teacher(teacher, 0.05, collated["n_masked_patches"])
    # forward_backward scales forward_masked by loss_scales (2) x ibot_loss_scale (1/2)
    ref = loss_module.forward_masked(ref_in, targets, collated["collated_masks"], n_masked_patches=m,
                                     masks_weight=collated["masks_weight"]) * 2 * (1.0 / 2)  # fmt: skip
    loss.backward()
    ref.backward()
    loss_diff = assert_float32_close(loss, ref, LOSS_ULPS, "patch loss")
    grad_diff = assert_float32_close(ours_in.grad, ref_in.grad, GRAD_ULPS, "patch loss gradient")
    print(
        f"\niBOT patch loss (DINOv2 mode), {m} masked patches: largest difference (largest magnitude): loss "
        f"{loss_diff:.3g} ({ref.item():.3g}), gradient {grad_diff:.3g} ({ref_in.grad.abs().max().item():.3g})"
    )


def reference_head(head: torch.nn.Module, out_dim: int) -> DINOHead:
    """The authors' DINOHead holding the weights of one of sslvit's (lightly's ``layers.i`` are its ``mlp.i``)."""
    ref = DINOHead(MODEL.embed_dim, out_dim, hidden_dim=CFG.hidden_dim, bottleneck_dim=CFG.bottleneck_dim)
    ref.load_state_dict({k.replace("layers.", "mlp.", 1): v.clone() for k, v in head.state_dict().items()})
    return ref


def build(cfg: IBOTConfig) -> IBOT:
    """A DINOv2-style iBOT whose student, teacher and mask token differ (as they do after the first step)."""
    torch.manual_seed(0)
    ours = IBOT(build_vit(MODEL, **IBOT.backbone_kwargs(cfg)), cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if name.startswith("student_") or name == "mask_token":
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return ours


@pytest.mark.parametrize("shared_head", [True, False], ids=["shared_head", "separate_head"])
def test_a_dinov2_style_ibot_step_equals_ssl_meta_arch_forward_backward(shared_head):
    """One step of sslvit's iBOT with Sinkhorn-Knopp centring, KoLeo 0.1 and shared or separate heads against the
    authors' loss composition from the backbone outputs on: the total loss and the gradient of every student
    parameter (backbone, heads, mask token), in epoch 1 of a 3-epoch temperature warmup."""
    cfg = dataclasses.replace(CFG, shared_head=shared_head, patch_out_dim=None if shared_head else 40)
    ours = build(cfg)
    progress = Progress(step=2, total_steps=4, epochs=2)  # whole epoch 1
    ours.before_step(progress)
    assert ours.teacher_temp == ours.teacher_patch_temp == pytest.approx(0.055)  # DINOv2: one for both
    generator = torch.Generator().manual_seed(4)
    crops = [torch.randn(BATCH, 3, s, s, generator=generator) for s in [32, 32] + [16] * LOCAL_CROPS]
    masks = masks_for(6)
    batch = {"views": crops + [torch.stack(masks[:BATCH]), torch.stack(masks[BATCH:])]}

    # the authors' side, on copies of sslvit's modules (taken before sslvit's backward)
    student_bb, teacher_bb = copy.deepcopy(ours.student_backbone), copy.deepcopy(ours.teacher_backbone)
    mask_token = ours.mask_token.detach().clone().requires_grad_()
    heads = {"student_dino_head": reference_head(ours.student_head, cfg.out_dim),
             "teacher_dino_head": reference_head(ours.teacher_head, cfg.out_dim)}  # fmt: skip
    if not shared_head:
        heads["student_ibot_head"] = reference_head(ours.student_patch_head, 40)
        heads["teacher_ibot_head"] = reference_head(ours.teacher_patch_head, 40)
    collated = collate_masks(masks, upperbound=int(torch.stack(masks).sum()) + 3)
    globals_, flat = torch.cat(crops[:2]), collated["collated_masks"]
    with torch.no_grad():
        teacher_global = forward_features(teacher_bb, globals_, torch.zeros_like(flat), mask_token)
    student_global = forward_features(student_bb, globals_, flat, mask_token)
    student_local = {"x_norm_clstoken": student_bb(torch.cat(crops[2:]))}
    ref_loss, loss_dict = forward_backward_loss(teacher_global, student_global, student_local, collated, heads,
                                                ours.teacher_temp, LOCAL_CROPS, cfg.koleo_weight)  # fmt: skip
    ref_loss.backward()

    out = ours(batch)
    out["loss"].backward()
    loss_diff = assert_float32_close(out["loss"], ref_loss, LOSS_ULPS, "total loss")
    koleo_diff = assert_float32_close(cfg.koleo_weight * out["koleo"], 2 * loss_dict["koleo_loss"], LOSS_ULPS, "KoLeo")
    patch_diff = assert_float32_close(out["patch_loss"], 2 * loss_dict["ibot_loss"], LOSS_ULPS, "patch loss")
    cls = loss_dict["dino_local_crops_loss"] + loss_dict["dino_global_crops_loss"]
    cls_diff = assert_float32_close(out["cls_loss"], cls, LOSS_ULPS, "CLS loss")

    ref_params = {f"student_backbone.{k}": p for k, p in student_bb.named_parameters()} | {"mask_token": mask_token}
    for ours_name, ref_name in (("student_head", "student_dino_head"), ("student_patch_head", "student_ibot_head")):
        if ref_name in heads:  # lightly's layers.i are the authors' mlp.i
            head = heads[ref_name].named_parameters()
            ref_params.update({f"{ours_name}.{k.replace('mlp.', 'layers.', 1)}": p for k, p in head})
    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(ours_params) == set(ref_params)
    grad_scale = max(p.grad.abs().max().item() for p in ref_params.values())
    grad_diff = max(
        assert_float32_close(ours_params[name].grad, ref.grad, GRAD_ULPS, f"gradient of {name}", scale=grad_scale)
        for name, ref in ref_params.items()
    )
    assert mask_token.grad.abs().max() > 0 and ours.mask_token.grad.abs().max() > 0  # the masking is compared
    print(f"\nDINOv2-style iBOT step, {'shared' if shared_head else 'separate'} head, {int(flat.sum())} masked "
          f"patches: largest difference (largest magnitude): total loss {loss_diff:.3g} ({ref_loss.item():.3g}), "
          f"CLS {cls_diff:.3g}, patch {patch_diff:.3g}, KoLeo {koleo_diff:.3g}, student gradients {grad_diff:.3g} "
          f"({grad_scale:.3g}, {grad_diff / (FLOAT32_EPS * grad_scale):.1f} ulps)")  # fmt: skip
