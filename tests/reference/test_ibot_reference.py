"""sslvit's iBOT against bytedance/ibot (restated in ibot_reference.py): the loss with both centres and both teacher
temperatures, the student's gradients (mask token included) with the frozen last layers, the teacher's EMA, step by
step across epoch boundaries, to float32 rounding.

Run with ``-s`` to see the largest differences measured.
"""

from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

from sslvit.backbone import build_vit
from sslvit.objectives import IBOT, IBOTConfig, Progress
from sslvit.objectives.ibot import patch_temperature
from sslvit.objectives.teacher import teacher_temperature
from sslvit.recipe import ModelConfig, load_recipe
from tests.reference.ibot_reference import (
    MaskedViT,
    MultiCropWrapper,
    cancel_gradients_last_layer,
    common_parameters,
    cosine_scheduler,
    ema_update_teacher,
    iBOTHead,
    iBOTLoss,
)
from tests.reference.tolerance import FLOAT32_EPS, assert_float32_close

# A tiny ViT: 32 px global crops (a 4 x 4 patch grid), 16 px local crops, 8 px patches, width 32, depth 2; no
# stochastic depth, so that the student's forward is deterministic.
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TIMM_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 0,
             "dynamic_img_size": True}  # fmt: skip
GRID = 4
# 3 epochs of 2 steps: both teacher temperatures warm up over epochs 0-1 (the patch one from pred_start_epoch on),
# the last layers are frozen in epoch 0. Non-default lambdas, so that the weighting is checked too.
EPOCHS, NITER, BATCH, LOCAL_CROPS = 3, 2, 4, 2
CFG = IBOTConfig(out_dim=64, hidden_dim=48, bottleneck_dim=16, local_crop_size=16, local_crops_number=LOCAL_CROPS,
                 warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_patch_temp=0.05, teacher_patch_temp=0.08,
                 warmup_teacher_temp_epochs=2, freeze_last_layer=1, momentum_teacher=0.9, student_temp=0.1,
                 center_momentum=0.9, lambda1=0.8, lambda2=1.5)  # fmt: skip
LR = 0.1  # sslvit's student takes a plain SGD step, large enough that the teacher and centres move visibly

# Tolerances: float32 rounding, in units of float32 eps (1.19e-7) times the largest magnitude compared
# (tests/reference/tolerance.py; gradients: the largest gradient of the student). lightly's DINO loss sums the
# (teacher crop, student crop) terms in one einsum where the authors loop over pairs, and sslvit's patch loss sums
# the masked patches of all images at once (weighted by 1 / count) where the authors mask and average per image:
# a few ulps of the loss, and of the gradients through it. The CLS centre is the same formula; the patch centre is
# the mean over all patches where the authors average each image's mean (another summation order: 1.7 ulps measured
# at 8,192 prototypes, hence 4); the EMA adds ``(1 - m) * student`` as a fused foreach op (sslvit) where the
# authors multiply then add: an ulp. Each step starts from equal states (rounding does not compound) and the EMA
# gets the student sslvit stepped, so each comparison is of one step's computation.
LOSS_ULPS = 4
GRAD_ULPS = 16
CENTRE_ULPS = 2
PATCH_CENTRE_ULPS = 4
TEACHER_ULPS = 2


def reference_name(name: str) -> str | None:
    """The authors' name for a parameter of sslvit's iBOT (``student_backbone.blocks.0...``), None for the centres.

    The wrapper's ``backbone.`` (holding the timm ViT as ``vit``, see ``MaskedViT``) and ``head.``; lightly's
    DINOProjectionHead keeps its MLP in ``layers`` (same indices), the authors' head in ``mlp``; sslvit's
    ``mask_token`` is the authors' ``masked_embed``, its ``student_last_layer2`` the head's ``last_layer2``.
    """
    if name == "mask_token":
        return "backbone.masked_embed"
    module, rest = name.split(".", 1)
    if module.endswith("_last_layer2"):
        return "head.last_layer2." + rest
    if module.endswith("_head"):
        return "head." + ("mlp." + rest[len("layers.") :] if rest.startswith("layers.") else rest)
    if module.endswith("_backbone"):
        return "backbone.vit." + rest
    return None


