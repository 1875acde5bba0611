"""The shared teacher-student machinery: Sinkhorn-Knopp targets (DINOv2) and the EMA update."""

from __future__ import annotations

import numpy as np
import torch
from lightly.loss import KoLeoLoss

from sslvit.objectives.teacher import ema_update, sinkhorn_knopp


def sinkhorn_float64(logits: np.ndarray, temp: float, iterations: int = 3) -> np.ndarray:
    """DINOv2's ``sinkhorn_knopp_teacher`` (dinov2/loss/dino_clstoken_loss.py at 05c66df0), restated in float64:
    Q = exp(logits / T) as (K, N), normalised to total mass 1; then ``iterations`` times: each prototype's row to
    mass 1/K, each sample's column to mass 1/N; finally the columns scaled to sum to 1, returned as (N, K)."""
    q = np.exp(logits.astype(np.float64) / temp).T
    k, n = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(axis=1, keepdims=True) / k
        q = q / q.sum(axis=0, keepdims=True) / n
    return (q * n).T


def test_sinkhorn_knopp_is_dinov2s_algorithm_and_balances_the_prototypes():
    logits = torch.randn(24, 10, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)  # cosine logits
    targets = sinkhorn_knopp(logits, 0.1)
    np.testing.assert_allclose(targets.numpy(), sinkhorn_float64(logits.numpy(), 0.1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(24))  # one distribution per sample
    # three iterations balance the prototypes' shares of the batch (N / K = 2.4 each) far better than a softmax
    spread = (targets.sum(dim=0) - 2.4).abs().max()
    assert spread < 0.3 * (torch.softmax(logits / 0.1, dim=-1).sum(dim=0) - 2.4).abs().max()


def test_a_low_temperature_does_not_overflow():
    logits = torch.tensor([[1.0, -1.0], [0.9, 0.95]])
    targets = sinkhorn_knopp(logits, 0.005)  # exp(1 / 0.005) alone overflows float32
    assert torch.isfinite(targets).all()
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(2))


def test_lightly_koleo_is_the_kozachenko_leonenko_estimate_dinov2_uses():
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(3))
    unit = torch.nn.functional.normalize(x, dim=-1)
    distances = torch.cdist(unit, unit) + torch.eye(16) * 10  # a point is not its own neighbour
    expected = -torch.log(distances.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(KoLeoLoss()(x), expected, rtol=1e-5, atol=1e-6)


def test_ema_update_moves_the_teacher_by_one_minus_the_momentum():
    teacher, student = [torch.zeros(3)], [torch.ones(3)]
    ema_update(teacher, student, 0.9)
    torch.testing.assert_close(teacher[0], torch.full((3,), 0.1))
