"""sslvit's MAE against facebookresearch/mae (restated in mae_reference.py): same weights, same mask noise ->
the same loss, the same predictions for the masked patches and the same gradients, to float32 rounding.

Run with ``-s`` to see the largest differences measured.
"""

from __future__ import annotations

import math

import pytest
import torch

from sslvit.backbone import build_vit
from sslvit.objectives import MAE
from sslvit.objectives.mae import MAEConfig
from sslvit.recipe import ModelConfig
from sslvit.training.schedules import warmup_cosine
from tests.reference.mae_reference import adjust_learning_rate, reference_mae
from tests.reference.tolerance import assert_float32_close

# A tiny ViT: 32 px images, 8 px patches (L = 16 patches), width 64, depth 2; decoder width 32, depth 2.
MODEL = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
DECODER = {"decoder_embed_dim": 32, "decoder_depth": 2, "decoder_num_heads": 2}
NUM_PATCHES = (32 // 8) ** 2

# Tolerances: float32 rounding, in units of float32 eps (1.19e-7) times the largest magnitude compared
# (tests/reference/tolerance.py). The loss is reduced in another order (a mean over the masked patches, the authors'
# sum of mask-weighted errors / mask.sum()); predictions and encoder gradients come out of the same float32
# operations (measured: identical); the decoder's gradients differ by rounding, since sslvit's decoder_pred runs on
# the masked tokens only (its matmul sums in another order).
LOSS_ULPS = 4
PRED_ULPS = 4
GRAD_ULPS = 4
POS_EMBED_ULPS = 1


def sslvit_to_reference_name(name: str) -> str | None:
    """The authors' name for one of sslvit's MAE parameters (None: the wrapper's unused mask token)."""
    renames = [
        ("backbone.vit.", ""),
        ("decoder.blocks.", "decoder_blocks."),
        ("decoder.norm.", "decoder_norm."),
        ("decoder.pos_embed", "decoder_pos_embed"),
        ("decoder.mask_token", "mask_token"),
    ]
    if name == "backbone.mask_token":  # lightly's SimMIM token, frozen and unused by MAE
        return None
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return name  # decoder_embed.*, decoder_pred.*


def build_pair(mask_ratio: float, norm_pix_loss: bool):
    torch.manual_seed(0)
    ours = MAE(build_vit(MODEL), MAEConfig(mask_ratio=mask_ratio, norm_pix_loss=norm_pix_loss, **DECODER))
    reference = reference_mae(32, 8, 64, 2, 2, norm_pix_loss=norm_pix_loss, **DECODER)
    mapped = {}
    for name, param in ours.named_parameters():
        target = sslvit_to_reference_name(name)
        if target is not None:
            mapped[target] = param.detach().clone()
    missing, unexpected = reference.load_state_dict(mapped, strict=False)
    assert not missing and not unexpected, (missing, unexpected)  # every weight is mapped, one to one
    return ours, reference


@pytest.fixture
def fixed_noise(monkeypatch):
    """Both sides draw their mask noise from ``torch.rand``: the authors as ``(N, L)``, lightly's
    ``random_token_mask`` (sslvit) as ``(N, 1 + L)`` with the class token's column then set to -1. Serve both from
    the same ``(N, L)`` draw."""
    noise = torch.rand(4, NUM_PATCHES, generator=torch.Generator().manual_seed(7))
    real_rand = torch.rand

    def rand(*size, **kwargs):
        shape = tuple(size[0]) if len(size) == 1 else tuple(size)
        if shape == tuple(noise.shape):
            return noise.clone()
        if shape == (noise.shape[0], noise.shape[1] + 1):
            return torch.cat([torch.zeros(noise.shape[0], 1), noise], dim=1)
        return real_rand(*size, **kwargs)

    monkeypatch.setattr(torch, "rand", rand)
    return noise


@pytest.mark.parametrize(("mask_ratio", "norm_pix_loss"), [(0.75, True), (0.75, False), (0.6, True)])
def test_loss_masked_predictions_and_gradients_equal_the_authors_model(fixed_noise, mask_ratio, norm_pix_loss):
    ours, reference = build_pair(mask_ratio, norm_pix_loss)
    fresh = reference_mae(32, 8, 64, 2, 2, norm_pix_loss=norm_pix_loss, **DECODER).state_dict()
    for key in ("pos_embed", "decoder_pos_embed"):  # lightly's fixed sin-cos tables are the authors'
        assert_float32_close(reference.state_dict()[key], fresh[key], POS_EMBED_ULPS, key)

    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    seen = {}
    ours.decoder_pred.register_forward_hook(lambda m, args, out: seen.update(pred=out))
    random_mask = ours.random_mask
    ours.random_mask = lambda *args: seen.setdefault("idx", random_mask(*args))
    loss = ours({"views": [images]})["loss"]
    loss.backward()

    ref_loss, ref_pred, ref_mask = reference(images, mask_ratio=mask_ratio)
    ref_loss.backward()

    # the same patches are masked, in the same (noise) order
    len_keep = int(NUM_PATCHES * (1 - mask_ratio))
    ids_masked = torch.argsort(fixed_noise, dim=1)[:, len_keep:]
    idx_keep, idx_mask = seen["idx"]
    assert torch.equal(idx_mask - 1, ids_masked) and idx_keep.shape[1] == 1 + len_keep
    assert torch.equal(ref_mask, torch.zeros_like(ref_mask).scatter_(1, ids_masked, 1.0))

    ref_masked_pred = torch.gather(ref_pred, 1, ids_masked.unsqueeze(-1).expand(-1, -1, ref_pred.shape[-1]))
    loss_diff = assert_float32_close(loss, ref_loss, LOSS_ULPS, "loss")
    pred_diff = assert_float32_close(seen["pred"], ref_masked_pred, PRED_ULPS, "masked predictions")
    grad_diffs = {}
    for name, param in ours.named_parameters():
        if param.requires_grad and sslvit_to_reference_name(name) is not None:
            ref_grad = reference.get_parameter(sslvit_to_reference_name(name)).grad
            assert param.grad is not None and ref_grad is not None, name
            grad_diffs[name] = assert_float32_close(param.grad, ref_grad, GRAD_ULPS, f"gradient of {name}")
    encoder = max(v for k, v in grad_diffs.items() if k.startswith("backbone."))
    decoder = max(v for k, v in grad_diffs.items() if not k.startswith("backbone."))
    print(
        f"\nMAE mask_ratio={mask_ratio} norm_pix_loss={norm_pix_loss}: loss {loss.item():.4f}, largest differences: "
        f"loss {loss_diff:.3g}, masked predictions {pred_diff:.3g}, gradients encoder {encoder:.3g} "
        f"decoder {decoder:.3g}"
    )
    assert ours.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().max() > 1e-3  # the gradient check can bite
    # what the authors' decoder predicts for visible patches is multiplied by 0: the loss does not depend on it
    garbage = torch.where(ref_mask.bool().unsqueeze(-1), ref_pred.detach(), torch.full_like(ref_pred, 1e3))
    torch.testing.assert_close(reference.forward_loss(images, garbage, ref_mask), ref_loss.detach())


def test_the_mae_learning_rate_is_the_authors_per_iteration_rule():
    """util/lr_sched.adjust_learning_rate at the fractional epoch ``step / niter``, as main_pretrain.py calls it."""
    epochs, niter, warmup = 20, 5, 4
    official = [adjust_learning_rate(s / niter, 1.5e-4, 1e-6, warmup, epochs) for s in range(epochs * niter)]
    ours = [warmup_cosine(s, epochs * niter, warmup * niter, 1.5e-4, 1e-6) for s in range(epochs * niter)]
    assert max(abs(a - b) for a, b in zip(ours, official)) <= 1e-12 * 1.5e-4
    assert not MAE.warmup_reaches_base_at_last_step  # the loop passes inclusive=False for MAE
    assert ours[warmup * niter] == pytest.approx(1.5e-4) and math.isclose(ours[-1], official[-1], rel_tol=1e-12)
