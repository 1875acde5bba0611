"""MAE: masking, views and visualisations (the loss, predictions and gradients are compared with the authors'
model in tests/reference/test_mae_reference.py)."""

from __future__ import annotations

import pytest
import torch

from sslvit.backbone import build_vit
from sslvit.objectives import MAE
from tests.conftest import tiny_recipe


def tiny_mae(**overrides: str) -> MAE:
    recipe = tiny_recipe("quickstart", *(f"objective.{k}={v}" for k, v in overrides.items()))
    torch.manual_seed(0)
    return MAE(build_vit(recipe.model), recipe.objective)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5, 0.9])
def test_encoder_sees_only_the_visible_patch_tokens(mask_ratio):
    mae = tiny_mae(mask_ratio=mask_ratio)
    seen = []
    mae.backbone.vit.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
    images = torch.randn(4, 3, 32, 32)
    out = mae({"views": [images]})
    keep = int(64 * (1 - mask_ratio))  # the official count: int(L * (1 - mask_ratio))
    assert keep == round(64 * (1 - mask_ratio))
    assert seen == [torch.Size([4, 1 + keep, 64])]  # class token + visible patches, nothing else
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_masking_is_per_sample_and_partitions_the_patches():
    mae = tiny_mae()
    torch.manual_seed(0)
    idx_keep, idx_mask = mae.random_mask(8, torch.device("cpu"))
    assert (idx_keep[:, 0] == 0).all()  # the class token is always kept
    for keep, masked in zip(idx_keep, idx_mask):
        assert sorted(keep[1:].tolist() + masked.tolist()) == list(range(1, 65))
    assert len({tuple(sorted(k.tolist())) for k in idx_keep}) == 8  # different samples, different masks


def test_gradients_reach_the_encoder_and_not_the_fixed_position_embeddings():
    mae = tiny_mae()
    mae({"views": [torch.randn(2, 3, 32, 32)]})["loss"].backward()
    vit = mae.backbone.vit
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert vit.blocks[-1].mlp.fc2.weight.grad.abs().sum() > 0
    assert not vit.pos_embed.requires_grad and not mae.decoder.pos_embed.requires_grad
    names = {
        n
        for g in mae.param_groups(0.05)
        if g["weight_decay"] == 0
        for n, p in mae.named_parameters()
        if any(p is q for q in g["params"])
    }
    assert {"backbone.vit.cls_token", "decoder.mask_token", "backbone.vit.blocks.0.norm1.weight"} <= names
    assert "backbone.vit.blocks.0.attn.qkv.weight" not in names


def test_views_are_one_normalised_crop_at_the_model_size():
    from PIL import Image

    views = tiny_mae().views()(Image.new("RGB", (50, 40), (255, 0, 0)))
    assert len(views) == 1 and views[0].shape == (3, 32, 32)
    assert views[0][0].mean() > 2.0  # red, ImageNet-normalised


def test_visualisation_denormalises_and_keeps_the_visible_patches():
    mae = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32).clamp(-2, 2)
    grid = mae.visualize({"views": [images]})["mae/reconstructions"]
    assert grid.shape == (3, 2 * 33 + 1, 3 * 33 + 1) and grid.min() >= 0 and grid.max() <= 1
    original, reconstruction = grid[:, 1:33, 1:33], grid[:, 1:33, 67:99]
    # a quarter of the patches are visible and pasted back unchanged
    same = (original - reconstruction).abs().reshape(3, 8, 4, 8, 4).amax(dim=(0, 2, 4)) < 1e-5
    assert same.sum() == 16
