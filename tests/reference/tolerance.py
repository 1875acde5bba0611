"""The tolerance every reference test uses: float32 rounding, a few units in the last place of the values compared."""

from __future__ import annotations

import torch

FLOAT32_EPS = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp of a value near 1


def max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute difference (shapes must match)."""
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return (ours.detach().double() - reference.detach().double()).abs().max().item()


def assert_float32_close(
    ours: torch.Tensor, reference: torch.Tensor, ulps: float, what: str, scale: float | None = None
) -> float:
    """``|ours - reference| <= ulps * eps * scale`` everywhere; returns the largest difference.

    ``scale`` defaults to the largest magnitude in ``reference``: a sum or matmul reduced in another order differs by
    a few ulps of its largest terms, not of each (possibly tiny) element. Gradients pass the largest gradient of the
    whole model: rounding in the shared upstream gradient reaches every parameter, also those whose gradient is small.
    """
    diff = max_diff(ours, reference)
    if scale is None:
        scale = reference.detach().abs().max().item()
    scale = max(scale, torch.finfo(torch.float32).tiny)
    bound = ulps * FLOAT32_EPS * scale
    assert diff <= bound, f"{what}: largest difference {diff:.3g} > {ulps} float32 ulps of {scale:.3g} ({bound:.3g})"
    return diff
