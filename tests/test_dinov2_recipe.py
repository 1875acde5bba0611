"""The dinov2_vit_s14 recipe: it loads, validates, holds the values its header cites from facebookresearch/dinov2
(b8931f7b) and runs (shrunk to a tiny ViT) with its DINOv2 options on."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.layers import LayerScale

from sslvit.backbone import model_args
from sslvit.cli import run_pretrain
from sslvit.recipe import load_recipe
from sslvit.train import pretrain
from tests.conftest import tiny_recipe


def test_the_dinov2_recipe_holds_the_values_its_header_cites():
    recipe = load_recipe("dinov2_vit_s14")
    recipe.validate()
    o, optim = recipe.objective, recipe.optim
    assert o.name == "ibot" and o.centering == "sinkhorn_knopp" and o.shared_head
    assert (o.out_dim, o.hidden_dim, o.bottleneck_dim, o.norm_last_layer, o.freeze_last_layer) == (
        65536, 2048, 256, False, 1)  # fmt: skip
    assert (o.koleo_weight, o.lambda1, o.lambda2, o.student_temp) == (0.1, 1.0, 1.0, 0.1)
    assert (o.warmup_teacher_temp, o.teacher_temp, o.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (o.warmup_teacher_patch_temp, o.teacher_patch_temp) == (o.warmup_teacher_temp, o.teacher_temp)
    assert o.momentum_teacher == 0.992
    # mask_sample_probability 0.5, mask_ratio_min_max (0.1, 0.5): one crop in two unmasked, the other at 0.1-0.5
    assert (o.pred_ratio, o.pred_ratio_var, o.pred_aspect_ratio, o.pred_start_epoch) == (
        (0.0, 0.3), (0.0, 0.2), (0.3, 1 / 0.3), 0)  # fmt: skip
    assert (o.global_crop_size, o.global_crops_scale, o.local_crop_size, o.local_crops_scale, o.local_crops_number) == (
        224, (0.32, 1.0), 98, (0.05, 0.32), 8)  # fmt: skip
    assert o.blur_probs == (0.0, 0.9, 0.5)  # dinov2's GaussianBlur as it runs (1 - p)
    assert (recipe.model.name, recipe.model.patch_size, recipe.model.img_size, recipe.model.drop_path_rate) == (
        "vit_small_patch14_dinov2", 14, 224, 0.3)  # fmt: skip
    assert (recipe.schedule.epochs, recipe.schedule.warmup_epochs) == (100, 10)
    assert (optim.weight_decay, optim.weight_decay_end, optim.min_lr, optim.clip_grad, optim.betas) == (
        0.04, 0.4, 1e-6, 3.0, (0.9, 0.999))  # fmt: skip
    assert (recipe.train.global_batch_size, recipe.train.batch_size_per_device) == (1024, 64)


def test_print_config_gives_dinov2s_sqrt_scaled_learning_rate_at_the_recipes_batch():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert run_pretrain(["--recipe", "dinov2_vit_s14", "--print-config"]) == 0
    derived = json.loads(out.getvalue())["derived"]
    dinov2_lr = 0.004 * math.sqrt(derived["global_batch_size"] / 1024)  # scaling_rule: sqrt_wrt_1024
    assert derived["global_batch_size"] == 1024 and derived["lr"] == pytest.approx(dinov2_lr, rel=1e-12)


def test_the_backbone_is_vit_s14_with_dinov2s_layerscale():
    recipe = load_recipe("dinov2_vit_s14")
    with torch.device("meta"):
        vit = timm.create_model(recipe.model.name, **model_args(recipe.model, dynamic_img_size=True))
    assert (vit.patch_embed.patch_size, vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (
        (14, 14), 384, 12, 6)  # fmt: skip
    assert vit.num_prefix_tokens == 1 and vit.pos_embed.shape[1] == 1 + 16 * 16  # no registers, a 16 x 16 grid
    assert isinstance(vit.blocks[0].ls1, LayerScale) and vit.blocks[0].ls1.init_values == 1e-5


def test_a_shrunk_dinov2_run_trains_with_sinkhorn_knopp_koleo_and_masked_patches(tmp_path):
    shrink = ["objective.global_crop_size=32", "objective.local_crop_size=16", "objective.local_crops_number=2",
              "objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16", "log.image_every=0",
              "model.drop_path_rate=0.1"]  # fmt: skip
    summary = pretrain(tiny_recipe("dinov2_vit_s14", *shrink), tmp_path)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    logged = {key: [e.value for e in events.Scalars(f"train/{key}")] for key in ("koleo", "patch_loss", "mask_ratio")}
    assert min(logged["mask_ratio"]) > 0 and all(np.isfinite(logged["koleo"] + logged["patch_loss"]))
