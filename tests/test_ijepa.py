"""I-JEPA: masks equal to the official collator's draws (via lightly's IJEPAMaskCollator, the same math as
facebookresearch/ijepa src/masks/multiblock.py at 52c1ae95), their statistics, the target encoder and the recipes.

The shared checks (finite loss, gradients, hooks, strict timm export, bit-identical resume) run in
tests/test_objectives.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from lightly.data import IJEPAMaskCollator

from sslvit.objectives import Progress
from sslvit.objectives.ijepa import MultiBlockMasks
from sslvit.train import build_objective
from tests.conftest import crops_batch, tiny_recipe

OFFICIAL = dict(pred_scale=(0.15, 0.2), enc_scale=(0.85, 1.0), aspect_ratio=(0.75, 1.5), npred=4, nenc=1, min_keep=10,
                allow_overlap=False)  # fmt: skip


def tiny(*extra: str):
    return tiny_recipe("quickstart_ijepa", "objective.predictor_embed_dim=32", "objective.predictor_depth=1", *extra)


@pytest.mark.parametrize("grid", [16, 14])
def test_masks_equal_the_official_collators_draws_from_the_same_generators(grid):
    masks = MultiBlockMasks(grid, grid, **OFFICIAL)
    collator = IJEPAMaskCollator(input_size=grid * 14, patch_size=14, enc_mask_scale=(0.85, 1.0),
                                 pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                 min_keep=10)  # fmt: skip
    for step in range(3):  # the collator seeds its sizes by its call counter (0, 1, 2) and places blocks globally
        torch.manual_seed(100 + step)
        _, enc_ref, pred_ref = collator([torch.zeros(1)] * 8)
        torch.manual_seed(100 + step)
        enc, pred = masks(torch.Generator().manual_seed(step), [torch.default_generator] * 8)
        for ours, theirs in zip([*enc, *pred], [*enc_ref, *pred_ref]):
            assert torch.equal(ours, theirs)


def test_mask_statistics_block_scale_aspect_disjoint_context_and_min_keep():
    grid = 16
    masks = MultiBlockMasks(grid, grid, **OFFICIAL)
    sizes, context_sizes = set(), []
    for step in range(40):
        enc, pred = masks(torch.Generator().manual_seed(step), [torch.Generator().manual_seed(s) for s in range(4)])
        assert len(pred) == 4 and len(enc) == 1
        k = pred[0].shape[1]
        sizes.add(k)
        assert all(p.shape == (4, k) for p in pred)  # every target block of a batch has the batch's one size
        for i in range(4):
            targets = torch.cat([p[i] for p in pred])
            context = enc[0][i]
            assert not set(context.tolist()) & set(targets.tolist())  # context minus targets
            assert context.unique().numel() == context.numel() > 10  # more than min_keep
            rows, cols = pred[0][i] // grid, pred[0][i] % grid  # one target: a full rectangle
            h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
            assert h * w == k and 0.75 - 0.3 <= h / w <= 1.5 + 0.4  # rounding of small sides widens the ratio
            assert rows.max() < grid - 1 and cols.max() < grid - 1  # randint(0, H - h): never the last row/column
        context_sizes.append(enc[0].shape[1])
    assert min(sizes) >= int(0.15 * 256) * 0.8 and max(sizes) <= 0.2 * 256 * 1.2
    assert len(sizes) > 3 and len(set(context_sizes)) > 3  # sizes vary from batch to batch


def test_a_grid_too_small_for_min_keep_is_one_clear_error():
    from sslvit.errors import RecipeError

    with pytest.raises(RecipeError, match="min_keep=40"):
        build_objective(tiny("objective.min_keep=40"))


def test_the_target_encoder_gets_no_gradient_and_moves_by_the_linear_momentum(one_thread):
    torch.manual_seed(0)
    model = build_objective(tiny())[0]
    opt = model.make_optimizer(1e-2, tiny().optim)
    model.before_step(Progress(3, 10, 2))
    model(crops_batch(model, n=8))["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target_encoder.parameters())
    old = [p.detach().clone() for p in model.target_encoder.parameters()]
    opt.step()
    logged = model.after_step(Progress(3, 10, 2))
    m = 0.996 + 3 * (1.0 - 0.996) / 10
    assert logged["momentum"] == pytest.approx(m, abs=1e-12)
    moved = 0
    for before, now, p in zip(old, model.target_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(now, before * m + p.detach() * (1 - m), rtol=1e-6, atol=1e-8)
        moved += not torch.equal(now, before)
    assert moved > 10
    assert model.encoder_for_export() is model.target_encoder


def test_the_loss_is_smooth_l1_on_layer_normed_targets_and_the_signals_are_logged(one_thread):
    torch.manual_seed(0)
    model = build_objective(tiny())[0]
    batch = crops_batch(model, n=4)
    out = model(batch)
    model._micro = 0  # the same masks again
    images, seeds = batch["views"]
    d = model.encoder.embed_dim
    enc, pred = model.draw_masks(seeds)
    with torch.no_grad():
        h = torch.nn.functional.layer_norm(model.target_encoder.forward_features(images), (d,))
        target = torch.cat([torch.gather(h, 1, m[..., None].expand(-1, -1, d)) for m in pred])
        x = model.encoder.patch_embed(images) + model.encoder.pos_embed
        x = torch.gather(x, 1, enc[0][..., None].expand(-1, -1, d))
        z = model.predictor(model.encoder.norm(model.encoder.blocks(x)), enc, pred)
    diff = z - target
    by_hand = torch.where(diff.abs() < 1, 0.5 * diff**2, diff.abs() - 0.5).mean()
    torch.testing.assert_close(out["loss"].detach(), by_hand, rtol=1e-5, atol=1e-6)
    assert {"target_feature_std", "prediction_std", "context_patches", "target_patches"} <= set(out)
    assert 0 < out["target_feature_std"] < 3 / math.sqrt(d)


def test_ijepa_vit_h14_has_the_official_config_values():
    from sslvit.recipe import load_recipe

    r = load_recipe("ijepa_vit_h14")
    o = r.objective
    assert (o.num_pred_masks, o.pred_mask_scale, o.aspect_ratio) == (4, (0.15, 0.2), (0.75, 1.5))
    assert (o.num_enc_masks, o.enc_mask_scale, o.min_keep, o.allow_overlap) == (1, (0.85, 1.0), 10, False)
    assert (o.predictor_depth, o.predictor_embed_dim, o.ema) == (12, 384, (0.996, 1.0))
    assert (o.crop_scale, o.hflip_prob) == ((0.3, 1.0), 0.0)
    assert r.optim.base_lr * r.train.global_batch_size / 256 == pytest.approx(1e-3)
    assert (r.optim.warmup_start_lr, r.optim.min_lr) == (2e-4, 1e-6)
    assert (r.optim.weight_decay, r.optim.weight_decay_end) == (0.04, 0.4)
    assert (r.schedule.epochs, r.schedule.warmup_epochs) == (300, 40)
    assert (r.model.name, r.model.patch_size) == ("vit_huge_patch14_224", 14)
