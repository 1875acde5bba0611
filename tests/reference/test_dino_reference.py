"""sslvit's DINO against facebookresearch/dino (restated in dino_reference.py): the loss and centre, the student's
gradients with the frozen last layer, the teacher's EMA update and every schedule, step by step across epoch
boundaries, to float32 rounding.

Run with ``-s`` to see the largest differences measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import timm
import torch
from torch import nn

from sslvit.backbone import build_vit
from sslvit.objectives import DINO, DINOConfig, Progress
from sslvit.objectives.teacher import teacher_momentum, teacher_temperature
from sslvit.recipe import ModelConfig, load_recipe
from sslvit.training.derived import derive
from sslvit.training.schedules import apply_schedules, warmup_cosine
from tests.reference.dino_reference import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_gradients_last_layer,
    cosine_scheduler,
    ema_update_teacher,
)
from tests.reference.tolerance import assert_float32_close

# A tiny ViT: 32 px global crops, 16 px local crops, 8 px patches, width 32, depth 2; no stochastic depth, so that
# the student's forward is deterministic.
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
TIMM_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 0,
             "dynamic_img_size": True}  # fmt: skip
# 3 epochs of 2 steps: the teacher temperature warms up over epochs 0-1, the last layer is frozen in epoch 0.
EPOCHS, NITER, BATCH, LOCAL_CROPS = 3, 2, 4, 2
CFG = DINOConfig(out_dim=64, hidden_dim=48, bottleneck_dim=16, local_crop_size=16, local_crops_number=LOCAL_CROPS,
                 warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2, freeze_last_layer=1,
                 momentum_teacher=0.9, student_temp=0.1, center_momentum=0.9)  # fmt: skip
LR = 0.1  # sslvit's student takes a plain SGD step, large enough that the teacher and centre move visibly

# Tolerances: float32 rounding, in units of float32 eps (1.19e-7) times the largest magnitude compared
# (tests/reference/tolerance.py; gradients: the largest gradient of the student). lightly's loss sums the (teacher
# crop, student crop) terms in one einsum where the authors loop over pairs: a few ulps of the loss, and of the
# gradients through it. The centre is the same formula; the EMA adds ``(1 - m) * student`` as a fused foreach op
# (sslvit) where the authors multiply then add: an ulp. Each step starts from equal states (rounding does not
# compound) and the EMA gets the student sslvit stepped, so each comparison is of one step's computation.
LOSS_ULPS = 4
# The loss at the official 65,536 prototypes is a sum of 65,536 same-signed terms per pair of crops: its rounding
# grows like log2(K) ulps (vectorised pairwise sums), and how much depends on the CPU's kernels (within 4 ulps on
# the Xeon these tests were written on; 4.4 ulps at teacher temperature 0.07 on an AMD EPYC, 2026-12-02, where
# temperature 0.04 gave 1.5): 4 ulps is the small-K bound, log2(K) = 16 the large-K one.
LOSS_ULPS_AT_OFFICIAL_K = 16
GRAD_ULPS = 16
CENTRE_ULPS = 2
TEACHER_ULPS = 2


def reference_name(name: str) -> str:
    """The authors' name for a parameter of sslvit's student or teacher (``student_backbone.blocks.0...``):
    the wrapper's ``backbone.`` / ``head.``; lightly's DINOProjectionHead keeps its MLP in ``layers`` (same
    indices), the authors' DINOHead in ``mlp``."""
    module, rest = name.split(".", 1)
    if module.endswith("_head"):
        return "head." + ("mlp." + rest[len("layers.") :] if rest.startswith("layers.") else rest)
    return "backbone." + rest


