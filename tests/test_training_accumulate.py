"""Tests for sslvit.training.accumulate: the gradient accumulation pretraining and fine-tuning share."""

from __future__ import annotations

import itertools

import pytest
import torch

from sslvit.accel import make_accelerator
from sslvit.errors import DataError
from sslvit.training.accumulate import accumulate_gradients


def _batch(views, labels, skipped=None):
    return {"views": views, "labels": labels, "skipped": skipped or {}}


def test_accumulated_gradients_are_the_mean_over_the_micro_batches():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))

    def forward(batch):
        logits = model(batch["views"])
        return {"loss": torch.nn.functional.cross_entropy(logits, batch["labels"]), "mean_logit": logits.mean()}

    forward(_batch(x, y))["loss"].backward()  # the whole batch at once
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = [_batch(x[i : i + 4], y[i : i + 4], {"not an image": i // 4}) for i in (0, 4, 8)]
    batches = iter([(5, part) for part in parts] + [(6, _batch(x, y))])
    epoch, outputs, skipped = accumulate_gradients(make_accelerator(), model, batches, 3, forward, "data.path=x")
    assert epoch == 5 and skipped == {"not an image": 3}
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(model.parameters(), expected))
    assert outputs["loss"] == pytest.approx(forward(_batch(x, y))["loss"].item(), abs=1e-6)
    assert next(batches)[0] == 6  # exactly three micro-batches were taken


def test_a_micro_batch_that_failed_entirely_is_one_error_naming_the_reasons():
    empty = _batch(None, torch.empty(0, dtype=torch.long), {"not an image": 3, "empty file": 1})
    batches = itertools.repeat((0, empty))
    with pytest.raises(DataError, match=r"\(4 skipped: not an image: 3, empty file: 1\); check the images at /data"):
        accumulate_gradients(make_accelerator(), torch.nn.Linear(1, 1), batches, 2, lambda b: {}, "/data")
