"""Schedules exactly as the authors': DINO's cosine_scheduler and MAE's lr_sched, epochs counted in integers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.objectives import DINO, MAE, Progress
from sslvit.objectives.dino import teacher_temperature
from sslvit.train import pretrain, warmup_cosine
from tests.conftest import tiny_recipe


def dino_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup=0.0) -> np.ndarray:
    """The per-iteration values of facebookresearch/dino's ``utils.cosine_scheduler`` (utils.py at
    ba9edd18db78a99193005ef991e04d63984b25a8), restated: ``np.linspace(start_warmup, base, W)`` for the first
    ``W = warmup_epochs * niter_per_ep`` iterations, then ``final + (base - final) * (1 + cos(pi * j / n)) / 2`` for
    ``j = 0 .. n - 1``, ``n`` the remaining iterations."""
    w = warmup_epochs * niter_per_ep
    n = epochs * niter_per_ep - w
    cosine = [final + (base - final) * (1 + math.cos(math.pi * j / n)) / 2 for j in range(n)]
    return np.array([*(np.linspace(start_warmup, base, w) if w else []), *cosine])


def mae_adjust_learning_rate(epoch, lr, min_lr, warmup_epochs, epochs):
    """The rate facebookresearch/mae's ``util/lr_sched.adjust_learning_rate`` sets at fractional ``epoch``, restated:
    ``lr * epoch / warmup`` during warmup, then a half-cycle cosine from ``lr`` to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    done = (epoch - warmup_epochs) / (epochs - warmup_epochs)
    return min_lr + (lr - min_lr) * (1.0 + math.cos(math.pi * done)) / 2


@pytest.mark.parametrize(("epochs", "niter", "warmup"), [(10, 7, 2), (100, 1, 10), (4, 22, 1)])
def test_dino_warmup_is_linspace_reaching_the_base_rate_one_step_before_the_cosine(epochs, niter, warmup):
    official = dino_cosine_scheduler(5e-4, 1e-6, epochs, niter, warmup, start_warmup=0.0)
    total, w = epochs * niter, warmup * niter
    ours = [warmup_cosine(s, total, w, 5e-4, 1e-6, 0.0, inclusive=True) for s in range(total)]
    np.testing.assert_allclose(ours, official, rtol=1e-12, atol=1e-18)
    assert DINO.warmup_reaches_base_at_last_step and not MAE.warmup_reaches_base_at_last_step


def test_mae_warmup_reaches_the_base_rate_at_the_warmup_step():
    epochs, niter, warmup = 20, 5, 4
    official = [mae_adjust_learning_rate(s / niter, 1.5e-4, 1e-6, warmup, epochs) for s in range(epochs * niter)]
    ours = [warmup_cosine(s, epochs * niter, warmup * niter, 1.5e-4, 1e-6) for s in range(epochs * niter)]
    np.testing.assert_allclose(ours, official, rtol=1e-12)


def test_whole_epochs_are_computed_in_integers_on_every_boundary():
    assert 29 / 100 * 100 == 28.999999999999996  # why int(step / total * epochs) is wrong on some boundaries
    for epochs in (3, 7, 30, 100, 300):
        for niter in (1, 3, 22, 97):
            total = epochs * niter
            assert [Progress(s, total, epochs).whole_epoch for s in range(total)] == [s // niter for s in range(total)]


def test_teacher_temperature_follows_the_integer_epoch_on_a_boundary():
    from sslvit.objectives.dino import DINOConfig

    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    official = np.concatenate((np.linspace(0.04, 0.07, 30), np.ones(70) * 0.07))  # main_dino.py, indexed by epoch
    for step in range(100):  # one step per epoch: step 29 is epoch 29, not 28.999...
        assert teacher_temperature(cfg, Progress(step, 100, 100).whole_epoch) == pytest.approx(official[step])


def test_the_dino_loop_logs_dinos_own_lr_schedule(tmp_path):
    recipe = tiny_recipe(
        "quickstart_dino",
        "train.max_steps=8",
        "schedule.epochs=4",
        "schedule.warmup_epochs=2",
        "objective.local_crops_number=0",
        "log.image_every=0",
    )
    pretrain(recipe, tmp_path)
    logged = [e.value for e in EventAccumulator(str(tmp_path / "tensorboard")).Reload().Scalars("train/lr")]
    lr = recipe.optim.base_lr * recipe.train.global_batch_size / 256
    official = dino_cosine_scheduler(lr, recipe.optim.min_lr, 4, 2, warmup_epochs=2)
    np.testing.assert_allclose(logged, official, rtol=1e-6)  # logged per step: the rate the step used
    assert logged[3] == pytest.approx(lr)  # the base rate at the last warmup step (MAE's rule gave 3/4 of it)