def build_pair(cfg: DINOConfig):
    """sslvit's DINO and the authors' student/teacher MultiCropWrappers and loss, holding the same weights."""
    torch.manual_seed(0)
    ours = DINO(build_vit(MODEL, **DINO.backbone_kwargs(cfg)), cfg)
    head_args = {"hidden_dim": cfg.hidden_dim, "bottleneck_dim": cfg.bottleneck_dim}
    student = MultiCropWrapper(
        timm.create_model(MODEL.name, **TIMM_ARGS),
        DINOHead(MODEL.embed_dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer,
                 **head_args),
    )  # fmt: skip
    teacher = MultiCropWrapper(
        timm.create_model(MODEL.name, **TIMM_ARGS),
        DINOHead(MODEL.embed_dim, cfg.out_dim, cfg.use_bn_in_head, **head_args),
    )
    for param in teacher.parameters():
        param.requires_grad = False
    loss = DINOLoss(cfg.out_dim, 2 + cfg.local_crops_number, cfg.warmup_teacher_temp, cfg.teacher_temp,
                    cfg.warmup_teacher_temp_epochs, EPOCHS, cfg.student_temp, cfg.center_momentum)  # fmt: skip
    copy_state(ours, student, teacher, loss)
    assert all(torch.equal(t, s) for t, s in zip(teacher.parameters(), student.parameters()))  # as main_dino.py
    return ours, student, teacher, loss


def copy_state(ours: DINO, student: nn.Module | None, teacher: nn.Module | None, loss: DINOLoss | None) -> None:
    """Load sslvit's student, teacher (parameters and BatchNorm statistics) and centre into the authors' modules
    (those given).

    With BatchNorm in the head, lightly's linear layers before a BatchNorm have no bias (the BatchNorm's mean
    subtraction cancels it); the authors' have one: it is set to zero.
    """
    state = ours.state_dict()
    for prefix, module in (("student_", student), ("teacher_", teacher)):
        if module is None:
            continue
        mapped = {reference_name(k): v for k, v in state.items() if k.startswith(prefix)}
        extra = set(module.state_dict()) - set(mapped)
        assert all(k.endswith(".bias") and ours.cfg.use_bn_in_head for k in extra), extra
        mapped.update({k: torch.zeros_like(module.state_dict()[k]) for k in extra})
        module.load_state_dict(mapped)
    if loss is not None:
        loss.center = ours.dino_loss.center.detach().clone().view(1, -1)


def sgd_step(params, lr: float) -> None:
    """A plain SGD step (the same on any optimizer: the comparison is of what comes before and after it)."""
    with torch.no_grad():
        for param in params:
            if param.grad is not None:
                param.sub_(lr * param.grad)
                param.grad = None


