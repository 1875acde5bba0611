"""MoCo v3 against facebookresearch/moco-v3 (commit c349e6e24f40d3fedb22d973f92defa4cedf37a7), restated here.

The reference below restates moco/builder.py's ``MoCo.contrastive_loss`` and ``MoCo.forward``, vits.py's
``build_2d_sincos_position_embedding`` and main_moco.py's ``adjust_moco_momentum`` in our own words (with torch's
single-process world: rank 0, ``concat_all_gather`` the identity); the math is theirs, the shims are ours.
Tolerances are float32 rounding: the objective runs the backbone on both views as one batch, the reference on
each view alone, so matrix products round differently; measured on the tiny model: loss within 6e-7 relative,
gradients within 1.1e-5 of each tensor's largest, momentum parameters within float32 rounding.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.objectives import OBJECTIVES, MoCoV3, Progress
from sslvit.objectives.mocov3 import LARS, sincos_2d
from sslvit.train import build_objective, pretrain
from tests.conftest import crops_batch, tiny_recipe

HEADS = ("objective.mlp_dim=32", "objective.out_dim=16")


def tiny(*extra: str):
    return tiny_recipe("quickstart_mocov3", *HEADS, *extra)


def build(*extra: str, seed: int = 0) -> MoCoV3:
    torch.manual_seed(seed)
    return build_objective(tiny(*extra))[0]


def reference_contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """builder.py ``contrastive_loss`` on one process: L2-normalise q and k, logits ``q k^T / T`` (einsum 'nc,mc->nm'),
    cross-entropy against labels 0..N-1 (+ N * rank, rank 0 here), times ``2 T``."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    return torch.nn.CrossEntropyLoss()(logits, torch.arange(logits.shape[0])) * (2 * temperature)


def reference_forward(model: MoCoV3, x1: torch.Tensor, x2: torch.Tensor, m: float) -> torch.Tensor:
    """builder.py ``MoCo.forward``: queries = predictor(base encoder(view)) per view; under no_grad the momentum
    encoder moves first (``param_m * m + param_b * (1 - m)``), then gives keys per view; loss = ctr(q1, k2) +
    ctr(q2, k1). ``base_encoder`` is our backbone + projector (moco-v3 puts the projector in the ViT's head)."""
    base = lambda x: model.projector(model.backbone(x))  # noqa: E731
    q1, q2 = model.predictor(base(x1)), model.predictor(base(x2))
    with torch.no_grad():
        pairs = zip(
            [*model.backbone.parameters(), *model.projector.parameters()],
            [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()],
        )
        for param_b, param_m in pairs:
            param_m.data = param_m.data * m + param_b.data * (1.0 - m)
        k1 = model.momentum_projector(model.momentum_backbone(x1))
        k2 = model.momentum_projector(model.momentum_backbone(x2))
    t = model.cfg.temperature
    return reference_contrastive_loss(q1, k2, t) + reference_contrastive_loss(q2, k1, t)


def reference_momentum(base: float, epoch: float, epochs: int) -> float:
    """main_moco.py ``adjust_moco_momentum`` at the fractional epoch ``epoch + i / iters_per_epoch``."""
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - base)


def reference_sincos(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """vits.py ``build_2d_sincos_position_embedding`` (class-token row included)."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")  # fmt: skip
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    emb = torch.cat([out_w.sin(), out_w.cos(), out_h.sin(), out_h.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb])[None]


def _perturb(module: torch.nn.Module, seed: int = 1) -> None:
    """Stands in for optimizer steps, so that base and momentum encoders differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)


