"""iBOT: the patch loss and a whole step against bytedance/ibot's iBOTLoss (restated in tests/reference/
ibot_reference.py, whose test_ibot_reference.py compares whole training steps), block masks, mask tokens for the
student only, the three patch-head modes and their teacher EMA, the export, a short quickstart_ibot run and its
resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.backbone import build_vit, model_args
from sslvit.checkpoint import export_encoder
from sslvit.data.augment import views_for
from sslvit.errors import RecipeError
from sslvit.objectives import IBOT, OBJECTIVES, IBOTConfig, Progress
from sslvit.objectives.ibot import MaskedViews, block_mask, masked_patch_cross_entropy, vit_tokens
from sslvit.objectives.teacher import teacher_momentum
from sslvit.overrides import apply_overrides
from sslvit.recipe import ModelConfig, load_recipe
from sslvit.train import pretrain
from tests.conftest import crops_batch, tiny_recipe
from tests.reference.ibot_reference import iBOTLoss

TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2,
                   drop_path_rate=0.1)  # fmt: skip
CFG = IBOTConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=2)
TINY_IBOT = ["objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
             "objective.local_crops_number=2"]  # fmt: skip


def make_ibot(cfg: IBOTConfig = CFG) -> IBOT:
    torch.manual_seed(0)
    return IBOT(build_vit(TINY, **IBOT.backbone_kwargs(cfg)), cfg)


def test_the_patch_loss_and_its_centre_equal_bytedance_ibots_patch_term():
    torch.manual_seed(1)
    b, grid, k = 3, 4, 32
    student, teacher = torch.randn(2 * b, grid * grid, k), torch.randn(2 * b, grid * grid, k)
    masks = torch.rand(2 * b, grid, grid) < 0.3
    masks[1] = False  # an unmasked image counts as 0 in the mean over images
    center2 = torch.randn(1, 1, k) * 0.1
    reference = iBOTLoss(k, k, 2, 0, 0.04, 0.04, 0.05, 0.05, 0, 1)  # patch temperature 0.05
    reference.center2 = center2.clone()
    cls = torch.randn(2 * b, k)  # the CLS term is not compared here
    expected = reference((cls, student), (cls, teacher), None, list(masks.chunk(2)), 0)["patch"]
    expected_centre = reference.center2
    ibot = make_ibot(IBOTConfig(out_dim=k, hidden_dim=16, bottleneck_dim=8, local_crops_number=0))
    ibot.patch_loss.center.center = center2.view(1, k).clone()
    ibot.teacher_patch_temp = 0.05
    flat = masks.flatten(1)
    ours = ibot.compute_patch_loss(student[flat], teacher[flat], masks)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    targets = F.softmax((teacher[flat] - center2.view(1, k)) / 0.05, dim=-1)  # our own cross-entropy, same sum
    torch.testing.assert_close(masked_patch_cross_entropy(targets, student[flat], masks, 0.1), expected)
    ibot._pending_patch_centre.append(teacher.flatten(0, 1))
    ibot.after_step(Progress(step=1, total_steps=10, epochs=1))
    torch.testing.assert_close(ibot.patch_loss.center.center, expected_centre.view(1, k), rtol=0, atol=1e-7)


def test_block_masks_keep_the_official_ratio_range_and_half_the_crops_are_masked():
    random.seed(0)
    ibot = make_ibot(IBOTConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, global_crop_size=224,
                                local_crop_size=96, local_crops_number=0))  # fmt: skip
    transform = ibot.views()
    assert transform.grid == 56  # 224 / patch 4
    transform.grid = 14  # the official ViT-S/16 grid
    ratios = np.array([transform.mask().float().mean().item() for _ in range(400)])
    masked = ratios[ratios > 0]
    assert 0.4 < len(masked) / len(ratios) < 0.6  # --pred_ratio 0 0.3: one of (0, U(0.1, 0.5)) per crop
    assert masked.max() <= 0.5 and np.quantile(masked, 0.05) > 0.08 and 0.25 < masked.mean() < 0.35
    for ratio in (0.1, 0.3, 0.5):  # never above its target; blocks, not scattered patches
        mask = block_mask(14, 14, ratio, (0.3, 1 / 0.3))
        assert 0 < mask.sum() <= ratio * 196
    with pytest.raises(RecipeError, match="pred_ratio"):
        IBOTConfig(pred_ratio=(0.0, 0.3), pred_ratio_var=(0.0, 0.4)).validate()


def test_only_the_student_sees_mask_tokens():
    ibot = make_ibot()
    ibot.mask_token.data.normal_()
    batch = crops_batch(ibot, n=4)
    masks = batch["views"][-2:]
    assert [tuple(m.shape) for m in masks] == [(4, 8, 8)] * 2 and all(m.dtype == torch.bool for m in masks)
    seen = {"student": [], "teacher": []}
    for name in seen:
        patch_embed = getattr(ibot, f"{name}_backbone").patch_embed
        patch_embed.register_forward_hook(lambda m, args, out, name=name: seen[name].append(out))
    for name in seen:
        getattr(ibot, f"{name}_backbone").blocks[0].register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0])
        )
    out = ibot(batch)
    mask = torch.cat(masks)
    assert mask.any() and out["mask_ratio"] == mask.float().mean()
    student_embed, student_in = seen["student"][0], seen["student"][1]
    teacher_embed, teacher_in = seen["teacher"]
    assert student_embed.shape[0] == 8  # the global crops (the local crops follow, unmasked)
    pos = ibot.student_backbone.pos_embed[:, 1:]
    tokens = student_in[:, 1:] - pos  # what replaced the patch embeddings (drop path off: patch_drop is identity)
    flat = mask.flatten(1)
    torch.testing.assert_close(tokens[flat], ibot.mask_token.view(1, -1).expand(int(flat.sum()), -1))
    torch.testing.assert_close(tokens[~flat], student_embed.flatten(1, 2)[~flat])
    torch.testing.assert_close(teacher_in[:, 1:] - pos, teacher_embed.flatten(1, 2))  # no mask token for the teacher
    out["loss"].backward()
    assert ibot.mask_token.grad.abs().sum() > 0


def test_unmasked_tokens_give_timms_own_pooled_feature():
    ibot = make_ibot().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = vit_tokens(ibot.teacher_backbone, images)
        torch.testing.assert_close(tokens[:, 0], ibot.teacher_backbone(images))


@pytest.mark.parametrize("mode", ["shared", "separate", "shared_mlp"])
def test_the_teacher_gets_no_gradient_and_moves_toward_the_student_by_the_momentum(mode):
    ibot = make_ibot(
        IBOTConfig(
            out_dim=64,
            hidden_dim=32,
            bottleneck_dim=16,
            local_crop_size=16,
            local_crops_number=2,
            patch_head=mode,
            patch_out_dim=None if mode == "shared" else 48,
        )
    )
    out = ibot(crops_batch(ibot))
    assert set(out) >= {"loss", "cls_loss", "patch_loss", "patch_loss_share", "teacher_batch_entropy",
                        "teacher_sample_entropy", "student_feature_std"}  # fmt: skip
    assert 0 < out["patch_loss_share"] < 1
    out["loss"].backward()
    student_patch, teacher_patch = ibot.patch_heads()
    assert (student_patch is ibot.student_head) == (mode == "shared")
    teacher = [*ibot.teacher_backbone.parameters(), *ibot.teacher_head.parameters()]
    student = [*ibot.student_backbone.parameters(), *ibot.student_head.parameters()]
    if mode == "separate":
        assert teacher_patch.last_layer.weight_v.shape[0] == 48
        teacher += list(teacher_patch.parameters())
        student += list(student_patch.parameters())
        assert student_patch.layers[0].weight.grad.abs().sum() > 0
    if mode == "shared_mlp":  # only the last layer is the patch tokens' own: the EMA must cover it
        assert ibot.teacher_last_layer2.weight_v.shape[0] == 48
        teacher += list(ibot.teacher_last_layer2.parameters())
        student += list(ibot.student_last_layer2.parameters())
        assert ibot.student_last_layer2.weight_v.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    torch.optim.SGD([p for p in student if p.requires_grad], lr=1.0).step()
    before = [p.detach().clone() for p in teacher]
    ibot.after_step(Progress(step=30, total_steps=100, epochs=10))
    m = teacher_momentum(ibot.cfg.momentum_teacher, 30, 100)
    for new, old, s in zip(teacher, before, student):
        torch.testing.assert_close(new, m * old + (1 - m) * s)


def test_the_export_is_the_teacher_and_loads_strictly_into_timm(tmp_path):
    ibot = make_ibot()
    ibot.student_backbone.patch_embed.proj.weight.data.add_(1.0)
    ibot.update_teacher(0.5)
    out = export_encoder(ibot.encoder_for_export(), TINY.name, model_args(TINY, **IBOT.backbone_kwargs(CFG)),
                         tmp_path / "encoder")  # fmt: skip
    loaded = timm.create_model(f"local-dir:{out}", pretrained=False)
    loaded.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    ibot.eval()
    loaded.eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), ibot.teacher_backbone(images))


def test_the_shipped_ibot_recipes_hold_the_readme_values():
    s16 = load_recipe("ibot_vit_s16")
    o = s16.objective
    # the README's --shared_head true (with --shared_head_teacher's default true): one head for CLS and patches
    assert (o.out_dim, o.head_mode, o.teacher_temp, o.warmup_teacher_temp_epochs, o.norm_last_layer) == (
        8192, "shared", 0.07, 30, False)  # fmt: skip
    assert (o.pred_ratio, o.pred_ratio_var, o.local_crops_number, o.global_crops_scale, o.local_crops_scale) == (
        (0.0, 0.3), (0.0, 0.2), 10, (0.25, 1.0), (0.05, 0.25))  # fmt: skip
    assert (s16.schedule.epochs, s16.train.global_batch_size, s16.optim.base_lr) == (800, 1024, 5e-4)
    for name in ("ibot_vit_s16", "quickstart_ibot"):
        recipe = load_recipe(name)
        recipe.validate()
        assert recipe.objective.name == "ibot"
        # no tensor path: augment_on=auto makes the views (with their masks) in the workers, on a CPU too
        assert isinstance(views_for(make_ibot(), recipe.data), MaskedViews)
    assert load_recipe("quickstart_ibot").model.patch_size == 8


def test_a_short_quickstart_ibot_run_logs_the_patch_loss_share(tmp_path):
    summary = pretrain(tiny_recipe("quickstart_ibot", *TINY_IBOT, "train.max_steps=2"), tmp_path)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    expected = {"loss", "cls_loss", "patch_loss", "patch_loss_share", "mask_ratio", "teacher_batch_entropy",
                "teacher_sample_entropy", "student_feature_std", "koleo", "momentum", "teacher_temp",
                "teacher_patch_temp"}  # fmt: skip
    assert {f"train/{k}" for k in expected} <= set(events.Tags()["scalars"])


def test_rerunning_resumes_with_the_teacher_and_both_centres_restored(tmp_path, monkeypatch):
    class FirstStateRecorder(IBOT):
        first_state: dict | None = None

        def before_step(self, progress):
            if type(self).first_state is None:
                type(self).first_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            super().before_step(progress)

    monkeypatch.setitem(OBJECTIVES, "ibot", FirstStateRecorder)
    run = [*TINY_IBOT, "train.checkpoint_every=1", "log.image_every=0"]
    pretrain(tiny_recipe("quickstart_ibot", *run, "train.max_steps=2"), tmp_path)
    FirstStateRecorder.first_state = None
    assert pretrain(tiny_recipe("quickstart_ibot", *run, "train.max_steps=3"), tmp_path)["steps"] == 3
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert saved["patch_loss.center.center"].abs().sum() > 0 and saved["dino_loss.center"].abs().sum() > 0
    assert saved["mask_token"].abs().sum() > 0
    for key in saved:
        torch.testing.assert_close(FirstStateRecorder.first_state[key], saved[key], rtol=0, atol=0)


def test_shared_mlp_sends_the_patch_tokens_through_the_cls_heads_mlp_and_last_layer2():
    """bytedance/ibot's iBOTHead with shared_head=False (models/head.py, c24f870d), for student and teacher: the
    CLS tokens through mlp and last_layer, the patch tokens through the same mlp and last_layer2; both last layers
    frozen in the first freeze_last_layer epochs (cancel_gradients_last_layer drops every *last_layer*)."""
    cfg = IBOTConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=2,
                     patch_head="shared_mlp", patch_out_dim=48, freeze_last_layer=1)  # fmt: skip
    ibot = make_ibot(cfg)
    keys = set(ibot.state_dict())
    assert {"student_last_layer2.weight_v", "teacher_last_layer2.weight_g"} <= keys
    assert not any(k.startswith(("student_patch_head.", "teacher_patch_head.")) for k in keys)
    assert torch.equal(ibot.teacher_last_layer2.weight_v, ibot.student_last_layer2.weight_v)  # the teacher copies
    assert not ibot.student_last_layer2.weight_g.requires_grad  # norm_last_layer, as last_layer
    seen: dict[str, list[torch.Tensor]] = {}
    for name in ("student_head", "teacher_head"):
        for part in ("layers", "last_layer"):
            module = getattr(getattr(ibot, name), part)
            module.register_forward_hook(lambda m, a, out, key=f"{name}.{part}": seen.setdefault(key, []).append(out))
    for name in ("student_last_layer2", "teacher_last_layer2"):
        getattr(ibot, name).register_forward_hook(lambda m, a, out, key=name: seen.setdefault(key, []).append(out))
    batch = crops_batch(ibot, n=4)
    masked = int(torch.cat(batch["views"][-2:]).sum())
    assert masked > 0
    ibot.before_step(Progress(step=0, total_steps=20, epochs=2))
    out = ibot(batch)
    # student: one MLP pass for the CLS tokens (2 global + 2 local crops of 4), one for the masked patch tokens
    assert [tuple(x.shape) for x in seen["student_head.layers"]] == [(16, 16), (masked, 16)]
    assert [tuple(x.shape) for x in seen["student_head.last_layer"]] == [(16, 64)]
    assert [tuple(x.shape) for x in seen["student_last_layer2"]] == [(masked, 48)]
    expected = ibot.student_last_layer2(F.normalize(seen["student_head.layers"][1], dim=-1))
    torch.testing.assert_close(seen["student_last_layer2"][0], expected)
    # teacher: its MLP on the CLS tokens, then on every patch token of the global crops (8 images x 8 x 8)
    assert [tuple(x.shape) for x in seen["teacher_head.layers"]] == [(8, 16), (8, 64, 16)]
    assert [tuple(x.shape) for x in seen["teacher_last_layer2"]] == [(8, 64, 48)]
    out["loss"].backward()
    assert ibot.student_head.layers[0].weight.grad.abs().sum() > 0
    assert ibot.student_last_layer2.weight_v.grad.abs().sum() > 0
    ibot.after_backward(Progress(step=0, total_steps=20, epochs=2))  # epoch 0 < freeze_last_layer
    assert ibot.student_last_layer2.weight_v.grad is None and ibot.student_head.last_layer.weight_v.grad is None
    assert ibot.student_head.layers[0].weight.grad is not None


def test_the_patch_head_option_and_the_older_shared_head_switch():
    assert IBOTConfig().head_mode == "shared"  # the README commands' --shared_head true
    assert IBOTConfig(shared_head=False).head_mode == "separate"  # what shared_head=false has meant here
    assert IBOTConfig(shared_head=False, patch_head="shared_mlp").head_mode == "shared_mlp"
    recipe = apply_overrides(load_recipe("quickstart_ibot"), ["objective.patch_head=shared_mlp"])
    recipe.validate()
    assert recipe.objective.head_mode == "shared_mlp"
    with pytest.raises(RecipeError, match="contradicts"):
        IBOTConfig(shared_head=False, patch_head="shared").validate()
    with pytest.raises(RecipeError, match="patch_out_dim"):
        IBOTConfig(patch_out_dim=100).validate()
    IBOTConfig(patch_head="shared_mlp", patch_out_dim=100).validate()
    with pytest.raises(RecipeError, match="patch_head"):
        apply_overrides(load_recipe("quickstart_ibot"), ["objective.patch_head=mlp"])


@pytest.mark.parametrize("local_crops", [0, 2])
def test_a_whole_step_equals_bytedance_ibots_loss_on_the_same_heads_and_masks(local_crops):
    cfg = IBOTConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crop_size=16, local_crops_number=local_crops,
                     teacher_temp=0.05, teacher_patch_temp=0.06, warmup_teacher_temp_epochs=0)  # fmt: skip
    ibot = make_ibot(cfg).eval()  # no drop path, so that the forward passes can be repeated
    ibot.mask_token.data.normal_()
    ibot.dino_loss.center.normal_(std=0.1)
    ibot.patch_loss.center.center = torch.randn(1, 64) * 0.1
    batch = crops_batch(ibot, n=4)
    *crops, m1, m2 = batch["views"]
    masks = torch.cat([m1, m2])
    assert masks.any()
    ibot.before_step(Progress(step=0, total_steps=10, epochs=1))
    with torch.no_grad():
        got = ibot(batch)
        teacher_tokens = vit_tokens(ibot.teacher_backbone, torch.cat(crops[:2]))
        teacher_all = ibot.teacher_head(teacher_tokens)  # [1]'s iBOTHead: the shared head on every token
        student_tokens = vit_tokens(ibot.student_backbone, torch.cat(crops[:2]), masks, ibot.mask_token)
        student_all = ibot.student_head(student_tokens)
        student_cls = student_all[:, 0]
        if local_crops:
            student_cls = torch.cat([student_cls, ibot.student_head(ibot.student_backbone(torch.cat(crops[2:])))])
        reference = iBOTLoss(64, 64, 2, local_crops, 0.05, 0.05, 0.06, 0.06, 0, 1)
        reference.center = ibot.dino_loss.center.view(1, -1).clone()
        reference.center2 = ibot.patch_loss.center.center.view(1, 1, -1).clone()
        expected = reference((student_all[:, 0], student_all[:, 1:]), (teacher_all[:, 0], teacher_all[:, 1:]),
                             student_cls[8:] if local_crops else None, list(masks.chunk(2)), 0)["loss"]  # fmt: skip
    assert "koleo" not in got  # off: koleo_weight 0
    torch.testing.assert_close(got["loss"], expected, rtol=1e-5, atol=1e-5)


def test_masks_are_drawn_per_sample_and_none_before_pred_start_epoch():
    from PIL import Image

    from sslvit.data.seeding import seeded_rng

    ibot = make_ibot(
        IBOTConfig(
            out_dim=64,
            hidden_dim=32,
            bottleneck_dim=16,
            local_crop_size=16,
            local_crops_number=0,
            pred_ratio=(0.3, 0.3),
            pred_ratio_var=(0.2, 0.2),
            pred_start_epoch=1,
        )
    )
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 36, 3), dtype=np.uint8))
    draws = []
    for key in ((0, 0, 5), (0, 0, 5), (0, 0, 6)):
        with seeded_rng(*key):
            draws.append(ibot.views()(image)[-2:])
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))  # (seed, epoch, index) fixes the mask
    assert not all(torch.equal(a, b) for a, b in zip(draws[0], draws[2]))
    batch = crops_batch(ibot)
    assert torch.cat(batch["views"][-2:]).any()  # pred_ratio 0.3 +- 0.2: every crop masked
    ibot.before_step(Progress(step=0, total_steps=20, epochs=2))  # epoch 0 < pred_start_epoch
    out = ibot(batch)
    assert out["mask_ratio"] == 0 and out["patch_loss"] == 0
    ibot.before_step(Progress(step=10, total_steps=20, epochs=2))
    assert ibot(batch)["mask_ratio"] > 0