def views_for(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    sizes = [32, 32] + [16] * LOCAL_CROPS
    return [torch.randn(BATCH, 3, size, size, generator=generator) for size in sizes]


@pytest.mark.parametrize(
    ("norm_last_layer", "use_bn_in_head"), [(True, False), (False, True)], ids=["norm_last_layer", "bn_in_head"]
)
def test_six_training_steps_equal_the_authors_loss_centre_gradients_and_teacher(norm_last_layer, use_bn_in_head):
    cfg = dataclasses.replace(CFG, norm_last_layer=norm_last_layer, use_bn_in_head=use_bn_in_head)
    ours, student, teacher, dino_loss = build_pair(cfg)
    ours_student = {n: p for n, p in ours.named_parameters() if n.startswith("student_")}
    ours_teacher = {n: p for n, p in ours.named_parameters() if n.startswith("teacher_")}
    ref_student, ref_teacher = dict(student.named_parameters()), dict(teacher.named_parameters())
    momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1, EPOCHS, NITER)
    worst = dict.fromkeys(("loss", "gradients", "centre", "teacher"), 0.0)
    largest = dict.fromkeys(worst, 0.0)  # the magnitudes compared, for the printed summary
    total = EPOCHS * NITER
    for it in range(total):
        epoch = it // NITER  # train_one_epoch: it = len(data_loader) * epoch + i
        progress = Progress(it, total, EPOCHS)
        views = views_for(it)
        # sslvit, as its loop calls the objective (lr/wd schedules and clipping left out: plain SGD on both sides)
        ours.before_step(progress)
        loss = ours({"views": views})["loss"]
        loss.backward()
        ours.after_backward(progress)
        # the authors' train_one_epoch, one iteration
        teacher_output = teacher(views[:2])
        student_output = student(views)
        ref_loss = dino_loss(student_output, teacher_output, epoch)
        ref_loss.backward()
        cancel_gradients_last_layer(epoch, student, cfg.freeze_last_layer)

        assert ours.teacher_temp == dino_loss.teacher_temp_schedule[epoch]
        worst["loss"] = max(worst["loss"], assert_float32_close(loss, ref_loss, LOSS_ULPS, f"loss at step {it}"))
        grad_scale = max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None)
        largest["loss"], largest["gradients"] = (
            max(largest["loss"], ref_loss.item()),
            max(largest["gradients"], grad_scale),
        )
        for name, param in ours_student.items():
            ref = ref_student[reference_name(name)]
            assert (param.grad is None) == (ref.grad is None), f"{name} at step {it}: only one side has a gradient"
            if param.grad is not None:
                what = f"gradient of {name} at step {it}"
                diff = assert_float32_close(param.grad, ref.grad, GRAD_ULPS, what, scale=grad_scale)
                worst["gradients"] = max(worst["gradients"], diff)
        assert (ours.student_head.last_layer.weight_v.grad is None) == (epoch < cfg.freeze_last_layer)

        # the optimizer is sslvit's own: the authors' EMA gets the student it stepped
        sgd_step(ours_student.values(), LR)
        student.zero_grad(set_to_none=True)
        copy_state(ours, student, None, None)
        logged = ours.after_step(progress)
        ema_update_teacher(student, teacher, momentum_schedule[it])

        assert logged["momentum"] == pytest.approx(momentum_schedule[it], rel=1e-12, abs=1e-15)
        centre = ours.dino_loss.center.view(1, -1)
        worst["centre"] = max(worst["centre"], assert_float32_close(centre, dino_loss.center, CENTRE_ULPS, "centre"))
        largest["centre"] = max(largest["centre"], dino_loss.center.abs().max().item())
        for name, param in ours_teacher.items():
            what = f"teacher {name} after step {it}"
            diff = assert_float32_close(param, ref_teacher[reference_name(name)], TEACHER_ULPS, what)
            worst["teacher"] = max(worst["teacher"], diff)
            largest["teacher"] = max(largest["teacher"], param.detach().abs().max().item())
        copy_state(ours, student, teacher, dino_loss)  # each step starts equal: rounding does not compound
    # the checks can bite: the centre and teacher moved well beyond the tolerances
    assert dino_loss.center.abs().max() > 1e-2
    moved = [(param - ours_student[name.replace("teacher_", "student_", 1)]).abs().max() for name, param in
             ours_teacher.items()]  # fmt: skip
    assert max(moved) > 1e-3
    print(f"\nDINO {'+'.join(k for k in ('norm_last_layer', 'use_bn_in_head') if getattr(cfg, k))}, {total} steps: "
          + "largest difference (largest magnitude): "
          + ", ".join(f"{k} {v:.3g} ({largest[k]:.3g})" for k, v in worst.items()))  # fmt: skip


@pytest.mark.parametrize("epoch", [0, 1, 2])
def test_the_loss_and_centre_at_the_official_output_size_equal_the_authors(epoch):
    """Head outputs of the official size (65,536 prototypes, 2 + 8 crops), three consecutive steps (the centre
    carries over), at the temperatures of a 2-epoch warmup."""
    k, crops, batch = 65536, 10, 4
    cfg = dataclasses.replace(CFG, out_dim=k, local_crops_number=crops - 2, hidden_dim=8, bottleneck_dim=8)
    ours = DINO(build_vit(MODEL, **DINO.backbone_kwargs(cfg)), cfg)
    reference = DINOLoss(k, crops, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, 3)
    progress = Progress(step=epoch * 10, total_steps=30, epochs=3)
    ours.before_step(progress)
    generator = torch.Generator().manual_seed(1)
    worst_loss = worst_centre = largest_loss = 0.0
    for _ in range(3):
        student = torch.randn(crops * batch, k, generator=generator)
        teacher = torch.randn(2 * batch, k, generator=generator)
        before = ours.dino_loss.center.clone()
        loss, expected = ours.compute_loss(student, teacher), reference(student, teacher, epoch)
        assert torch.equal(ours.dino_loss.center, before)  # sslvit's centre moves after the optimizer step
        worst_loss = max(worst_loss, assert_float32_close(loss, expected, LOSS_ULPS_AT_OFFICIAL_K, "loss"))
        largest_loss = max(largest_loss, expected.item())
        ours.after_step(progress)  # sslvit moves the centre after the optimizer step
        centre = ours.dino_loss.center.view(1, k)
        worst_centre = max(worst_centre, assert_float32_close(centre, reference.center, CENTRE_ULPS, "centre"))
    assert reference.center.abs().max() > 0.1
    print(f"\nDINO loss at K={k}, epoch {epoch} (temperature {ours.teacher_temp:.3g}): largest difference (largest "
          f"magnitude): loss {worst_loss:.3g} ({largest_loss:.3g}), centre {worst_centre:.3g} "
          f"({reference.center.abs().max().item():.3g})")  # fmt: skip