def build_pair(cfg: IBOTConfig, epochs: int = EPOCHS):
    """sslvit's iBOT and the authors' student/teacher MultiCropWrappers and loss, holding the same weights."""
    torch.manual_seed(0)
    ours = IBOT(build_vit(MODEL, **IBOT.backbone_kwargs(cfg)), cfg)
    head_args = {"patch_out_dim": cfg.patch_out_dim or cfg.out_dim, "hidden_dim": cfg.hidden_dim,
                 "bottleneck_dim": cfg.bottleneck_dim, "shared_head": cfg.head_mode == "shared"}  # fmt: skip
    student = MultiCropWrapper(
        MaskedViT(timm.create_model(MODEL.name, **TIMM_ARGS), masked_im_modeling=True),
        iBOTHead(MODEL.embed_dim, cfg.out_dim, norm_last_layer=cfg.norm_last_layer, **head_args),
    )
    teacher = MultiCropWrapper(MaskedViT(timm.create_model(MODEL.name, **TIMM_ARGS)),
                               iBOTHead(MODEL.embed_dim, cfg.out_dim, **head_args))  # fmt: skip
    for param in teacher.parameters():
        param.requires_grad = False
    loss = iBOTLoss(cfg.out_dim, cfg.patch_out_dim or cfg.out_dim, 2, cfg.local_crops_number, cfg.warmup_teacher_temp,
                    cfg.teacher_temp, cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp,
                    cfg.warmup_teacher_temp_epochs, epochs, cfg.student_temp, cfg.center_momentum,
                    cfg.center_momentum, cfg.lambda1, cfg.lambda2, cfg.pred_start_epoch)  # fmt: skip
    copy_state(ours, student, teacher, loss)
    return ours, student, teacher, loss


def copy_state(ours: IBOT, student: nn.Module | None, teacher: nn.Module | None, loss: iBOTLoss | None) -> None:
    """Load sslvit's student, teacher and centres into the authors' modules (those given); every parameter of the
    authors' modules must have a counterpart."""
    params = dict(ours.named_parameters())
    for prefix, module in (("student_", student), ("teacher_", teacher)):
        if module is None:
            continue
        mapped = {reference_name(k): v for k, v in params.items() if k.startswith(prefix) or k == "mask_token"}
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(mapped[name].view_as(param))
    if loss is not None:
        loss.center = ours.dino_loss.center.detach().clone().view(1, -1)
        loss.center2 = ours.patch_loss.center.center.detach().clone().view(1, 1, -1)


def sgd_step(params, lr: float) -> None:
    """A plain SGD step (the same on any optimizer: the comparison is of what comes before and after it)."""
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.sub_(lr * param.grad)
                param.grad = None