def test_loss_and_gradients_equal_moco_v3s_symmetric_forward(one_thread):
    model = build()
    x1, x2 = crops_batch(model, n=8)["views"]
    _perturb(model.backbone)
    _perturb(model.projector, seed=2)
    reference = copy.deepcopy(model)
    ours = model.train()
    m, step, total = ours.momentum_at(3, 10), 2, 10  # the update after step 2 = moco-v3's at the start of step 3
    assert m == pytest.approx(reference_momentum(ours.cfg.momentum, 3 / 10 * 18, 18), abs=1e-12)
    ours.after_step(Progress(step, total, 18))
    out = ours({"views": [x1, x2]})
    expected = reference_forward(reference.train(), x1, x2, m)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=1e-6)
    assert out["loss"] > 0.1  # not a degenerate 0 = 0
    for (name, ours_p), theirs_p in zip(ours.momentum_backbone.named_parameters(),
                                        reference.momentum_backbone.parameters()):  # fmt: skip
        torch.testing.assert_close(ours_p, theirs_p, rtol=1e-6, atol=1e-7, msg=name)
    out["loss"].backward()
    expected.backward()
    named = dict(reference.named_parameters())
    graded = [(n, p) for n, p in ours.named_parameters() if p.grad is not None]
    assert {n for n, _ in graded} == {n for n, p in named.items() if p.grad is not None}
    assert len(graded) > 20
    for name, p in graded:  # measured: at most 1.1e-5 of the tensor's largest gradient (the final norm's bias,
        # whose true gradient is 0 under the projector's BatchNorm, differs by 5e-7)
        scale = named[name].grad.abs().max().item()
        assert (p.grad - named[name].grad).abs().max().item() <= 1e-4 * scale + 1e-6, name


def test_the_loss_uses_temperature_and_its_2t_factor_and_matches_by_hand():
    torch.manual_seed(0)
    q, k = torch.randn(5, 8), torch.randn(5, 8)
    from sslvit.objectives.mocov3 import contrastive_loss

    for t in (0.2, 1.0):
        qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
        by_hand = torch.stack([-(qn[i] @ kn[i] / t - torch.logsumexp(qn[i] @ kn.t() / t, 0)) for i in range(5)])
        torch.testing.assert_close(contrastive_loss(q, k, t), by_hand.mean() * 2 * t)
        torch.testing.assert_close(contrastive_loss(q, k, t), reference_contrastive_loss(q, k, t))


def test_the_heads_are_moco_v3s_mlps():
    model = build()
    layers = list(model.projector.layers)
    assert [type(x).__name__ for x in layers] == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear", "BatchNorm1d"]
    assert all(x.bias is None for x in layers if isinstance(x, torch.nn.Linear))
    assert layers[-1].weight is None and layers[1].weight is not None  # the last BatchNorm has no affine part
    assert [type(x).__name__ for x in model.predictor.layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear",
                                                                  "BatchNorm1d"]  # fmt: skip
    assert model.predictor.layers[-1].weight is None


def test_the_position_embedding_is_moco_v3s_fixed_sincos():
    model = build()
    grid, dim = model.backbone.patch_embed.grid_size[0], model.backbone.embed_dim
    torch.testing.assert_close(model.backbone.pos_embed.detach(), reference_sincos(grid, dim), rtol=0, atol=0)
    assert not model.backbone.pos_embed.requires_grad
    torch.testing.assert_close(sincos_2d((grid, grid), dim), reference_sincos(grid, dim)[0, 1:], rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["adamw", "lars"])
