"""sslvit's I-JEPA against facebookresearch/ijepa (restated in ijepa_reference.py): the multi-block masks drawn
from the same generators are identical, sslvit's own seeding draws them with the same statistics, the loss and the
context encoder's and predictor's gradients agree to float32 rounding, and the target encoder's EMA follows the
authors' momentum schedule step by step.

Run with ``-s`` to see the largest differences measured.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torch import nn

from sslvit.backbone import build_vit
from sslvit.objectives import Progress
from sslvit.objectives.ijepa import IJEPA, SEED_RANGE, IJEPAConfig, MultiBlockMasks
from sslvit.recipe import ModelConfig, load_recipe
from sslvit.training.derived import derive
from tests.reference.ijepa_reference import (
    MaskCollator,
    forward_context,
    forward_target,
    loss_fn,
    momentum_scheduler,
    momentum_update,
    vit_encoder,
    vit_predictor,
)
from tests.reference.tolerance import assert_float32_close

PATCH = 4
# configs/in1k_vith14_ep300.yaml's mask section (also every other official config's)
OFFICIAL = {"enc_mask_scale": (0.85, 1.0), "pred_mask_scale": (0.15, 0.2), "aspect_ratio": (0.75, 1.5), "nenc": 1,
            "npred": 4, "min_keep": 10, "allow_overlap": False}  # fmt: skip
# context blocks that rarely keep more than min_keep patches outside the targets: the relaxation path runs
CROWDED = {**OFFICIAL, "pred_mask_scale": (0.3, 0.4), "enc_mask_scale": (0.4, 0.5), "min_keep": 25}

# A tiny ViT on the official masks' smallest grid: 56 px, 4 px patches (14 x 14), width 32, depth 2; predictor
# width 16, depth 2, the encoder's 2 heads (as init_model).
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=56, patch_size=PATCH, depth=2, embed_dim=32, num_heads=2)
GRID = 56 // PATCH
TINY = IJEPAConfig(predictor_embed_dim=16, predictor_depth=2)

# Tolerances: float32 rounding, in units of float32 eps (1.19e-7) times the largest magnitude compared
# (tests/reference/tolerance.py; for a gradient, that tensor's largest). timm's attention runs torch's fused
# scaled_dot_product_attention where the authors write out q k^T, softmax and the product with v: the same math,
# rounded in another order, a few ulps of each block's output and of the gradients through them.
# lightly's sin-cos table starts from a float32 grid, the authors' from float64: the same float32 values or 1 ulp.
# sslvit's EMA adds ``(1 - m) * student`` in one fused foreach op where the authors multiply then add: an ulp.
FEATURE_ULPS = 8
LOSS_ULPS = 4
GRAD_ULPS = 8
POS_EMBED_ULPS = 1
TEACHER_ULPS = 2


def masks_for(grid: int, settings: dict) -> tuple[MaskCollator, MultiBlockMasks]:
    """The authors' collator and sslvit's MultiBlockMasks for one grid and mask section."""
    s = settings
    collator = MaskCollator(input_size=grid * PATCH, patch_size=PATCH, enc_mask_scale=s["enc_mask_scale"],
                            pred_mask_scale=s["pred_mask_scale"], aspect_ratio=s["aspect_ratio"], nenc=s["nenc"],
                            npred=s["npred"], min_keep=s["min_keep"], allow_overlap=s["allow_overlap"])  # fmt: skip
    ours = MultiBlockMasks(grid, grid, s["pred_mask_scale"], s["enc_mask_scale"], s["aspect_ratio"], s["npred"],
                           s["nenc"], s["min_keep"], s["allow_overlap"])  # fmt: skip
    return collator, ours


@pytest.mark.parametrize(
    ("grid", "settings"),
    [(14, OFFICIAL), (16, OFFICIAL), (14, {**OFFICIAL, "allow_overlap": True}), (14, {**OFFICIAL, "nenc": 2}),
     (14, CROWDED)],
    ids=["14x14", "16x16", "14x14-allow_overlap", "14x14-2-context-blocks", "14x14-crowded"],
)  # fmt: skip
def test_masks_from_the_same_generators_equal_the_authors_collators(grid, settings):
    """Three epochs of four batches of 8 images (one epoch in the crowded case, where redraws are many): the
    authors' collator seeds each batch's block sizes by its call counter (it never resets between epochs) and places
    blocks from the global RNG; sslvit's MultiBlockMasks gets a size generator seeded by the same counter and the
    global generator for every image. Both streams run from one seed, so the batches also consume the global RNG
    identically."""
    collator, ours = masks_for(grid, settings)
    batches, batch = (4 if settings is CROWDED else 12), 8
    torch.manual_seed(1234)
    theirs = [collator([torch.zeros(1)] * batch)[1:] for _ in range(batches)]
    rng_after_theirs = torch.rand(3)
    torch.manual_seed(1234)
    mine = [ours(torch.Generator().manual_seed(i), [torch.default_generator] * batch) for i in range(batches)]
    assert torch.equal(torch.rand(3), rng_after_theirs)  # the global RNG was consumed identically
    for i, ((enc, pred), (ref_enc, ref_pred)) in enumerate(zip(mine, theirs)):
        assert len(enc) == len(ref_enc) == settings["nenc"] and len(pred) == len(ref_pred) == settings["npred"]
        for kind, a, b in [("context", enc, ref_enc), ("target", pred, ref_pred)]:
            for m, ref in zip(a, b):
                assert m.dtype == ref.dtype and torch.equal(m, ref), f"batch {i}: a {kind} mask differs"
    if settings is CROWDED:
        assert collator.relaxations > 0  # the "decreasing acceptable-regions" path ran and matched
    k_pred = sorted({pred[0].shape[1] for _, pred in theirs})
    k_enc = sorted({enc[0].shape[1] for enc, _ in theirs})
    overlap = ", overlap allowed" if settings["allow_overlap"] else ""
    print(f"\nI-JEPA masks {grid}x{grid}, {settings['nenc']} + {settings['npred']} blocks{overlap}: {batches} batches "
          f"identical; target lengths {k_pred}, context lengths {k_enc}, relaxations {collator.relaxations}"
          )  # fmt: skip


def mask_statistics(enc: list[torch.Tensor], pred: list[torch.Tensor], grid: int, stats: dict) -> None:
    """Append one batch's statistics: kept lengths, the first image's first target block's height, width and aspect
    ratio, every target block's top-left corner, the number of distinct corners among the batch's first target blocks
    (1 if every image drew the same positions); and check that each context avoids its image's targets."""
    stats["target length"].append(pred[0].shape[1])
    stats["context length"].append(enc[0].shape[1])
    block = pred[0][0]  # a target block is never restricted: all h * w patches, row-major from its top-left corner
    rows, cols = block // grid, block % grid
    h, w = rows.unique().numel(), cols.unique().numel()
    assert h * w == block.numel()
    stats["target height"].append(h)
    stats["target width"].append(w)
    stats["target aspect"].append(h / w)
    stats["distinct corners"].append(pred[0][:, 0].unique().numel())
    for p in pred:
        stats["target top"] += (p[:, 0] // grid).tolist()
        stats["target left"] += (p[:, 0] % grid).tolist()
    for i in range(len(enc[0])):
        targets = set(torch.cat([p[i] for p in pred]).tolist())
        assert not targets & set(enc[0][i].tolist())


def test_sslvits_own_seeding_draws_masks_with_the_authors_statistics():
    """sslvit draws sizes from a generator keyed by (step, micro-batch) and positions from per-sample seeds (resume
    replays them); the authors from a counter-seeded generator and the worker's global RNG. The algorithm being the
    same (above), the draws must have the same distribution: two-sample KS tests over 500 batches of 4 images (2,000
    images, 8,000 target blocks) on the 14 x 14 grid, the official mask section."""
    torch.manual_seed(0)
    ours = IJEPA(build_vit(MODEL, **IJEPA.backbone_kwargs(TINY)), TINY)
    collator, _ = masks_for(GRID, OFFICIAL)
    batches, batch = 500, 4
    names = ("target length", "context length", "target height", "target width", "target aspect", "target top",
             "target left", "distinct corners")  # fmt: skip
    theirs: dict = {k: [] for k in names}
    mine: dict = {k: [] for k in names}
    seeds = torch.Generator().manual_seed(5)
    torch.manual_seed(6)
    for step in range(batches):
        mask_statistics(*collator([0] * batch)[1:], GRID, theirs)
        ours.before_step(Progress(step, batches, 1))
        mask_statistics(*ours.draw_masks(torch.randint(0, SEED_RANGE, (batch,), generator=seeds)), GRID, mine)
    lines = []
    for name in names:
        result = ks_2samp(mine[name], theirs[name], method="asymp")  # ties: the exact method does not apply
        lines.append(f"{name} mean {np.mean(mine[name]):.3f} vs {np.mean(theirs[name]):.3f} (KS p {result.pvalue:.2f})")
        assert result.pvalue > 1e-3, f"{name}: {lines[-1]}"
    assert min(mine["context length"]) > OFFICIAL["min_keep"] and min(mine["target length"]) > OFFICIAL["min_keep"]
    print("\nI-JEPA mask statistics, sslvit vs the authors' collator: " + "; ".join(lines))


def reference_name(name: str) -> str:
    """The authors' name for a parameter of sslvit's encoder or predictor (lightly keeps the predictor's transformer
    core in ``decoder``); timm's ViT blocks use the authors' names."""
    renames = [
        ("predictor.decoder.blocks.", "predictor_blocks."),
        ("predictor.decoder.norm.", "predictor_norm."),
        ("predictor.decoder.pos_embed", "predictor_pos_embed"),
        ("predictor.decoder.mask_token", "mask_token"),
        ("predictor.", ""),
        ("target_encoder.", ""),
        ("encoder.", ""),
    ]
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    raise AssertionError(name)


def build_pair(cfg: IJEPAConfig):
    """sslvit's I-JEPA with every weight but the fixed position embeddings moved off its init (the target encoder
    apart from the context encoder), and the authors' encoder, predictor and target encoder holding the same."""
    torch.manual_seed(0)
    ours = IJEPA(build_vit(MODEL, **IJEPA.backbone_kwargs(cfg)), cfg)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            if "pos_embed" not in name:
                param.add_(0.05 * torch.randn_like(param))
    encoder = vit_encoder(MODEL.img_size, PATCH, MODEL.embed_dim, MODEL.depth, MODEL.num_heads)
    target_encoder = vit_encoder(MODEL.img_size, PATCH, MODEL.embed_dim, MODEL.depth, MODEL.num_heads)
    predictor = vit_predictor(num_patches=GRID**2, embed_dim=MODEL.embed_dim,
                              predictor_embed_dim=cfg.predictor_embed_dim, depth=cfg.predictor_depth,
                              num_heads=MODEL.num_heads)  # fmt: skip
    for module, prefix in ((encoder, "encoder."), (target_encoder, "target_encoder."), (predictor, "predictor.")):
        fixed = {k: v.detach().clone() for k, v in module.state_dict().items() if "pos_embed" in k}
        ours_pos = {
            reference_name(k): v for k, v in ours.state_dict().items() if k.startswith(prefix) and "pos_embed" in k
        }
        for key, table in fixed.items():  # lightly's fixed sin-cos tables are the authors'
            assert_float32_close(ours_pos[key], table, POS_EMBED_ULPS, f"{prefix}{key}")
        mapped = {reference_name(k): v.detach().clone() for k, v in ours.state_dict().items() if k.startswith(prefix)}
        module.load_state_dict({**mapped, **fixed})  # strict: every weight maps one to one
    for param in target_encoder.parameters():
        param.requires_grad = False  # as train.py
    return ours, encoder, predictor, target_encoder


def capture(module: nn.Module, into: list) -> None:
    module.register_forward_hook(lambda m, args, out: into.append(out.detach()))


@pytest.mark.parametrize("nenc", [1, 2], ids=["1-context-block", "2-context-blocks"])
def test_loss_and_gradients_equal_the_authors_train_step(nenc):
    """Two batches of 4 images with the authors' collator's masks (official scales), fed to sslvit's forward in
    place of its own draw: the target and context encoders' features, the predictions, the loss, and the gradient of
    every context-encoder and predictor parameter (none for the target encoder or the fixed position embeddings)."""
    cfg = dataclasses.replace(TINY, num_enc_masks=nenc)
    ours, encoder, predictor, target_encoder = build_pair(cfg)
    collator, _ = masks_for(GRID, {**OFFICIAL, "nenc": nenc})
    seen: dict[str, list] = {k: [] for k in ("target", "context", "pred", "ref target", "ref context", "ref pred")}
    for module, key in [
        (ours.target_encoder.norm, "target"),
        (ours.encoder.norm, "context"),
        (ours.predictor, "pred"),
        (target_encoder.norm, "ref target"),
        (encoder.norm, "ref context"),
        (predictor, "ref pred"),
    ]:
        capture(module, seen[key])  # fmt: skip
    ours_params = {n: p for n, p in ours.named_parameters() if not n.startswith("target_encoder.")}
    ref_params = {**dict(encoder.named_parameters()), **dict(predictor.named_parameters())}
    worst = dict.fromkeys(("features", "predictions", "loss", "gradients"), 0.0)
    largest = dict.fromkeys(worst, 0.0)  # the magnitudes compared, for the printed summary
    torch.manual_seed(3)
    for it in range(2):
        imgs, masks_enc, masks_pred = collator([torch.randn(3, 56, 56) for _ in range(4)])
        ours.draw_masks = lambda seeds, m=(masks_enc, masks_pred): m  # the authors' masks, in sslvit's forward
        for p in (*ours_params.values(), *ref_params.values()):
            p.grad = None
        loss = ours({"views": [imgs, torch.zeros(4, dtype=torch.long)]})["loss"]
        loss.backward()
        h = forward_target(target_encoder, imgs, masks_enc, masks_pred)  # train_step's order
        z = forward_context(encoder, predictor, imgs, masks_enc, masks_pred)
        ref_loss = loss_fn(z, h)
        ref_loss.backward()

        assert h.shape == z.shape == (4 * nenc * 4, masks_pred[0].shape[1], MODEL.embed_dim)
        for key in ("target", "context"):
            what = f"{key} encoder features, batch {it}"
            diff = assert_float32_close(seen[key][-1], seen[f"ref {key}"][-1], FEATURE_ULPS, what)
            worst["features"] = max(worst["features"], diff)
            largest["features"] = max(largest["features"], seen[f"ref {key}"][-1].abs().max().item())
        pred_diff = assert_float32_close(seen["pred"][-1], z, FEATURE_ULPS, f"predictions, batch {it}")
        worst["predictions"] = max(worst["predictions"], pred_diff)
        largest["predictions"] = max(largest["predictions"], z.detach().abs().max().item())
        largest["loss"] = max(largest["loss"], ref_loss.item())
        worst["loss"] = max(worst["loss"], assert_float32_close(loss, ref_loss, LOSS_ULPS, f"loss, batch {it}"))
        for name, param in ours_params.items():
            ref = ref_params[reference_name(name)]
            assert (param.grad is None) == (ref.grad is None) == ("pos_embed" in name), name
            if param.grad is not None:
                diff = assert_float32_close(param.grad, ref.grad, GRAD_ULPS, f"gradient of {name}")
                worst["gradients"] = max(worst["gradients"], diff)
                largest["gradients"] = max(largest["gradients"], ref.grad.abs().max().item())
        assert all(p.grad is None for p in ours.target_encoder.parameters())
    # the checks can bite: the target encoder differs from the context encoder, the gradients are not small
    assert (ours.target_encoder.blocks[0].attn.qkv.weight - ours.encoder.blocks[0].attn.qkv.weight).abs().max() > 0.05
    assert ours.encoder.blocks[0].attn.qkv.weight.grad.abs().max() > 1e-6
    differences = ", ".join(f"{k} {v:.3g} ({largest[k]:.3g})" for k, v in worst.items())
    print(f"\nI-JEPA loss, {nenc} context block(s) + 4 targets: largest difference (largest magnitude): "
          f"{differences}")  # fmt: skip


def test_the_momentum_schedule_is_the_authors_over_the_official_recipe():
    """ijepa_vit_h14 with 7 iterations per epoch (an incomplete last batch dropped, as the authors' loader): the
    momentum of every one of the 2,100 steps is ``next(momentum_scheduler)`` (ipe_scale 1.0, the value of every
    official config); after_step, which applies it, logs it (checked at the first, middle and last steps)."""
    recipe = load_recipe("ijepa_vit_h14")
    derived = derive(recipe, world_size=1, num_samples=recipe.train.global_batch_size * 7 + 100)
    ipe, epochs, total = 7, recipe.schedule.epochs, derived.total_steps
    assert (derived.steps_per_epoch, total) == (ipe, ipe * epochs)
    cfg = dataclasses.replace(recipe.objective, crop_size=None, predictor_embed_dim=16, predictor_depth=1)
    ours = IJEPA(build_vit(MODEL, **IJEPA.backbone_kwargs(cfg)), cfg)
    schedule = momentum_scheduler(cfg.ema, ipe, epochs, ipe_scale=1.0)
    worst = 0.0
    for it in range(total):
        expected = next(schedule)
        momentum = ours.momentum_at(it, total)
        if it in (0, 1, ipe, total // 2, total - 1):
            assert ours.after_step(Progress(it, total, epochs))["momentum"] == momentum
        worst = max(worst, abs(momentum - expected))
        assert momentum == pytest.approx(expected, rel=1e-15, abs=0), f"step {it}"
    assert next(schedule) == cfg.ema[1] and expected < cfg.ema[1]  # the authors' last value is never used either
    print(f"\nI-JEPA momentum, {total} steps of ijepa_vit_h14: largest difference {worst:.3g}")


def test_the_target_encoder_ema_is_the_authors_momentum_update():
    """Five steps of a 5-step run with ema (0.9, 0.99): after each (simulated) optimizer step, sslvit's after_step
    moves its target encoder as the authors' Step 3 moves theirs with ``next(momentum_scheduler)``."""
    cfg = dataclasses.replace(TINY, ema=(0.9, 0.99))
    ours, encoder, _, target_encoder = build_pair(cfg)
    total = 5
    schedule = momentum_scheduler(cfg.ema, ipe=1, num_epochs=total, ipe_scale=1.0)
    worst, moved = 0.0, 0.0
    generator = torch.Generator().manual_seed(8)
    for it in range(total):
        with torch.no_grad():  # an optimizer step moves the context encoder (the same on both sides)
            for param, ref in zip(ours.encoder.parameters(), encoder.parameters()):
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))
                ref.copy_(param)
            for param, ref in zip(ours.target_encoder.parameters(), target_encoder.parameters()):
                ref.copy_(param)  # each step starts equal: rounding does not compound
        before = [p.detach().clone() for p in target_encoder.parameters()]
        m = next(schedule)
        assert ours.after_step(Progress(it, total, total))["momentum"] == pytest.approx(m, rel=1e-15)
        momentum_update(encoder, target_encoder, m)
        for (name, param), ref, old in zip(ours.target_encoder.named_parameters(), target_encoder.parameters(), before):
            diff = assert_float32_close(param, ref, TEACHER_ULPS, f"target encoder {name} after step {it}")
            worst, moved = max(worst, diff), max(moved, (ref - old).abs().max().item())
    assert moved > 1e-3  # the EMA moved the weights well beyond the tolerance
    print(f"\nI-JEPA target-encoder EMA, {total} steps: largest difference {worst:.3g} (largest move {moved:.3g})")
