"""Tests for sslvit.evaluation.linear: both protocols solve a separable problem, and their options shape the head."""

from __future__ import annotations

import pytest
import torch
from lightly.utils.lars import LARS

from sslvit.errors import RecipeError
from sslvit.evaluation.features import Features
from sslvit.evaluation.linear import LinearConfig, LinearHeads, linear_probe, make_optimizer, probe_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _toy(n: int, dim: int = 16, classes: int = 5, seed: int = 0) -> Features:
    """Linearly separable features: the class lives in the last block's CLS, the other blocks are noise."""
    g = torch.Generator().manual_seed(seed)
    centers = 4.0 * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(n) % classes
    cls = centers[labels] + 0.5 * torch.randn(n, dim, generator=g)
    blocks = torch.cat([torch.randn(n, 3, dim, generator=g), cls[:, None]], dim=1)
    return Features(cls, torch.randn(n, dim, generator=g), blocks, labels, torch.arange(n))


@pytest.mark.parametrize("protocol", ["mae", "dino"])
def test_a_separable_problem_is_solved(protocol):
    cfg = LinearConfig(protocol=protocol, epochs=20)
    result = linear_probe(_toy(400), _toy(200, seed=1), 5, cfg)
    assert result["metrics"]["top1"] >= 99.0
    grid = result["selection"]["grid"]
    chosen = max(grid, key=lambda g: g["val_top1"])
    assert result["selection"]["chosen_base_lr"] == chosen["base_lr"]
    assert result["metrics"]["top1"] == chosen["test_top1"] and "held-out" in result["selection"]["rule"]
    assert result["hyperparameters"]["val_size"] == 40 and result["hyperparameters"]["train_size"] == 360


def test_mae_head_is_batchnorm_without_affine_then_linear_on_the_cls_token():
    cfg = LinearConfig(protocol="mae")
    feats = _toy(10)
    assert torch.equal(probe_inputs(feats, cfg), feats.cls)
    heads = LinearHeads(16, 5, 2, batchnorm=True)
    bn, linear = heads.head(1)
    assert isinstance(bn, torch.nn.BatchNorm1d) and not bn.affine and bn.eps == 1e-6
    assert linear.in_features == 16 and torch.all(linear.bias == 0)
    x = 3.0 + 2.0 * torch.randn(64, 16)
    heads.eval()  # a fresh norm: running stats (0, 1); the batched forward equals each standalone head
    assert torch.allclose(heads(x)[1], heads.head(1)(x), atol=1e-5)
    heads.train()
    heads(x)  # training updates the running statistics towards the features' (mean 3)
    assert heads.norm.running_mean.mean() > 0.1
    dino = LinearHeads(16, 5, 1, batchnorm=False)
    assert isinstance(dino.head(0), torch.nn.Linear) and isinstance(dino.norm, torch.nn.Identity)  # DINO: no norm


def _first_update(protocol: str, grad_scale: float) -> tuple[float, float]:
    """Size of the first update of a head's weight and bias when the loss is multiplied by ``grad_scale``."""
    torch.manual_seed(0)
    heads = LinearHeads(16, 5, 1, batchnorm=protocol == "mae")
    hp = {**LinearConfig(protocol=protocol).resolved(), "momentum": 0.9}
    optimizer = make_optimizer(heads, [1.0], hp)
    before = [p.detach().clone() for p in (heads.linears[0].weight, heads.linears[0].bias)]
    feats = _toy(32)
    loss = torch.nn.functional.cross_entropy(heads(feats.cls)[0], feats.labels) * grad_scale
    loss.backward()
    optimizer.step()
    return tuple(
        float((p.detach() - b).norm()) for p, b in zip((heads.linears[0].weight, heads.linears[0].bias), before)
    )


def test_mae_uses_lars_trust_ratio_on_the_weight_only():
    heads = LinearHeads(16, 5, 3, batchnorm=True)
    assert isinstance(make_optimizer(heads, [0.1, 1.0, 10.0], LinearConfig().resolved()), LARS)
    weight, bias = _first_update("mae", 1.0)
    weight_big, bias_big = _first_update("mae", 1000.0)
    assert weight_big == pytest.approx(weight, rel=1e-4)  # LARS: the step is a fixed fraction of the weight's norm
    assert bias_big == pytest.approx(1000.0 * bias, rel=1e-4)  # the bias is plain SGD, as in MAE
    weight_sgd, _ = _first_update("dino", 1.0)
    assert _first_update("dino", 1000.0)[0] == pytest.approx(1000.0 * weight_sgd, rel=1e-4)  # DINO: plain SGD


def test_dino_concatenates_the_last_n_blocks_and_optionally_patch_tokens():
    feats = _toy(10)
    assert probe_inputs(feats, LinearConfig(protocol="dino")).shape == (10, 64)
    one = probe_inputs(feats, LinearConfig(protocol="dino", n_last_blocks=1))
    assert torch.equal(one, feats.cls)
    both = probe_inputs(feats, LinearConfig(protocol="dino", n_last_blocks=2, avgpool_patch_tokens=True))
    assert both.shape == (10, 48) and torch.equal(both[:, -16:], feats.patch_mean)
    # the toy's class is only in the last block: one block is enough, noise blocks do not stop the probe
    result = linear_probe(_toy(400), _toy(200, seed=1), 5, LinearConfig(protocol="dino", n_last_blocks=1, epochs=20))
    assert result["hyperparameters"]["input_dim"] == 16 and result["metrics"]["top1"] >= 99.0


def test_bad_options_are_recipe_errors():
    with pytest.raises(RecipeError, match="lr_grid"):
        LinearConfig(lr_grid="0.1,fast").validate()
    with pytest.raises(RecipeError, match="n_last_blocks"):
        LinearConfig(protocol="dino", n_last_blocks=5).validate()