def test_the_patch_projection_and_position_embedding_get_no_gradient_and_stay_unchanged(optimizer, one_thread):
    model = build(f"objective.optimizer={optimizer}")
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "patch_embed" in n or "pos" in n}
    assert set(frozen) == {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    before = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    opt = model.make_optimizer(1e-2, tiny().optim)
    assert isinstance(opt, LARS if optimizer == "lars" else torch.optim.AdamW)
    model(crops_batch(model, n=8))["loss"].backward()
    opt.step()
    after = dict(model.backbone.named_parameters())
    for name, value in frozen.items():
        assert after[name].grad is None, name
        assert torch.equal(after[name], value), name
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert "blocks.0.attn.qkv.weight" in moved and "cls_token" in moved


def test_without_the_stability_trick_the_patch_projection_trains():
    model = build("objective.stop_grad_patch_embed=false", "objective.sincos_pos_embed=false")
    model(crops_batch(model, n=8))["loss"].backward()
    assert model.backbone.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.backbone.pos_embed.grad.abs().sum() > 0


def test_the_momentum_encoder_gets_no_gradient_and_moves_by_the_momentum(one_thread):
    model = build()
    opt = model.make_optimizer(1e-2, tiny().optim)
    model(crops_batch(model, n=8))["loss"].backward()
    momentum_params = [*model.momentum_backbone.parameters(), *model.momentum_projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in momentum_params)
    old = [p.detach().clone() for p in momentum_params]
    opt.step()
    logged = model.after_step(Progress(0, 10, 2))
    m = reference_momentum(0.99, 1 / 10 * 2, 2)
    assert logged["momentum"] == pytest.approx(m, abs=1e-12) and 0.99 < m < 1
    base = [*model.backbone.parameters(), *model.projector.parameters()]
    moved = 0
    for before, now, b in zip(old, momentum_params, base):
        torch.testing.assert_close(now, before * m + b.detach() * (1 - m), rtol=1e-6, atol=1e-8)
        moved += not torch.equal(now, before)
    assert moved > 20  # the trainable ones moved; a constant momentum option stays constant
    assert build("objective.momentum_cosine=false").momentum_at(5, 10) == 0.99


def test_a_non_vit_backbone_is_one_clear_error():
    from sslvit.errors import RecipeError

    with pytest.raises(RecipeError, match="VisionTransformer"):
        MoCoV3(timm.create_model("resnet18", num_classes=0), tiny().objective)
    with pytest.raises(RecipeError, match="crop_size=16 must equal model.img_size=32"):
        build("objective.crop_size=16")


def test_rerunning_resumes_with_the_momentum_encoder_and_its_batchnorm_restored(tmp_path, monkeypatch, one_thread):
    class FirstStateRecorder(MoCoV3):
        first_state: dict | None = None

        def before_step(self, progress):
            if type(self).first_state is None:
                type(self).first_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
            super().before_step(progress)

    monkeypatch.setitem(OBJECTIVES, "mocov3", FirstStateRecorder)
    pretrain(tiny("train.max_steps=2", "train.checkpoint_every=1"), tmp_path)
    FirstStateRecorder.first_state = None
    summary = pretrain(tiny("train.max_steps=4", "train.checkpoint_every=1"), tmp_path)
    assert summary["steps"] == 4
    saved = load_file(str(tmp_path / "checkpoints" / "step_00000002" / "model.safetensors"))
    resumed = FirstStateRecorder.first_state
    assert saved["momentum_projector.layers.1.running_mean"].abs().sum() > 0
    assert not torch.equal(saved["momentum_backbone.cls_token"], saved["backbone.cls_token"])
    assert set(resumed) == set(saved)
    for key in saved:
        torch.testing.assert_close(resumed[key], saved[key], rtol=0, atol=0, msg=key)
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    expected = {"loss", "contrastive_accuracy", "positive_cosine", "feature_std", "momentum", "lr"}
    assert {f"train/{k}" for k in expected} <= set(events.Tags()["scalars"])
    exported = load_file(str(tmp_path / "encoder" / "model.safetensors"))
    model = timm.create_model(f"local-dir:{tmp_path / 'encoder'}", pretrained=False)
    model.load_state_dict(exported, strict=True)
    last = load_file(str(tmp_path / "checkpoints" / "step_00000004" / "model.safetensors"))
    for key, value in exported.items():  # the export is the base encoder's backbone
        torch.testing.assert_close(value, last[f"backbone.{key}"], rtol=0, atol=0)


def test_mocov3_vit_s16_has_config_mds_values():
    from sslvit.recipe import load_recipe

    r = load_recipe("mocov3_vit_s16")
    o = r.objective
    assert (o.out_dim, o.mlp_dim, o.momentum, o.momentum_cosine, o.temperature) == (256, 4096, 0.99, True, 0.2)
    assert (o.stop_grad_patch_embed, o.optimizer, o.crop_min_scale, o.crop_size) == (True, "adamw", 0.08, 224)
    assert (o.blur_probs, o.solarization_probs) == ((1.0, 0.1), (0.0, 0.2))
    assert (r.optim.base_lr, r.optim.weight_decay, r.optim.betas, r.optim.min_lr) == (1.5e-4, 0.1, (0.9, 0.999), 0)
    assert (r.schedule.epochs, r.schedule.warmup_epochs, r.train.global_batch_size) == (300, 40, 4096)
    assert (r.model.name, r.model.patch_size, r.model.drop_path_rate) == ("vit_small_patch16_224", 16, 0.0)