def views_for(step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """2 global and the local crops, and fixed random masks of the global crops (one image of the first crop left
    unmasked: it counts as 0 in the authors' mean over images)."""
    generator = torch.Generator().manual_seed(100 + step)
    sizes = [32, 32] + [16] * LOCAL_CROPS
    crops = [torch.randn(BATCH, 3, size, size, generator=generator) for size in sizes]
    masks = [torch.rand(BATCH, GRID, GRID, generator=generator) < 0.4 for _ in range(2)]
    masks[0][1] = False
    masks[1][2, 0, 0] = True  # never all empty
    return crops, masks


def summary(worst: dict[str, float], largest: dict[str, float]) -> str:
    """``key diff (largest magnitude, diff in float32 ulps of it)``, for the printed summaries."""
    return ", ".join(f"{k} {v:.3g} ({largest[k]:.3g}, {v / (FLOAT32_EPS * largest[k]):.2g} ulps)" for k, v in
                     worst.items())  # fmt: skip


CASES = {
    "shared_head": dict(norm_last_layer=False),  # bytedance/ibot's README ViT-S/16 command
    "shared_head+pred_start_epoch": dict(pred_start_epoch=1),  # epoch 0 unmasked, the patch temperature held
    # the MLP shared, last_layer2 of its own (--shared_head false --shared_head_teacher false), narrower
    "shared_mlp": dict(patch_head="shared_mlp", patch_out_dim=40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_six_training_steps_equal_the_authors_loss_centres_gradients_and_teacher(case):
    cfg = dataclasses.replace(CFG, **CASES[case])
    ours, student, teacher, ibot_loss = build_pair(cfg)
    ours_student = {n: p for n, p in ours.named_parameters() if not n.startswith("teacher_")}
    ours_teacher = {n: p for n, p in ours.named_parameters() if n.startswith("teacher_")}
    ref_student, ref_teacher = dict(student.named_parameters()), dict(teacher.named_parameters())
    assert len(ref_student) == len(ours_student) and len(ref_teacher) == len(ours_teacher)
    params_q, params_k = common_parameters(student, teacher)
    momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1, EPOCHS, NITER)
    worst = dict.fromkeys(("loss", "gradients", "centre", "patch centre", "teacher"), 0.0)
    largest = dict.fromkeys(worst, 0.0)  # the magnitudes compared, for the printed summary
    total = EPOCHS * NITER
    for it in range(total):
        epoch = it // NITER  # train_one_epoch: it = len(data_loader) * epoch + i
        progress = Progress(it, total, EPOCHS)
        crops, masks = views_for(it)
        # sslvit, as its loop calls the objective (lr/wd schedules and clipping left out: plain SGD on both sides)
        ours.before_step(progress)
        out = ours({"views": crops + masks})  # sslvit empties the masks itself before pred_start_epoch
        out["loss"].backward()
        ours.after_backward(progress)
        # the authors' train_one_epoch, one iteration (their loader gives empty masks before pred_start_epoch)
        ref_masks = masks if epoch >= cfg.pred_start_epoch else [torch.zeros_like(m) for m in masks]
        teacher_output = teacher(crops[:2])
        student_output = student(crops[:2], mask=ref_masks[:2])
        student.backbone.masked_im_modeling = False
        student_local_cls = student(crops[2:])[0]
        student.backbone.masked_im_modeling = True
        ref = ibot_loss(student_output, teacher_output, student_local_cls, ref_masks, epoch)
        ref["loss"].backward()
        cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)

        assert ours.teacher_temp == ibot_loss.teacher_temp_schedule[epoch]
        assert ours.teacher_patch_temp == ibot_loss.teacher_temp2_schedule[epoch]
        assert (out["patch_loss"] == 0) == (epoch < cfg.pred_start_epoch)
        for ours_value, key in ((out["loss"], "loss"), (cfg.lambda1 * out["cls_loss"], "cls"),
                                (cfg.lambda2 * out["patch_loss"], "patch")):  # fmt: skip
            diff = assert_float32_close(ours_value, ref[key], LOSS_ULPS, f"{key} loss at step {it}")
            worst["loss"] = max(worst["loss"], diff)
        grad_scale = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
        largest["loss"] = max(largest["loss"], ref["loss"].item())
        largest["gradients"] = max(largest["gradients"], grad_scale)
        for name, param in ours_student.items():
            ref_param = ref_student[reference_name(name)]
            what = f"gradient of {name} at step {it}"
            assert (param.grad is None) == (ref_param.grad is None), f"{what}: only one side has one"
            if param.grad is not None:
                diff = assert_float32_close(param.grad.view_as(ref_param), ref_param.grad, GRAD_ULPS, what, grad_scale)
                worst["gradients"] = max(worst["gradients"], diff)
        frozen = [ours.student_head.last_layer] + ([ours.student_last_layer2] if cfg.head_mode == "shared_mlp" else [])
        assert all((layer.weight_v.grad is None) == (epoch < cfg.freeze_last_layer) for layer in frozen)

        # the optimizer is sslvit's own: the authors' EMA gets the student it stepped
        sgd_step(ours_student.values(), LR)
        student.zero_grad(set_to_none=True)
        copy_state(ours, student, None, None)
        logged = ours.after_step(progress)
        ema_update_teacher(params_q, params_k, momentum_schedule[it])

        assert logged["momentum"] == pytest.approx(momentum_schedule[it], rel=1e-12, abs=1e-15)
        for key, centre, expected, ulps in (
            ("centre", ours.dino_loss.center.view(1, -1), ibot_loss.center, CENTRE_ULPS),
            ("patch centre", ours.patch_loss.center.center.view(1, 1, -1), ibot_loss.center2, PATCH_CENTRE_ULPS),
        ):
            worst[key] = max(worst[key], assert_float32_close(centre, expected, ulps, f"{key} after {it}"))
            largest[key] = max(largest[key], expected.abs().max().item())
        for name, param in ours_teacher.items():
            what = f"teacher {name} after step {it}"
            diff = assert_float32_close(param, ref_teacher[reference_name(name)], TEACHER_ULPS, what)
            worst["teacher"] = max(worst["teacher"], diff)
            largest["teacher"] = max(largest["teacher"], param.detach().abs().max().item())
        copy_state(ours, student, teacher, ibot_loss)  # each step starts equal: rounding does not compound
    # the checks can bite: the centres and the teacher moved well beyond the tolerances
    assert ibot_loss.center.abs().max() > 1e-2 and ibot_loss.center2.abs().max() > 1e-2
    moved = [(param - ours_student[name.replace("teacher_", "student_", 1)]).abs().max() for name, param in
             ours_teacher.items()]  # fmt: skip
    assert max(moved) > 1e-3
    print(f"\niBOT {case}, {total} steps: largest difference (largest magnitude): " + summary(worst, largest))


@pytest.mark.parametrize("epoch", [0, 1])
def test_the_loss_and_centres_at_the_official_output_size_equal_the_authors(epoch):
    """Head outputs of the official size (8,192 prototypes for both, 2 + 10 crops, a 14 x 14 grid), two consecutive
    steps (the centres carry over), at the two temperatures of a 2-epoch warmup."""
    k, local, batch, grid = 8192, 10, 2, 14
    cfg = dataclasses.replace(CFG, out_dim=k, local_crops_number=local, hidden_dim=8, bottleneck_dim=8)
    ours = IBOT(build_vit(MODEL, **IBOT.backbone_kwargs(cfg)), cfg)
    reference = iBOTLoss(k, k, 2, local, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_patch_temp,
                         cfg.teacher_patch_temp, cfg.warmup_teacher_temp_epochs, 3, lambda1=cfg.lambda1,
                         lambda2=cfg.lambda2)  # fmt: skip
    progress = Progress(step=epoch * 10, total_steps=30, epochs=3)
    ours.before_step(progress)
    generator = torch.Generator().manual_seed(1)
    worst = dict.fromkeys(("cls", "patch", "centre", "patch centre"), 0.0)
    largest = dict.fromkeys(worst, 0.0)
    for _ in range(2):
        student_cls = torch.randn((2 + local) * batch, k, generator=generator)
        teacher_cls = torch.randn(2 * batch, k, generator=generator)
        student_patch = torch.randn(2 * batch, grid * grid, k, generator=generator)
        teacher_patch = torch.randn(2 * batch, grid * grid, k, generator=generator)
        mask = torch.rand(2 * batch, grid, grid, generator=generator) < 0.3
        flat = mask.flatten(1)
        expected = reference((student_cls[: 2 * batch], student_patch), (teacher_cls, teacher_patch),
                             student_cls[2 * batch :], list(mask.chunk(2)), epoch)  # fmt: skip
        cls = cfg.lambda1 * ours.compute_loss(student_cls, teacher_cls)
        patch = cfg.lambda2 * ours.compute_patch_loss(student_patch[flat], teacher_patch[flat], mask)
        ours._pending_patch_centre.append(teacher_patch.flatten(0, 1))  # what forward queues: every patch
        for key, value in (("cls", cls), ("patch", patch)):
            worst[key] = max(worst[key], assert_float32_close(value, expected[key], LOSS_ULPS, f"{key} loss"))
            largest[key] = max(largest[key], expected[key].item())
        ours.after_step(progress)  # sslvit moves both centres after the optimizer step
        for key, centre, ref, ulps in (
            ("centre", ours.dino_loss.center.view(1, k), reference.center, CENTRE_ULPS),
            ("patch centre", ours.patch_loss.center.center.view(1, 1, k), reference.center2, PATCH_CENTRE_ULPS),
        ):
            worst[key] = max(worst[key], assert_float32_close(centre, ref, ulps, key))
            largest[key] = max(largest[key], ref.abs().max().item())
    assert reference.center.abs().max() > 0.1 and reference.center2.abs().max() > 0.01
    print(
        f"\niBOT loss at K={k}, epoch {epoch} (temperatures {ours.teacher_temp:.3g}, {ours.teacher_patch_temp:.3g})"
        f": largest difference (largest magnitude): " + summary(worst, largest)
    )


@pytest.mark.parametrize("pred_start_epoch", [0, 50])
def test_the_official_recipes_temperature_schedules_per_epoch(pred_start_epoch):
    """ibot_vit_s16 (800 epochs, a 30-epoch warmup) against iBOTLoss's two schedules, every epoch; with
    ``pred_start_epoch`` 50 (the README's Swin command) the patch temperature waits 50 epochs at its warmup value."""
    cfg = dataclasses.replace(load_recipe("ibot_vit_s16").objective, pred_start_epoch=pred_start_epoch)
    epochs = load_recipe("ibot_vit_s16").schedule.epochs
    reference = iBOTLoss(8, 8, 2, 10, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_patch_temp,
                         cfg.teacher_patch_temp, cfg.warmup_teacher_temp_epochs, epochs,
                         mim_start_epoch=pred_start_epoch)  # fmt: skip
    assert len(reference.teacher_temp2_schedule) == epochs
    for epoch in range(epochs):
        assert teacher_temperature(cfg, epoch) == pytest.approx(reference.teacher_temp_schedule[epoch], rel=1e-12)
        assert patch_temperature(cfg, epoch) == pytest.approx(reference.teacher_temp2_schedule[epoch], rel=1e-12)
    held = reference.teacher_temp2_schedule[: pred_start_epoch + 1]
    assert (held == cfg.warmup_teacher_patch_temp).all() and reference.teacher_temp2_schedule[-1] == 0.07