@pytest.mark.parametrize(("epochs", "niter", "warmup"), [(10, 7, 2), (100, 1, 10), (4, 22, 1)])
def test_the_dino_learning_rate_is_cosine_scheduler_with_its_linspace_warmup(epochs, niter, warmup):
    official = cosine_scheduler(5e-4, 1e-6, epochs, niter, warmup, start_warmup_value=0.0)
    total, w = epochs * niter, warmup * niter
    ours = [warmup_cosine(s, total, w, 5e-4, 1e-6, 0.0, inclusive=True) for s in range(total)]
    np.testing.assert_allclose(ours, official, rtol=1e-12, atol=1e-18)
    assert DINO.warmup_reaches_base_at_last_step  # the loop passes inclusive=True for DINO


def test_the_official_recipes_schedules_per_step_across_epoch_boundaries():
    """dino_vit_s16 with 7 steps per epoch: lr and weight decay as the loop sets them, the teacher momentum, the
    teacher temperature, step by step, against main_dino.py's schedules."""
    recipe = load_recipe("dino_vit_s16")
    niter, cfg = 7, recipe.objective
    derived = derive(recipe, world_size=1, num_samples=recipe.train.global_batch_size * niter)
    epochs, total = recipe.schedule.epochs, derived.total_steps
    assert (derived.steps_per_epoch, total, derived.warmup_steps) == (niter, epochs * niter, 10 * niter)
    lr_schedule = cosine_scheduler(derived.lr, recipe.optim.min_lr, epochs, niter, recipe.schedule.warmup_epochs)
    wd_schedule = cosine_scheduler(recipe.optim.weight_decay, recipe.optim.weight_decay_end, epochs, niter)
    momentum_schedule = cosine_scheduler(cfg.momentum_teacher, 1, epochs, niter)
    temps = DINOLoss(8, 10, cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.warmup_teacher_temp_epochs, epochs)
    decayed, not_decayed = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [decayed], "weight_decay": 0.04}, {"params": [not_decayed],
                                 "weight_decay": 0.0}], lr=0.0)  # fmt: skip
    for it in range(total):
        epoch = it // niter
        logged = apply_schedules(optimizer, recipe.optim, derived, it, DINO.warmup_reaches_base_at_last_step)
        assert logged["lr"] == pytest.approx(lr_schedule[it], rel=1e-12, abs=1e-18)
        assert optimizer.param_groups[1]["lr"] == logged["lr"]
        assert logged["weight_decay"] == pytest.approx(wd_schedule[it], rel=1e-12)
        assert optimizer.param_groups[0]["weight_decay"] == logged["weight_decay"]
        assert optimizer.param_groups[1]["weight_decay"] == 0  # main_dino.py: only the first group is regularised
        assert teacher_momentum(cfg.momentum_teacher, it, total) == pytest.approx(momentum_schedule[it], rel=1e-12)
        whole_epoch = Progress(it, total, epochs).whole_epoch
        assert whole_epoch == epoch
        assert teacher_temperature(cfg, whole_epoch) == pytest.approx(temps.teacher_temp_schedule[epoch], rel=1e-12)
    assert recipe.schedule.warmup_epochs == 10 and cfg.warmup_teacher_temp_epochs == 30  # both boundaries crossed
