"""Schedules in integer epochs, and the DINO loop logging its own rate (the schedules themselves are compared with
the authors' in tests/reference/)."""

from __future__ import annotations

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sslvit.objectives import Progress
from sslvit.objectives.dino import teacher_temperature
from sslvit.train import pretrain
from tests.conftest import tiny_recipe
from tests.reference.dino_reference import DINOLoss, cosine_scheduler


def test_whole_epochs_are_computed_in_integers_on_every_boundary():
    assert 29 / 100 * 100 == 28.999999999999996  # why int(step / total * epochs) is wrong on some boundaries
    for epochs in (3, 7, 30, 100, 300):
        for niter in (1, 3, 22, 97):
            total = epochs * niter
            assert [Progress(s, total, epochs).whole_epoch for s in range(total)] == [s // niter for s in range(total)]


def test_teacher_temperature_follows_the_integer_epoch_on_a_boundary():
    from sslvit.objectives.dino import DINOConfig

    cfg = DINOConfig(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=30)
    official = DINOLoss(8, 2, 0.04, 0.07, 30, 100).teacher_temp_schedule  # main_dino.py's, indexed by epoch
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
    official = cosine_scheduler(lr, recipe.optim.min_lr, 4, 2, warmup_epochs=2)
    np.testing.assert_allclose(logged, official, rtol=1e-6)  # logged per step: the rate the step used
    assert logged[3] == pytest.approx(lr)  # the base rate at the last warmup step (MAE's rule gave 3/4 of it)
